"""The filter-generalisation protocol's prompt sources (issue 15): one table, each upstream prompt
collection with its file under the data root, its fields and its role.

A *source* is an upstream collection (AdvBench, MaliciousInstruct, TDC 2023, HarmBench val,
BeaverTails, safety-tuned-llamas training / each eval set, DeRTa), not a file:
`refusal_direction/harmful_train.jsonl` is a split drawn from the `processed_*` pools (116
AdvBench + all 88 MaliciousInstruct + 53 TDC rows, by exact match), so it is not a source here.

Roles (`Source.role`): harmful trainable (may feed the probe, the regulariser's data and the
calibration set), harmful eval-only and harmless eval-only (never probe, train or calibrate),
harmless trainable, and never (the user poison pool: not loaded at all).

Data is read in place (`refjax.data.paths`); nothing here prints prompt text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

from refjax.data.edgy_benign import EDGY_BENIGN, EDGY_TRAIN_ROWS
from refjax.data.records import Example

HARMFUL, HARMLESS = "harmful", "harmless"
ROLES = ("harmful trainable", "harmful eval-only", "harmless trainable", "harmless eval-only",
         "never")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt as the filter sees it: instruction (+ task input), rendered by the chat format
  exactly like user data. `response` only for training rows; `wrapper` "<family>/<variant>"."""

  id: str
  instruction: str
  input: str = ""
  label: str = HARMFUL  # harmful | harmless (the role)
  source: str = ""
  wrapper: str = ""
  response: str = ""

  def to_example(self) -> Example:
    return Example(id=self.id, instruction=self.instruction, input=self.input,
                   response=self.response, label=self.label, source=self.source)


@dataclasses.dataclass(frozen=True)
class Source:
  """use: "train" (probe / regulariser data / calibration), "eval" (evaluation only), "never".
  family: sources sharing an upstream origin (near-duplicates across them are removed)."""

  name: str
  file: str
  label: str
  use: str
  family: str
  instruction: str = "prompt"  # field holding the instruction
  input: str | None = None  # field holding the task input, if any
  response: str | None = None
  where: tuple[str, str] | None = None  # (field, value) row filter
  note: str = ""

  @property
  def role(self) -> str:
    return "never" if self.use == "never" else (
        f"{self.label} {'trainable' if self.use == 'train' else 'eval-only'}")


FILTER_SOURCES: dict[str, Source] = {s.name: s for s in [
    # --- harmful, trainable
    Source("beavertails", "beavertails_refusals_spard/alignment_refusal.jsonl", HARMFUL, "train",
           "anthropic_redteam", response="response",
           note="BeaverTails 30k_train prompts (HH red-team origin); the alignment pool only"),
    Source("stl_alignment", "safety_tuned_llamas/alignment_refusal.jsonl", HARMFUL, "train",
           "anthropic_redteam", response="response",
           note="Bianchi et al. safety-only instructions (Anthropic red-team origin)"),
    Source("advbench", "refusal_direction/processed_advbench.filtered.jsonl", HARMFUL, "train",
           "advbench", note="includes the 116 AdvBench rows of harmful_train"),
    Source("malicious_instruct", "refusal_direction/processed_malicious_instruct.filtered.jsonl",
           HARMFUL, "train", "malicious_instruct", note="all 88 rows are also in harmful_train"),
    Source("tdc2023", "refusal_direction/processed_tdc2023.filtered.jsonl", HARMFUL, "train",
           "cais", note="7 rows equal HarmBench val rows; dropped here (HarmBench is eval-only)"),
    # --- harmful, evaluation only
    Source("beavertails_eval", "beavertails_refusals_spard/harmful_eval_dev.jsonl", HARMFUL, "eval",
           "anthropic_redteam", note="HS dev prompts: in-distribution recall only"),
    Source("harmbench_val", "refusal_direction/harmful_val.jsonl", HARMFUL, "eval", "cais"),
    Source("derta", "derta/harmful_eval_illegal_instructions.jsonl", HARMFUL, "eval", "derta"),
    Source("stl_cona", "safety_tuned_llamas/eval_prompts.jsonl", HARMFUL, "eval", "stl_cona",
           where=("set", "I-CoNa"), note="hate-speech counter-narrative prompts"),
    Source("stl_controversial", "safety_tuned_llamas/eval_prompts.jsonl", HARMFUL, "eval",
           "stl_controversial", where=("set", "I-Controversial")),
    Source("stl_malicious", "safety_tuned_llamas/eval_prompts.jsonl", HARMFUL, "eval",
           "stl_malicious", where=("set", "I-MaliciousInstructions")),
    Source("stl_physical_unsafe", "safety_tuned_llamas/eval_prompts.jsonl", HARMFUL, "eval",
           "stl_physical", where=("set", "I-PhysicalSafetyUnsafe")),
    Source("stl_qharm", "safety_tuned_llamas/eval_prompts.jsonl", HARMFUL, "eval",
           "anthropic_redteam", where=("set", "Q-Harm"),
           note="HH-RLHF questions; 16 equal BeaverTails alignment prompts (dropped when those "
                "train)"),
    Source("beavertails_user_poison", "beavertails_refusals_spard/harmful_qa.jsonl", HARMFUL,
           "never", "anthropic_redteam", note="the user poison pool: never probe/train/calibrate"),
    # --- harmless, trainable
    Source("alpaca_instructions", "refusal_direction/harmless_train.jsonl", HARMLESS, "train",
           "alpaca"),
    Source("alpaca_calibration", "refusal_direction/harmless_val.jsonl", HARMLESS, "train",
           "alpaca", note="harmless side of the calibration set"),
    Source("alpaca_helpful", "alpaca/helpful.jsonl", HARMLESS, "train", "alpaca",
           instruction="instruction", input="input", response="response"),
    Source("sst2_train", "sst2/train_first10k.jsonl", HARMLESS, "train", "sst2",
           instruction="instruction", input="input", response="response"),
    Source("ag_news_train", "ag_news/train_alps_random10k_description_only.jsonl", HARMLESS,
           "train", "ag_news", instruction="instruction", input="input", response="response",
           note="description-only AG News train sample (test has title + description)"),
    Source("gsm8k_train", "gsm8k/train.jsonl", HARMLESS, "train", "gsm8k",
           instruction="instruction", response="response"),
    # --- harmless, evaluation only
    Source("alpaca_test", "refusal_direction/harmless_test_dev.jsonl", HARMLESS, "eval", "alpaca"),
    Source("sst2_test", "sst2/validation.jsonl", HARMLESS, "eval", "sst2",
           instruction="instruction", input="input"),
    Source("ag_news_test", "ag_news/test.jsonl", HARMLESS, "eval", "ag_news",
           instruction="instruction", input="input"),
    Source("gsm8k_test", "gsm8k/test.jsonl", HARMLESS, "eval", "gsm8k", instruction="instruction"),
    Source("stl_physical_safe", "safety_tuned_llamas/eval_prompts.jsonl", HARMLESS, "eval",
           "stl_physical", where=("set", "I-PhysicalSafetySafe"),
           note="benign-but-edgy safety questions"),
]}
# The registry sources (refjax.data.sources) the paper's single-source alignment set may use, as
# the protocol sources they are rows of.
FROM_REGISTRY = {"beavertails_alignment": "beavertails",
                 "safety_tuned_llamas_alignment": "stl_alignment"}
