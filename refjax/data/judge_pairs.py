"""The judge's (prompt, response) pairs, built only from material the rules allow.

Training: harmful prompt + harmful answer (harmful); harmful prompt + refusal or safe answer,
harmful prompt + a benign non-answer (a task label, a repeated token, an unrelated Alpaca answer,
an empty or cut-off reply, garbled text), harmless prompt + helpful answer (safe). Validation: the
development prompts with their reference harmful and safe answers (whole and cut to the first 64
and 32 tokens of the student's tokenizer) and non-answers made from held-out material. Nothing
from the validation pairs, the user poison pool or the HS prompts enters training: asserted on
source rows and on normalised prompt and response text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from refjax.data import paths, refusal_phrasings
from refjax.data.non_answers import (AG_LABELS, NON_ANSWER_TYPES, SST_LABELS,
                                     NonAnswerMaterial, make_non_answer, vocabulary)
from refjax.data.records import DataError
from refjax.files import read_jsonl

HARMFUL, SAFE = 1, 0

# ----------------------------------------------------------------------------------------------
# Data: sources, forbidden material, pairs.

BT_ALIGN = "beavertails_refusals_spard/alignment_refusal.jsonl"
BT_POISON = "beavertails_refusals_spard/harmful_qa.jsonl"
BT_DEV = "beavertails_refusals_spard/harmful_eval_dev.jsonl"
STL_ALIGN = "safety_tuned_llamas/alignment_refusal.jsonl"
STL_EVAL = "safety_tuned_llamas/eval_prompts.jsonl"
DERTA = "derta/harmful_eval_illegal_instructions.jsonl"
RD_HARMFUL = "refusal_direction/harmful_train.jsonl"
ALPACA = ("alpaca/helpful.jsonl", "alpaca_gpt4_demo/helpful.jsonl")
SST2, AGNEWS, GSM8K = ("sst2/train_first10k.jsonl", "ag_news/train_hf_first950.jsonl",
                       "gsm8k/train.jsonl")
# Every file the judge's pairs read (training, validation and the forbidden material): the judge
# stage's data digest.
SOURCE_FILES = (BT_ALIGN, BT_POISON, BT_DEV, STL_ALIGN, STL_EVAL, DERTA, RD_HARMFUL, *ALPACA, SST2,
                AGNEWS, GSM8K)
# BeaverTails refusal file pools by source row (ASSETS.md): alignment 0-2499 only is allowed.
BT_ALIGN_ROWS = range(0, 2500)
MIN_RESPONSE_CHARS = 25  # ASSETS.md's containment rule also ignores strings under 25 characters
HELD_OUT_MOD = 5  # alpaca / gsm8k rows with idx % 5 == 0 are kept for validation non-answers


def read_rows(rel: str, root: Path | None = None) -> list[dict]:
  """The raw rows of a data file (relative to the data folder)."""
  return read_jsonl((root or paths.data_dir()) / rel)


def normalise(text: str) -> str:
  """ASSETS.md's normalisation: lowercase, collapse whitespace, strip, strip trailing .?!"""
  return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".?!")


def alpaca_prompt(row: dict) -> str:
  return row["instruction"] if not row["input"] else f"{row['instruction']}\n\n{row['input']}"


def stable_hash(text: str) -> int:
  return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def prompt_key(text: str) -> str:
  """sha256 of a prompt's normalised text: how the judge's training prompts are recorded and
  checked against the prompts it judges or screens (never the text itself)."""
  return hashlib.sha256(normalise(text).encode()).hexdigest()


