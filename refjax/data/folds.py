"""Leave-one-source-out folds of the protocol's pools: the held-out source gives no row to the
probe, the regulariser's data or the calibration set; all its rows are evaluated, minus
near-duplicates of any train/calib row; `assert_fold` checks id-level disjointness of train,
calib and eval and that the user poison pool never appears."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from refjax.data.dedup import DupIndex
from refjax.data.filter_sources import (BENIGN_EVAL, HARMFUL_EVAL_ONLY, HARMFUL_TRAINABLE,
                                        Prompt)
from refjax.data.pools import Pools

POISON = "beavertails_user_poison"  # refjax.data.filter_sources: role "never"


@dataclasses.dataclass
class Fold:
  """One leave-one-source-out fold. `held_out` is None for the all-sources fit."""

  held_out: str | None
  train_harmful: dict[str, list[Prompt]]  # per source (probe + regulariser data)
  train_harmless: dict[str, list[Prompt]]
  calib_harmful: dict[str, list[Prompt]]
  calib_harmless: dict[str, list[Prompt]]
  eval_harmful: dict[str, list[Prompt]]  # unseen sources (held-out + eval-only), deduped
  eval_benign: dict[str, list[Prompt]]
  dropped_as_near_duplicates: dict[str, int]


def make_fold(pools: Pools, held_out: str | None, *,
              harmful_sources: Sequence[str] = HARMFUL_TRAINABLE,
              harmless_sources: Sequence[str] = ("alpaca_instructions",),
              calib_harmless: Sequence[str] = ("alpaca_calibration",),
              unseen_eval: Sequence[str] = HARMFUL_EVAL_ONLY,
              benign_eval: Sequence[str] = BENIGN_EVAL) -> Fold:
  """Training / calibration from `harmful_sources` minus `held_out`; evaluation on the held-out
  source (all its rows) and every eval-only source, minus near-duplicates of any train/calib row.
  `beavertails_eval` stays in the eval set even when BeaverTails trains (in-distribution row)."""
  train_src = [s for s in harmful_sources if s != held_out]
  train_h = {s: pools.rows(s, "train") for s in train_src}
  calib_h = {s: pools.rows(s, "calib") for s in train_src}
  train_n = {s: pools.rows(s, "train") for s in harmless_sources}
  calib_n = {s: pools.rows(s, "calib") or pools.rows(s, "train") for s in calib_harmless}
  seen_rows = [p for d in (train_h, calib_h) for rows in d.values() for p in rows]
  idx = DupIndex(p.instruction for p in seen_rows)
  eval_src = list(unseen_eval)
  if held_out is not None and held_out not in eval_src:
    eval_src = [held_out] + eval_src
  eval_h, dropped = {}, {}
  for s in eval_src:
    rows = [p for part in ("train", "calib", "test") for p in pools.rows(s, part)]
    keep = [p for p in rows if not idx.hit(p.instruction)]
    eval_h[s], dropped[s] = keep, len(rows) - len(keep)
  eval_b = {s: pools.rows(s, "test") for s in benign_eval}
  fold = Fold(held_out, train_h, train_n, calib_h, calib_n, eval_h, eval_b, dropped)
  assert_fold(fold)
  return fold


def assert_fold(fold: Fold) -> None:
  """Ids of training, calibration and evaluation rows are pairwise disjoint, and the held-out
  source gives no training or calibration row."""
  groups = {
      "train": [p.id for d in (fold.train_harmful, fold.train_harmless) for r in d.values()
                for p in r],
      "calib": [p.id for d in (fold.calib_harmful, fold.calib_harmless) for r in d.values()
                for p in r],
      "eval": [p.id for d in (fold.eval_harmful, fold.eval_benign) for r in d.values() for p in r],
  }
  for a in groups:
    for b in groups:
      if a < b:
        both = set(groups[a]) & set(groups[b])
        assert not both, f"{a} and {b} share {len(both)} ids, e.g. {sorted(both)[0]}"
  if fold.held_out is not None:
    for name in ("train", "calib"):
      bad = [i for i in groups[name] if i.split(":")[0] == fold.held_out]
      assert not bad, f"held-out source {fold.held_out} leaks {len(bad)} rows into {name}"
  poison = [i for g in groups.values() for i in g if i.startswith(POISON + ":")]
  assert not poison, "the user poison pool must not appear in the protocol"


__all__ = ["Fold", "make_fold", "assert_fold"]