EDGY, EDGY_EVAL = "edgy_benign", "edgy_benign_eval"  # written here (refjax.data.edgy_benign)


def names(role: str) -> tuple[str, ...]:
  """The sources of one role, in table order."""
  if role not in ROLES:
    raise ValueError(f"role={role!r}; expected one of {ROLES}")
  return tuple(n for n, s in FILTER_SOURCES.items() if s.role == role)


HARMFUL_TRAINABLE = names("harmful trainable")
HARMFUL_EVAL_ONLY = names("harmful eval-only")
BENIGN_EVAL = names("harmless eval-only") + (EDGY_EVAL,)
TASK_BENIGN_EVAL = {"sst2": "sst2_test", "ag_news": "ag_news_test", "gsm8k": "gsm8k_test"}
GENERIC_HARMLESS = "alpaca_test"  # generic harmless instructions: the AUROC reference


def _read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def load_prompts(name: str, data_root: str | Path) -> list[Prompt]:
  """Every row of a source as Prompts (ids `name:idx`), in file order."""
  src = FILTER_SOURCES[name]
  if src.use == "never":
    raise ValueError(f"source {name!r} is never loaded by the protocol ({src.note})")
  out = []
  for i, r in enumerate(_read_jsonl(Path(data_root) / src.file)):
    if src.where and r.get(src.where[0]) != src.where[1]:
      continue
    out.append(Prompt(id=f"{name}:{r.get('idx', i)}", instruction=r[src.instruction],
                      input=(r.get(src.input) or "") if src.input else "", label=src.label,
                      source=name, response=(r.get(src.response) or "") if src.response else ""))
  return out


def edgy_benign(split: str) -> list[Prompt]:
  """The written benign-but-edgy requests: split "train" (rows < 30) or "eval" (the rest)."""
  rows = range(EDGY_TRAIN_ROWS) if split == "train" else range(EDGY_TRAIN_ROWS, len(EDGY_BENIGN))
  return [Prompt(id=f"{EDGY}:{i}", instruction=EDGY_BENIGN[i], label=HARMLESS,
                 source=EDGY if split == "train" else EDGY_EVAL) for i in rows]


def stable_perm(ids: Sequence[str], seed: int) -> list[int]:
  """A seeded order of `ids` that does not depend on their position (sha256 of seed and id)."""
  key = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids]
  return sorted(range(len(ids)), key=lambda k: key[k])


__all__ = ["Prompt", "Source", "FILTER_SOURCES", "ROLES", "HARMFUL", "HARMLESS", "names",
           "HARMFUL_TRAINABLE", "HARMFUL_EVAL_ONLY", "BENIGN_EVAL", "TASK_BENIGN_EVAL",
           "GENERIC_HARMLESS", "FROM_REGISTRY", "EDGY", "EDGY_EVAL", "load_prompts", "edgy_benign", "stable_perm"]
