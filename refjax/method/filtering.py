"""Filtering user data with the frozen teacher: cosine scores, threshold calibration, keep mask
and the decision metrics.

A prompt whose score `cos(f_l(x), R_l)` is >= the threshold is dropped as harmful. Drops become a
keep mask / zero weights of the same length as the data (static shapes); the filter stage writes
every decision to its report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.data.batches import prompt_batches
from refjax.data.mixture import BENIGN, HARMFUL
from refjax.data.prompts import BUCKETS, PromptFormat
from refjax.method.features import score_batches
from refjax.method.refusal import auroc

DEFAULT_TARGET_RECALL = 0.95  # the paper tunes for harmful recall; our default target


def score_prompts(model: nnx.Module, examples: Sequence[Any], prompt_format: PromptFormat,
                  layer: int, feature: np.ndarray | jax.Array, *, batch_size: int = 16,
                  max_len: int = 512, buckets: Sequence[int] = BUCKETS,
                  progress: bool = True, share_prefix: bool = False) -> np.ndarray:
  """Cosine [N] of each example's prompt feature at `layer` with the refusal feature.

  `feature` is either the direction [D] or the whole artifact [L+1,D] (row `layer` is used).
  Batches are fixed-shape and padding rows are masked, so jit compiles once per length bucket.
  """
  if not examples:
    raise ValueError("score_prompts got no examples")
  feature = np.asarray(jax.device_get(feature), np.float32)
  if feature.ndim == 2:
    if not 0 <= layer < feature.shape[0]:
      raise ValueError(f"layer={layer}; the feature has rows 0..{feature.shape[0] - 1}")
    feature = feature[layer]
  if feature.ndim != 1:
    raise ValueError(f"feature has shape {feature.shape}; expected [D] or [L+1, D]")
  batches = prompt_batches(examples, prompt_format, batch_size=batch_size, max_len=max_len,
                           buckets=buckets, share_prefix=share_prefix)
  scores = score_batches(model, batches, feature[None], layers=(layer,), progress=progress,
                         desc="filter scores")
  return scores[0]


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A threshold and what it achieved on the labelled calibration prompts."""

  threshold: float
  target_recall: float
  recall: float  # harmful prompts with score >= threshold / harmful prompts
  fpr: float  # harmless prompts with score >= threshold / harmless prompts
  n_harmful: int
  n_harmless: int

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def calibrate_threshold(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int],
                        target_recall: float = DEFAULT_TARGET_RECALL) -> Calibration:
  """The highest threshold (fewest harmless drops) whose harmful recall is >= target_recall.

  labels [N]: 1 harmful, 0 harmless. The threshold is one of the harmful scores: the k-th largest
  with k = ceil(target_recall · n_harmful), so ties can only raise the achieved recall.
  """
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels).astype(bool)
  if s.ndim != 1 or s.shape != y.shape:
    raise ValueError(f"scores {s.shape} and labels {y.shape}; expected two [N] arrays")
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(f"target_recall={target_recall}; expected 0 < target_recall <= 1")
  if not np.all(np.isfinite(s)):
    raise ValueError("calibration scores contain NaN or inf")
  pos, neg = s[y], s[~y]
  if pos.size == 0:
    raise ValueError("calibration needs harmful prompts; got none")
  threshold = _kth_largest(pos, target_recall)
  recall = float(np.mean(pos >= threshold))
  fpr = float(np.mean(neg >= threshold)) if neg.size else float("nan")
  return Calibration(threshold, float(target_recall), recall, fpr, int(pos.size), int(neg.size))