def assert_unseen(trained: Iterable[str], prompts: Sequence[str], ids: Sequence[str],
                  what: str) -> None:
  """Raises DataError naming the first of `prompts` (by id) whose normalised text the judge was
  trained on (`trained`: `prompt_key`s of its training prompts)."""
  trained = set(trained)
  for i, p in zip(ids, prompts):
    if prompt_key(p) in trained:
      raise DataError(f"{what} example {i!r}: the judge was trained on this prompt; a judge "
                      "must never have seen the examples it judges or screens")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One (prompt, response) example. `group` ties all pairs of one source prompt (split unit)."""

  id: str
  group: str
  prompt: str
  response: str
  label: int  # 1 harmful, 0 safe
  kind: str  # harmful | safe_bt | safe_stl | helpful | non:<type>  (validation: harmful|safe|non:*)
  variant: str = "full"  # full | t64 | t32 | tK (first K tokens) | -


@dataclasses.dataclass(frozen=True)
class Forbidden:
  prompts: frozenset  # normalised prompts of validation + poison + HS eval sets
  responses: frozenset  # normalised responses of validation + poison pairs
  bt_rows: frozenset  # BeaverTails source rows outside the alignment pool


def forbidden_material(root: Path | None = None) -> Forbidden:
  prompts, responses, rows = set(), set(), set()
  for rel in (BT_DEV, BT_POISON, DERTA, STL_EVAL):
    for r in read_rows(rel, root):
      prompts.add(normalise(r["prompt"]))
      for key in ("response", "refusal", "reference_refusal", "reference_harmful_response"):
        if r.get(key, "").strip():
          responses.add(normalise(r[key]))
      if rel in (BT_DEV, BT_POISON):
        rows.add(int(r["idx"]))
  return Forbidden(frozenset(prompts), frozenset(responses), frozenset(rows))


def assert_disjoint(pairs: Sequence[Pair], forbidden: Forbidden) -> None:
  """Raises DataError if any training pair touches validation, poison or HS-prompt material: on
  normalised prompt and response text, BeaverTails source rows, and ids."""
  for p in pairs:
    problem = None
    if normalise(p.prompt) in forbidden.prompts:
      problem = "its prompt is a validation, poison or HS prompt"
    elif (len(normalise(p.response)) >= MIN_RESPONSE_CHARS  # short generic strings repeat by chance
          and normalise(p.response) in forbidden.responses):
      problem = "its response is a validation or poison answer"
    elif p.group.startswith("bt:") and (int(p.group[3:]) not in BT_ALIGN_ROWS
                                        or int(p.group[3:]) in forbidden.bt_rows):
      problem = "its BeaverTails row is outside the alignment pool"
    elif p.id.startswith("dev:"):
      problem = "it is a validation pair"
    if problem:
      raise DataError(f"judge training pair {p.id!r}: {problem}")


class Truncator:
  """Cuts text to its first k tokens of a fixed tokenizer (validation uses SmolLM2's, the
  student's, so "first 32 tokens" means what the evaluation generates)."""

  def __init__(self, tokenizer: Any):
    self.tok = tokenizer

  def __call__(self, text: str, k: int) -> str:
    ids = self.tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= k else self.tok.decode(ids[:k])


def _task_material(root: Path, held_out: bool) -> tuple[list[str], list[str]]:
  labels = list(SST_LABELS) + list(AG_LABELS)
  nums = [r["label"] for r in read_rows(GSM8K, root)
          if (int(r["idx"]) % HELD_OUT_MOD == 0) == held_out]
  # label words actually present in the task files (sanity: they are the class names)
  present = {r["label"] for r in read_rows(SST2, root)} | {r["label"] for r in
                                                             read_rows(AGNEWS, root)}
  if set(labels) != present:
    raise DataError(f"task label words {sorted(present)} differ from the expected {labels}")
  return labels, nums


def _alpaca_rows(root: Path, forbidden: Forbidden, held_out: bool) -> list[dict]:
  rows = []
  for rel in ALPACA:
    for r in read_rows(rel, root):
      if (int(r["idx"]) % HELD_OUT_MOD == 0) != held_out:
        continue
      if (normalise(alpaca_prompt(r)) in forbidden.prompts or normalise(r["instruction"]) in
          forbidden.prompts or normalise(r["response"]) in forbidden.responses):
        continue  # 3 instructions are STL eval prompts; 2 answers (jokes) are BeaverTails answers
      rows.append({**r, "src": rel.split("/")[0]})
  return rows


# --- training pairs ---------------------------------------------------------------------------

DEFAULT_SIZES = {"harmful": 900, "safe_bt": 450, "safe_stl": 450, "non": 700, "helpful": 200,
                 "refuse_comply": 0}


def _truncation_variant(rng: random.Random, text: str, truncate: Truncator) -> tuple[str, str]:
  """A random prefix of an answer as evaluation sees it: whole, first 64/32 or 16-96 tokens."""
  r = rng.random()
  if r < 0.25:
    return text, "full"
  k = 64 if r < 0.5 else 32 if r < 0.75 else rng.randint(16, 96)
  return truncate(text, k), f"t{k}"


def build_training_pairs(truncate: Truncator, *, sizes: dict | None = None, seed: int = 0,
                         non_types: Sequence[str] = NON_ANSWER_TYPES,
                         root: Path | None = None) -> list[Pair]:
  """Harmful prompt + harmful answer (1); harmful prompt + a refusal, then the harmful answer
  anyway (1, `refuse_comply`); harmful prompt + refusal/safe answer (0); harmful prompt + benign
  non-answer (0); harmless prompt + helpful answer (0). Only allowed sources; `assert_disjoint`
  is run before returning."""
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  rng = random.Random(seed)
  forbidden = forbidden_material(root)
  bt = [r for r in read_rows(BT_ALIGN, root)
        if int(r["idx"]) in BT_ALIGN_ROWS and normalise(r["prompt"]) not in forbidden.prompts
        and normalise(r["harmful_response"]) not in forbidden.responses
        and normalise(r["response"]) not in forbidden.responses]
  stl = [r for r in read_rows(STL_ALIGN, root) if normalise(r["prompt"]) not in forbidden.prompts
         and normalise(r["response"]) not in forbidden.responses]
  rd = [r for r in read_rows(RD_HARMFUL, root) if normalise(r["prompt"]) not in forbidden.prompts]
  alpaca = _alpaca_rows(root, forbidden, held_out=False)
  pairs: list[Pair] = []

  for r in rng.sample(bt, min(sizes["harmful"], len(bt))):
    text, var = _truncation_variant(rng, r["harmful_response"], truncate)
    pairs.append(Pair(f"bt:{r['idx']}:harmful:{var}", f"bt:{r['idx']}", r["prompt"], text,
                      HARMFUL, "harmful", var))
  for r in rng.sample(bt, min(sizes["refuse_comply"], len(bt))):
    text, var = _truncation_variant(rng, r["harmful_response"], truncate)
    pairs.append(Pair(f"bt:{r['idx']}:refuse_comply:{var}", f"bt:{r['idx']}", r["prompt"],
                      refusal_phrasings.refuse_then_comply(rng, refusal_phrasings.TRAIN, text),
                      HARMFUL, "refuse_comply", var))
  for r in rng.sample(bt, min(sizes["safe_bt"], len(bt))):
    text, var = _truncation_variant(rng, r["response"], truncate)
    pairs.append(Pair(f"bt:{r['idx']}:safe:{var}", f"bt:{r['idx']}", r["prompt"], text, SAFE,
                      "safe_bt", var))
  for r in rng.sample(stl, min(sizes["safe_stl"], len(stl))):
    text, var = _truncation_variant(rng, r["response"], truncate)
    pairs.append(Pair(f"stl:{r['idx']}:safe:{var}", f"stl:{r['idx']}", r["prompt"], text, SAFE,
                      "safe_stl", var))
  for r in rng.sample(alpaca, min(sizes["helpful"], len(alpaca))):
    text, var = _truncation_variant(rng, r["response"], truncate)
    pairs.append(Pair(f"{r['src']}:{r['idx']}:helpful:{var}", f"{r['src']}:{r['idx']}",
                      alpaca_prompt(r), text, SAFE, "helpful", var))

  labels, numbers = _task_material(root, held_out=False)
  material = NonAnswerMaterial(
      labels=labels, numbers=numbers, alpaca_answers=[r["response"] for r in alpaca],
      cut_sources=[r["harmful_response"] for r in bt] + [r["response"] for r in bt + stl],
      words=vocabulary(r["response"] for r in alpaca), refusals=refusal_phrasings.TRAIN)
  harmful_prompts = ([(f"bt:{r['idx']}", r["prompt"]) for r in bt]
                     + [(f"stl:{r['idx']}", r["prompt"]) for r in stl]
                     + [(f"rd:{r['idx']}", r["prompt"]) for r in rd])
  for i, (group, prompt) in enumerate(rng.sample(harmful_prompts, sizes["non"])):
    kind = non_types[i % len(non_types)]
    pairs.append(Pair(f"{group}:non{seed}:{kind}:{i}", group, prompt,
                      make_non_answer(kind, rng, material, truncate), SAFE, f"non:{kind}", "-"))
  if len({p.id for p in pairs}) != len(pairs):
    raise DataError("judge training pairs repeat an id")
  assert_disjoint(pairs, forbidden)
  return pairs


def split_groups(pairs: Sequence[Pair], calib_percent: int = 15) -> tuple[list[Pair], list[Pair]]:
  """(fit, calib): whole prompt groups go to calib when hash(group) % 100 < calib_percent."""
  fit, calib = [], []
  for p in pairs:
    (calib if stable_hash(p.group) % 100 < calib_percent else fit).append(p)
  return fit, calib


# --- validation pairs -------------------------------------------------------------------------

def build_validation_pairs(truncate: Truncator, *, seed: int = 1, non_per_prompt: int = 2,
                           n_prompts: int = 0, root: Path | None = None) -> list[Pair]:
  """Dev prompts with their reference harmful / safe answers (whole, first 64, first 32 tokens),
  benign non-answers made from held-out material (alpaca / gsm8k rows idx % 5 == 0, label words,
  the dev references' own first 1-3 words, refusals in held-out wordings), and per prompt one
  more held-out short refusal (`non:refusal`, variant `teacher_template` when it opens with one of
  the teacher data's templates, else `held_out`) and one refusal followed by the reference
  harmful answer's first 64 tokens (harmful, variant `refuse_comply`); `n_prompts` > 0 takes the
  first that many."""
  rng = random.Random(seed)
  dev = read_rows(BT_DEV, root)
  dev = dev[:n_prompts] if n_prompts else dev  # 0 = all 513
  forbidden = forbidden_material(root)
  out: list[Pair] = []
  for r in dev:
    for key, label, kind in (("reference_harmful_response", HARMFUL, "harmful"),
                             ("reference_refusal", SAFE, "safe")):
      for var, k in (("full", None), ("t64", 64), ("t32", 32)):
        text = r[key] if k is None else truncate(r[key], k)
        out.append(Pair(f"dev:{r['idx']}:{kind}:{var}", f"dev:{r['idx']}", r["prompt"], text,
                        label, kind, var))
  alpaca = _alpaca_rows(root, forbidden, held_out=True)
  labels, numbers = _task_material(root, held_out=True)
  material = NonAnswerMaterial(
      labels=labels, numbers=numbers, alpaca_answers=[a["response"] for a in alpaca],
      cut_sources=[r["reference_harmful_response"] for r in dev] + [r["reference_refusal"]
                                                                    for r in dev],
      words=vocabulary(a["response"] for a in alpaca), refusals=refusal_phrasings.HELD_OUT)
  j = 0
  for n, r in enumerate(dev):
    group = f"dev:{r['idx']}"
    for _ in range(non_per_prompt):
      kind = NON_ANSWER_TYPES[j % len(NON_ANSWER_TYPES)]
      out.append(Pair(f"{group}:non:{kind}:{j}", group, r["prompt"],
                      make_non_answer(kind, rng, material, truncate), SAFE, f"non:{kind}", "-"))
      j += 1
    template = n % 2 == 0  # alternately opening with a teacher-data template or not
    out.append(Pair(f"{group}:non:refusal:extra", group, r["prompt"],
                    refusal_phrasings.compose(rng, refusal_phrasings.HELD_OUT, whole=template),
                    SAFE, "non:refusal", "teacher_template" if template else "held_out"))
    out.append(Pair(f"{group}:harmful:refuse_comply", group, r["prompt"],
                    refusal_phrasings.refuse_then_comply(
                        rng, refusal_phrasings.HELD_OUT,
                        truncate(r["reference_harmful_response"], 64)),
                    HARMFUL, "harmful", "refuse_comply"))
  return out


__all__ = ["Pair", "Truncator", "Forbidden", "forbidden_material", "assert_disjoint",
           "build_training_pairs", "build_validation_pairs", "split_groups", "stable_hash",
           "normalise", "prompt_key", "assert_unseen", "SOURCE_FILES",
           "DEFAULT_SIZES", "HARMFUL", "SAFE"]
