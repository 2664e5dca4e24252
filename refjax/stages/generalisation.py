"""Stage `generalisation` (issue 15): how the run's filter does on harmful requests of sources it
never saw, in wordings it never saw, and on benign rows, at the run's own threshold.

Scores, with the filter's scorer (`refjax.stages.scorer`), the eval-only harmful sources (never
seen by the teacher, the probe, the layer choice or the threshold; plus `data.holdout_source` and
any trainable source the run's alignment data does not use),
wrapped versions of those prompts (evaluation variants only), each task's benign test rows
rendered as the filter renders user data, generic harmless instructions and benign-but-edgy
requests. Any of them that near-duplicates a prompt the run trained, probed or calibrated on is
dropped first (counted). Reads teacher/, refusal/, filter/; writes refusal/generalisation.json.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from refjax.data.dedup import DupIndex
from refjax.data.filter_sources import (FROM_REGISTRY, GENERIC_HARMLESS, HARMFUL_EVAL_ONLY,
                                        HARMFUL_TRAINABLE, TASK_BENIGN_EVAL)
from refjax.data.folds import make_fold
from refjax.data.teacher_mix import mix_names
from refjax.data.wrappers import EVAL_VARIANTS, wrap_set
from refjax.files import read_json, write_json
from refjax.method.generalisation import generalisation
from refjax.stages.context import Run
from refjax.stages.scorer import Scorer

log = logging.getLogger(__name__)
IN_DISTRIBUTION = "beavertails_eval"  # unseen rows of the alignment data's own distribution


def run(r: Run) -> dict:
  cfg, wd, gc = r.cfg, r.wd, r.cfg.generalisation
  threshold = float(read_json(r.require(wd.filter_summary, "filter"))["threshold"])
  held_out = cfg.data.holdout_source or None
  seen_sources = mix_names(cfg.data.alignment_mix) or [
      FROM_REGISTRY[n] for n in (cfg.data.alignment_harmful,) if n in FROM_REGISTRY]
  unseen = [s for s in HARMFUL_TRAINABLE if s not in seen_sources and s != held_out]
  fold = make_fold(r.sets.pools(), held_out, harmful_sources=seen_sources,
                   unseen_eval=(*unseen, *HARMFUL_EVAL_ONLY))
  seen = DupIndex(e.instruction for e in (r.sets.alignment() + r.sets.probe()
                                          + r.sets.validation() + r.sets.calibration()))
  dropped = {}

  def unseen_rows(rows, n):
    keep = [p for p in rows if not seen.hit(p.instruction)]
    dropped[rows[0].source if rows else "?"] = len(rows) - len(keep)
    return keep[:n]

  harmful = {s: unseen_rows(rows, int(gc.n_source)) for s, rows in fold.eval_harmful.items()}
  in_dist = harmful.pop(IN_DISTRIBUTION, [])
  benign = {s: rows[:int(gc.n_benign)] for s, rows in fold.eval_benign.items()}
  wrapped = wrap_set([p for rows in harmful.values() for p in rows], variants=EVAL_VARIANTS,
                     per_family=int(gc.wrap_per_family), seed=int(cfg.seed))
  groups: dict[str, dict[str, list]] = {"unseen": harmful, "benign": benign, "wrapped": {}}
  for p in wrapped:
    groups["wrapped"].setdefault(p.wrapper.split("/")[0], []).append(p)
  groups["in_dist"] = {IN_DISTRIBUTION: in_dist}
  everything = [p for g in groups.values() for rows in g.values() for p in rows]
  score = Scorer(r)
  scores = dict(zip((p.id for p in everything),
                    score([p.to_example() for p in everything])))  # one pass, unique ids
  s: dict[str, Any] = {g: {k: np.array([scores[p.id] for p in rows]) for k, rows in d.items()}
                       for g, d in groups.items()}
  out = generalisation(threshold, s["unseen"], s["benign"], s["wrapped"],
                       reference=GENERIC_HARMLESS, task_benign=TASK_BENIGN_EVAL[cfg.data.task],
                       in_distribution=(IN_DISTRIBUTION, s["in_dist"][IN_DISTRIBUTION]))
  out.update(scorer=cfg.filter.scorer, layer=score.layer, held_out=held_out,
             seen_sources=sorted(fold.train_harmful),
             dropped_as_seen={k: v for k, v in dropped.items() if v},
             dropped_as_near_duplicates={k: v for k, v in
                                         fold.dropped_as_near_duplicates.items() if v})
  write_json(wd.generalisation, out)
  sm = out["summary"]
  log.info("generalisation: unseen AUROC min %s, recall min %s, FPR generic %s, wrapped recall "
           "min %s; goals met %d of %d", sm["auroc_min"], sm["recall_min"], sm["fpr_generic"],
           sm["wrapped_recall_min"], sum(bool(g["met"]) for g in out["goals"].values()),
           len(out["goals"]))
  return {k: v for k, v in sm.items()}
