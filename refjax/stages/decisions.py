"""The filter's per-example decision report and summary (teacher filter, judge screen, and the
standalone filter write the same files): ids, scores and decisions, never the text."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from refjax.files import write_json, write_jsonl
from refjax.method.filtering import Calibration, provenance_metrics


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


__all__ = ["write_decisions"]
