"""Stage `filter`: the frozen teacher scores every user prompt; prompts at or above the threshold
(fixed, or calibrated to a harmful recall on held-out labelled prompts) are dropped.

Reads teacher/model and refusal/; writes filter/filter_report.jsonl (every example: id, score,
decision, provenance; never its text) and filter/filter_summary.json.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from refjax.data.batches import harmful_labels
from refjax.data.prompts import template_markers
from refjax.files import write_json, write_jsonl
from refjax.method.filtering import (Calibration, apply_filter, calibrate_threshold,
                                     provenance_metrics, score_prompts)
from refjax.stages.context import Run
from refjax.stages.workdir import load_refusal_feature


class Scorer:
  """A prepared teacher as a filter: its model, prompt format and refusal feature, scoring any
  examples by cos(f_l(x), R_l) exactly as the stage scores user prompts."""

  def __init__(self, r: Run):
    self.r = r
    self.art = load_refusal_feature(r.require(r.wd.refusal, "refusal"))
    self.teacher, _, self.fmt = r.load(r.require(r.wd.teacher_model, "teacher"))

  def __call__(self, examples: Sequence[Any]) -> np.ndarray:
    return score_prompts(self.teacher, examples, self.fmt, self.art.layer, self.art.direction,
                         batch_size=self.r.cfg.filter.batch_size,
                         max_len=self.r.cfg.prompt.max_prompt_len)

  def write(self, report_path, summary_path, examples, scores, keep, threshold, calibration=None):
    """The decision report and summary for `examples` (bound to the text scored)."""
    fmt = self.fmt
    return write_decisions(
        report_path, summary_path, examples, scores, keep, threshold, layer=self.art.layer,
        calibration=calibration,
        text_sha256=[fmt.scored_digest(e.instruction, e.input, e.response) for e in examples],
        markers=[template_markers(e.instruction, e.input) for e in examples])


def run(r: Run) -> dict:
  cfg, wd = r.cfg, r.wd
  fc = cfg.filter
  score = Scorer(r)
  user = r.sets.user()
  scores = score(user)
  calibration = None
  if math.isnan(float(fc.threshold)):
    calib = r.sets.calibration()
    calibration = calibrate_threshold(score(calib), harmful_labels(calib),
                                      float(fc.target_recall))
    threshold = float(calibration.threshold)
  else:
    threshold = float(fc.threshold)
  keep = apply_filter(user, scores, threshold)
  summary = score.write(wd.filter_report, wd.filter_summary, user, scores, keep, threshold,
                        calibration)
  return {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


def write_decisions(report_path, summary_path, examples: Sequence[Any], scores: np.ndarray,
                    keep: np.ndarray, threshold: float, *, layer: int | None = None,
                    calibration: Calibration | None = None,
                    text_sha256: Sequence[str] | None = None,
                    markers: Sequence[Sequence[str]] | None = None,
                    scorer: str = "teacher: cos(f_l(x), R_l)",
                    threshold_rule: str | None = None) -> dict[str, Any]:
  """Writes one report row per example (id, score, decision, provenance, source, the sha256 of the
  text scored, any prompt-section markers the user text holds; never the text) and the summary
  (scorer, counts; precision/recall/AUROC against provenance where present); returns it."""
  n = len(examples)
  scores = np.asarray(scores, np.float64)
  keep = np.asarray(keep).astype(bool)
  if scores.shape != (n,) or keep.shape != (n,):
    raise ValueError(f"scores {scores.shape} and keep {keep.shape}; expected ({n},) each")
  ids = [str(ex.id) for ex in examples]
  if len(set(ids)) != n:
    raise ValueError(f"example ids are not unique ({n - len(set(ids))} repeats); the report is "
                     "keyed by id")
  provenance = [getattr(ex, "provenance", "") or "" for ex in examples]
  rows = []
  for i, ex in enumerate(examples):
    row = {"id": ids[i], "score": float(scores[i]), "kept": bool(keep[i]),
           "decision": "kept" if keep[i] else "dropped"}
    if provenance[i]:
      row["provenance"] = provenance[i]
    if getattr(ex, "source", ""):
      row["source"] = ex.source
    if text_sha256 is not None:
      row["text_sha256"] = text_sha256[i]
    if markers is not None and markers[i]:
      row["template_markers"] = list(markers[i])
    rows.append(row)
  write_jsonl(report_path, rows)
  summary: dict[str, Any] = {
      "n_examples": n, "n_kept": int(keep.sum()), "n_dropped": int((~keep).sum()),
      "scorer": scorer, "threshold": float(threshold),
      "threshold_rule": threshold_rule or ("fixed" if calibration is None else "calibrated"),
      "calibration": calibration.as_dict() if calibration else None, "layer": layer,
      "score_mean": float(scores.mean()) if n else None,
      "n_with_template_markers": sum(bool(m) for m in markers) if markers is not None else None,
      **provenance_metrics(scores, keep, provenance)}
  write_json(summary_path, summary)
  return summary
