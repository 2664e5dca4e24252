"""Stage `filter`: the frozen teacher scores every user prompt with the configured scorer
(`refjax.stages.scorer`: cosine with R_l, a logistic probe or max cosine, fitted here); prompts at
or above the threshold (fixed, or calibrated to a harmful recall on held-out labelled prompts,
pooled or per source) are dropped.

Reads teacher/model and refusal/; writes filter/filter_report.jsonl (every example: id, score,
decision, provenance; never its text), filter/filter_summary.json and the scorer's fit.
"""

from __future__ import annotations

import dataclasses
import math

from refjax.data.batches import harmful_labels
from refjax.method.filtering import apply_filter, calibrate, calibrate_threshold, rate_at
from refjax.stages.context import Run
from refjax.stages.scorer import Scorer


def run(r: Run) -> dict:
  cfg, wd = r.cfg, r.wd
  fc = cfg.filter
  score = Scorer(r)
  fit = score.fit()
  user = r.sets.user()
  scores = score(user)
  calibration = None
  if math.isnan(float(fc.threshold)):
    calib = r.sets.calibration()
    c_scores, labels = score(calib), harmful_labels(calib)
    calibration = calibrate_threshold(c_scores, labels, float(fc.target_recall))
    if fc.calibration_rule != "pooled":
      by_source: dict[str, list] = {}
      for e, s in zip(calib, c_scores):
        if e.label == "harmful":
          by_source.setdefault(e.source, []).append(s)
      t = calibrate(by_source, float(fc.target_recall), fc.calibration_rule)
      calibration = dataclasses.replace(calibration, threshold=t,
                                        recall=rate_at(c_scores[labels == 1], t),
                                        fpr=rate_at(c_scores[labels == 0], t))
    threshold = float(calibration.threshold)
  else:
    threshold = float(fc.threshold)
  keep = apply_filter(user, scores, threshold)
  summary = score.write(wd.filter_report, wd.filter_summary, user, scores, keep, threshold,
                        calibration)
  return {**{k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, **fit,
          "scorer": fc.scorer}
