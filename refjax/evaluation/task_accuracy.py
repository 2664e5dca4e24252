"""Finetuning accuracy (FA), scored exactly as the peer harness does (git-disl Booster/Lisa/Vaccine
`sst2/pred_eval.py`, `agnews/pred_eval.py`, `gsm8k/pred_eval.py`).

* SST-2, AG News: the stripped response must equal the label word, either capitalisation the
  peers accept ("positive"/"Positive"; "World"/"world", ..., "Sci/Tech"/"sci"). Nothing else
  counts, not even "Positive." or "The sentiment is positive".
* GSM8K: the number after "The final answer is: " if present, else the last number in the
  response (commas removed), compared as floats with the gold answer's.

The peers evaluate the first 1000 test rows (all 872 of SST-2 validation).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from refjax.data.records import Example
from refjax.data.sources import AGNEWS_LABELS, SST2_LABELS, TASKS
PEER_EVAL_LIMIT = 1000  # pred_eval.py: `if index < 1000`
PEER_MAX_NEW_TOKENS = 200  # pred_eval.py: greedy, generate(max_new_tokens=200)
GSM8K_ANSWER_PROMPT = "The final answer is: "  # the peers replace "####" with this

_SST2_WORDS = {"positive": ("positive", "Positive"), "negative": ("negative", "Negative")}
_AGNEWS_WORDS = {"World": ("World", "world"), "Sports": ("Sports", "sports"),
                 "Business": ("Business", "business"), "Sci/Tech": ("Sci/Tech", "sci")}
_NUMBER = re.compile(r"-?\d+\.?\d*")


def _label_name(label: str | int, names: tuple[str, ...], task: str) -> str:
  if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
    return names[label]
  if isinstance(label, str) and label in names:
    return label
  if isinstance(label, str) and label.isdigit() and int(label) < len(names):
    return names[int(label)]
  raise ValueError(f"{task} label {label!r}; expected one of {names} or its id 0..{len(names)-1}")


def sst2_correct(response: str, label: str | int) -> bool:
  """Stripped response equals "positive"/"Positive" (or the negative pair) for the gold label."""
  return response.strip() in _SST2_WORDS[_label_name(label, SST2_LABELS, "sst2")]


def ag_news_correct(response: str, label: str | int) -> bool:
  """Stripped response equals the class name or its lower-case form ("sci" for Sci/Tech)."""
  return response.strip() in _AGNEWS_WORDS[_label_name(label, AGNEWS_LABELS, "ag_news")]


def extract_answer_number(sentence: str) -> float:
  """The peers' GSM8K number extraction; inf when the text has no number."""
  sentence = sentence.replace(",", "")
  numbers = _NUMBER.findall(sentence)
  if not numbers:
    return float("inf")
  segments = sentence.split(GSM8K_ANSWER_PROMPT)
  if len(segments) > 1:
    after = _NUMBER.findall(segments[1])
    answer = after[0] if after else numbers[-1]
  else:
    answer = numbers[-1]
  try:
    return float(answer)
  except ValueError:
    return float("inf")


def gsm8k_correct(response: str, gold: str) -> bool:
  """Extracted numbers are equal; `gold` is the final number or a full answer with "####"."""
  truth = extract_answer_number(gold.replace("####", GSM8K_ANSWER_PROMPT))
  return extract_answer_number(response) == truth


SCORERS: dict[str, Callable[[str, Any], bool]] = {
  "sst2": sst2_correct, "ag_news": ag_news_correct, "gsm8k": gsm8k_correct}
if set(SCORERS) != set(TASKS):
  raise ImportError(f"task scorers {sorted(SCORERS)} do not match the task table {sorted(TASKS)}")


def task_of(source: str) -> str:
  """Maps a source name (e.g. "sst2_test", "ag_news_test") to its task name."""
  for task in TASKS:
    if source == task or source.startswith(task + "_"):
      return task
  raise ValueError(f"no task metric for source {source!r}; expected a name starting with one of "
                   f"{tuple(TASKS)}")


def score_task(task: str, responses: Sequence[str], labels: Sequence[Any], *,
               ids: Sequence[str]) -> dict[str, Any]:
  """Accuracy (%) and per-example records [{id, label, response, correct}] for one task."""
  if task not in SCORERS:
    raise ValueError(f"task={task!r}; expected one of {tuple(TASKS)}")
  if not len(responses) == len(labels) == len(ids):
    raise ValueError(f"{len(responses)} responses, {len(labels)} labels, {len(ids)} ids; "
                     "expected equal lengths")
  if not responses:
    raise ValueError(f"no {task} responses to score; accuracy of an empty set is undefined")
  scorer = SCORERS[task]
  records = []
  for i, response, label in zip(ids, responses, labels):
    if label is None:
      raise ValueError(f"example {i!r} has no gold label")
    records.append({"id": i, "label": label, "response": response,
                    "correct": bool(scorer(response, label))})
  n_correct = sum(r["correct"] for r in records)
  return {"task": task, "accuracy": 100.0 * n_correct / len(records), "n": len(records),
          "n_correct": n_correct, "records": records}


def task_accuracy(task: str, examples: Sequence[Example], responses: Sequence[str]
                  ) -> dict[str, Any]:
  """FA of `responses` to `examples` (their `label` is the gold answer), as `score_task`."""
  if len(examples) != len(responses):
    raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
  return score_task(task, responses, [e.label for e in examples], ids=[e.id for e in examples])
