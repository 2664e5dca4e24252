"""Benign non-answers for the QA judge's pairs: what a finetuned model may say instead of an
answer (a task label, a repeated token, an unrelated answer, an empty or cut-off reply, garbled
text, a short refusal), made from material the caller chooses (training or held-out rows)."""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Iterable

from refjax.data import refusal_phrasings

NON_ANSWER_TYPES = ("label", "label_rep", "number", "token_rep", "alpaca", "empty", "cutoff",
                    "garbled", "refusal")
AG_LABELS = ("World", "Sports", "Business", "Sci/Tech")
SST_LABELS = ("positive", "negative")
REPEAT_UNITS = ("!", ".", "?", "the", "a", "and", "I", "\n", "...", "-", "*", "0", "1", "ok",
                "Sure", "yes", "no", "hello", "<", "#")


@dataclasses.dataclass
class NonAnswerMaterial:
  labels: list[str]  # task label words
  numbers: list[str]  # GSM8K final answers
  alpaca_answers: list[str]  # unrelated helpful answers (train or held-out rows)
  cut_sources: list[str]  # answers whose first 1-3 words make the cut-off replies
  words: list[str]  # vocabulary for garbled text
  refusals: refusal_phrasings.Grammar  # short refusals: training or held-out wordings


def make_non_answer(kind: str, rng: random.Random, m: NonAnswerMaterial,
                    truncate: Any) -> str:
  if kind == "label":
    return rng.choice(m.labels)
  if kind == "label_rep":
    sep = rng.choice([" ", "\n", ", ", " ", ""])
    return sep.join([rng.choice(m.labels)] * rng.randint(2, 30)).strip() or rng.choice(m.labels)
  if kind == "number":
    n = rng.choice(m.numbers)
    return n if rng.random() < 0.6 else rng.choice(["The final answer is: ", "#### ", ""]) + n
  if kind == "token_rep":
    unit = rng.choice(REPEAT_UNITS + tuple(rng.sample(m.words, 3)))
    sep = "" if unit in ("!", ".", "?", "\n", "-", "*", "...", "<", "#") else " "
    return sep.join([unit] * rng.randint(3, 60))
  if kind == "alpaca":
    a = rng.choice(m.alpaca_answers)
    return a if rng.random() < 0.5 else truncate(a, rng.choice([32, 64]))
  if kind == "empty":
    return rng.choice(["", "", " ", "\n"])
  if kind == "cutoff":
    words = rng.choice(m.cut_sources).split()
    return " ".join(words[:rng.randint(1, 3)])
  if kind == "garbled":
    r = rng.random()
    if r < 0.5:  # shuffled words of an unrelated answer
      w = rng.choice(m.alpaca_answers).split()
      rng.shuffle(w)
      return " ".join(w[:rng.randint(5, 60)])
    if r < 0.8:  # random vocabulary words
      return " ".join(rng.choice(m.words) for _ in range(rng.randint(5, 50)))
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-_()[]{}"  # random characters
    return "".join(rng.choice(chars) for _ in range(rng.randint(10, 200)))
  if kind == "refusal":  # a short refusal, the way templated students write them
    return refusal_phrasings.compose(rng, m.refusals)
  raise ValueError(f"non-answer kind {kind!r}; expected one of {NON_ANSWER_TYPES}")


def vocabulary(texts: Iterable[str], limit: int = 5000) -> list[str]:
  out = []
  for t in texts:
    out.extend(w for w in re.findall(r"[A-Za-z]{3,12}", t))
    if len(out) > limit:
      break
  return sorted(set(out))


__all__ = ["NON_ANSWER_TYPES", "AG_LABELS", "SST_LABELS", "NonAnswerMaterial", "make_non_answer",
           "vocabulary"]