def keep_weights(scores: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """1.0 where score < threshold (kept), 0.0 where dropped; same shape as scores (jit-safe)."""
  return jnp.where(scores >= threshold, 0.0, 1.0).astype(jnp.float32)


def apply_filter(examples: Sequence[Any], scores: np.ndarray | Sequence[float],
                 threshold: float) -> np.ndarray:
  """Keep mask [N] (bool) over the examples: score >= threshold is dropped as harmful.

  The mask has the data's length (drops become zero weights, never a shorter array). A filter
  that would drop every example raises instead of returning an empty training set.
  """
  s = np.asarray(scores, np.float64)
  if s.shape != (len(examples),):
    raise ValueError(f"scores shape {s.shape}; expected ({len(examples)},), one per example")
  if not math.isfinite(threshold):
    raise ValueError(f"threshold={threshold}; expected a finite number")
  if np.isnan(s).any():
    raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN")
  keep = np.asarray(keep_weights(jnp.asarray(s), threshold)) > 0
  if not keep.any():
    raise ValueError(f"the filter drops all {len(examples)} examples (threshold={threshold:.4g}, "
                     f"lowest score={s.min():.4g}): scores at or above the threshold are "
                     "dropped, so raise filter.threshold above the lowest score, or lower "
                     "filter.target_recall")
  return keep


def provenance_metrics(scores: np.ndarray, keep: np.ndarray,
                       provenance: Sequence[str]) -> dict[str, Any]:
  """Counts per provenance tag; with harmful/benign tags on every row, the drop decision's
  precision, recall and FPR for harmful rows and the scores' AUROC."""
  keep = np.asarray(keep).astype(bool)
  tags = sorted(set(provenance))
  out: dict[str, Any] = {"by_provenance": {
      t or "untagged": {"n": int(sum(p == t for p in provenance)),
                        "dropped": int(sum((p == t) and not k for p, k in zip(provenance, keep)))}
      for t in tags}}
  if not set(tags) <= {HARMFUL, BENIGN}:
    return out
  harmful = np.array([p == HARMFUL for p in provenance])
  dropped = ~keep
  tp = int((dropped & harmful).sum())
  out["precision"] = tp / int(dropped.sum()) if dropped.any() else None
  out["recall"] = tp / int(harmful.sum()) if harmful.any() else None
  out["fpr"] = int((dropped & ~harmful).sum()) / int((~harmful).sum()) if (~harmful).any() else None
  out["auroc"] = auroc(scores, harmful) if harmful.any() and (~harmful).any() else None
  return out


CALIBRATION_RULES = ("pooled", "per_source")  # filter.calibration_rule


def _kth_largest(s: np.ndarray, target_recall: float) -> float:
  k = max(1, math.ceil(target_recall * s.size - 1e-9))
  return float(np.sort(s)[::-1][k - 1])


def rate_at(scores: np.ndarray | Sequence[float], threshold: float) -> float:
  """Share of scores >= threshold (recall on harmful sets, FPR on benign ones); nan if empty."""
  s = np.asarray(scores, np.float64)
  return float(np.mean(s >= threshold)) if s.size else float("nan")


def calibrate(harmful_by_source: Mapping[str, np.ndarray], target_recall: float = 0.95,
              rule: str = "pooled") -> float:
  """Threshold from harmful calibration scores: "pooled" = the k-th largest of all (the rule of
  `calibrate_threshold`); "per_source" = the lowest of each source's own threshold, so every
  calibration source reaches the target recall."""
  parts = [np.asarray(v, np.float64) for v in harmful_by_source.values() if len(v)]
  if not parts:
    raise ValueError("calibration needs harmful prompts; got none")
  if rule == "pooled":
    return _kth_largest(np.concatenate(parts), target_recall)
  if rule == "per_source":
    return min(_kth_largest(p, target_recall) for p in parts)
  raise ValueError(f"rule={rule!r}; expected one of {CALIBRATION_RULES}")


def calibrate_fpr(harmless_scores: np.ndarray | Sequence[float], max_fpr: float = 0.05) -> float:
  """The lowest threshold whose FPR on harmless calibration scores is <= max_fpr (fixes the
  false-positive budget instead of the recall)."""
  s = np.sort(np.asarray(harmless_scores, np.float64))[::-1]
  k = int(math.floor(max_fpr * s.size + 1e-9))  # at most k harmless rows may score >= threshold
  return float(np.nextafter(s[k], np.inf)) if k < s.size else float(s[-1])


__all__ = ["score_prompts", "Calibration", "calibrate_threshold", "keep_weights", "apply_filter",
           "provenance_metrics", "DEFAULT_TARGET_RECALL", "CALIBRATION_RULES", "rate_at",
           "calibrate", "calibrate_fpr"]
