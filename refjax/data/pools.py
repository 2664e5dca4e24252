"""The protocol's per-source pools: every filter source loaded (never the user poison pool),
cross-source duplicates removed, each trainable source cut into disjoint train / calib / test
parts, deterministically by seed.

Duplicate rules, in table order: a trainable harmful row that near-duplicates an eval-only harmful
row is dropped (HarmBench beats TDC, DeRTa beats AdvBench), so eval rows are never trained on;
task train pools skip every row the user data of that task can be drawn from (SST-2 train rows
< 5000, GSM8K train rows < 2000, and AG News description-only rows whose article is among the
user-data rows of task ag_news).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from refjax.data.dedup import DupIndex, norm_text
from refjax.data.filter_sources import (EDGY, EDGY_EVAL, FILTER_SOURCES, HARMFUL, Prompt,
                                        edgy_benign, load_prompts, stable_perm)
from refjax.data.records import read_examples
from refjax.data.sources import ALPACA, TASKS, SOURCES

# Rows per part for trainable sources (train = probe + regulariser data, calib = threshold,
# test = seen-source evaluation); evaluation-only sources give up to `DEFAULT_EVAL_CAP` rows.
DEFAULT_PARTS = {
    "beavertails": (400, 100, 0), "stl_alignment": (400, 100, 100), "advbench": (250, 60, 100),
    "malicious_instruct": (50, 18, 20), "tdc2023": (30, 10, 13),
    "alpaca_instructions": (400, 0, 0), "alpaca_calibration": (0, 300, 0),
    "alpaca_helpful": (400, 0, 0), "sst2_train": (150, 100, 0), "ag_news_train": (150, 100, 0),
    "gsm8k_train": (150, 100, 0),
}
DEFAULT_EVAL_CAP = {"beavertails_eval": 200, "stl_cona": 100, "alpaca_test": 300,
                    "sst2_test": 200, "ag_news_test": 200, "gsm8k_test": 200}
# Task train rows user data may be drawn from (refjax.data.sets: the first data.user_n rows).
USER_ROWS_SKIPPED = {"sst2_train": 5000, "gsm8k_train": 2000}


@dataclasses.dataclass
class Pools:
  """Disjoint parts per source: parts[name] = {"train": [...], "calib": [...], "test": [...]}."""

  parts: dict[str, dict[str, list[Prompt]]]
  dropped_duplicates: dict[str, int]

  def rows(self, name: str, part: str) -> list[Prompt]:
    return self.parts.get(name, {}).get(part, [])


def _ag_news_user_rows(data_root: Path) -> list[str]:
  """The inputs of every row task ag_news can take user data from (its whole train file)."""
  spec = SOURCES[TASKS["ag_news"].train].local["train"]
  examples, _ = read_examples(Path(data_root) / spec.file, ALPACA, source="ag_news_user")
  return [e.input for e in examples]


def build_pools(data_root: str | Path, *, seed: int = 0,
                parts: Mapping[str, tuple[int, int, int]] = DEFAULT_PARTS,
                eval_cap: Mapping[str, int] = DEFAULT_EVAL_CAP) -> Pools:
  """Loads every source but the poison pool, removes duplicates, cuts the parts (see module)."""
  raw = {n: load_prompts(n, data_root) for n, s in FILTER_SOURCES.items() if s.use != "never"}
  dropped: dict[str, int] = {}
  for n, skip in USER_ROWS_SKIPPED.items():
    raw[n] = raw[n][skip:]
  user_idx = DupIndex(_ag_news_user_rows(data_root))  # research: 62 such rows in the sample
  user_ag = [user_idx.hit(p.input) for p in raw["ag_news_train"]]
  raw["ag_news_train"] = [p for p, hit in zip(raw["ag_news_train"], user_ag) if not hit]
  dropped["ag_news_train/user_data"] = sum(user_ag)
  for n, rows in raw.items():  # within-source exact duplicates: keep the first
    seen, keep = set(), []
    for p in rows:
      k = norm_text(p.instruction + " " + p.input)
      if k not in seen:
        seen.add(k)
        keep.append(p)
    dropped[n] = len(rows) - len(keep)
    raw[n] = keep
  eval_harmful = [n for n, s in FILTER_SOURCES.items() if s.use == "eval" and s.label == HARMFUL]
  idx = DupIndex(p.instruction for n in eval_harmful for p in raw[n])
  for n, s in FILTER_SOURCES.items():
    if s.use == "train" and s.label == HARMFUL:
      keep = [p for p in raw[n] if not idx.hit(p.instruction)]
      dropped[n] += len(raw[n]) - len(keep)
      raw[n] = keep
  out: dict[str, dict[str, list[Prompt]]] = {}
  for n, rows in raw.items():
    perm = [rows[i] for i in stable_perm([p.id for p in rows], seed)]
    if FILTER_SOURCES[n].use == "train":
      a, b, c = parts.get(n, (len(perm), 0, 0))
      if a + b + c > len(perm):  # small sources: shrink train first
        a = max(0, len(perm) - b - c)
      out[n] = {"train": perm[:a], "calib": perm[a:a + b], "test": perm[a + b:a + b + c]}
    else:
      out[n] = {"test": perm[:eval_cap.get(n, len(perm))]}
  out[EDGY] = {"train": edgy_benign("train")}
  out[EDGY_EVAL] = {"test": edgy_benign("eval")}
  pools = Pools(out, dropped)
  assert_disjoint(pools)
  return pools


def assert_disjoint(pools: Pools) -> None:
  """No id is in two parts (of one source or of two)."""
  seen: dict[str, str] = {}
  for n, parts in pools.parts.items():
    for part, rows in parts.items():
      for p in rows:
        if p.id in seen:
          raise AssertionError(f"id {p.id} in {seen[p.id]} and {n}/{part}")
        seen[p.id] = f"{n}/{part}"


__all__ = ["Pools", "build_pools", "assert_disjoint", "DEFAULT_PARTS", "DEFAULT_EVAL_CAP",
           "USER_ROWS_SKIPPED"]
