"""The numbers behind the notebook and the report: 2-D projections of prompt features, the
filter's ROC, and helpers that load a run's model and prompt sets (`notebooks/refusal_direction.ipynb`
is a thin caller of these, so every number it shows is testable here).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from refjax.data.batches import prompt_batches
from refjax.data.mixture import HARMFUL
from refjax.data.prompts import PromptFormat
from refjax.data.sources import TASKS, load_source
from refjax.method.features import extract_features
from refjax.models.loading import load_model_and_tokenizer


def load_model(cfg, name: str | Path | None = None):
  """(model, prompt format) of config.model, or of another model dir `name` (e.g. the teacher),
  on the default device: what the notebook needs to compute a few dozen prompt features."""
  mc = cfg.model.copy_and_resolve_references()
  if name is not None:
    mc.name = str(name)
  model, tok = load_model_and_tokenizer(mc)
  return model, PromptFormat.from_config(tok, cfg.prompt)


def prompt_sets(cfg, n: int) -> dict[str, list[Any]]:
  """n prompts per set for the projection: the harmful user data (what the filter must catch),
  harmless validation prompts, and the user task's test prompts. Keys name set and source."""
  task_test = TASKS[cfg.data.task].test
  sets = {f"harmful ({cfg.data.harmful_source})": cfg.data.harmful_source,
          f"harmless ({cfg.refusal.val_harmless})": cfg.refusal.val_harmless,
          f"{cfg.data.task} ({task_test})": task_test}
  out = {name: load_source(src, limit=n) for name, src in sets.items()}
  empty = [name for name, exs in out.items() if not exs]
  if empty:
    raise ValueError(f"no prompts in {empty}")
  return out


def prompt_features(model, prompt_format, examples: Sequence[Any], layer: int, *,
                    batch_size: int = 16, max_len: int = 256) -> np.ndarray:
  """Last-prompt-token hidden states [N, D] (fp32) of the examples at one layer.

  Every batch is padded to `max_len`: one compilation per model instead of one per length bucket
  (for a few dozen prompts, compiling costs more than the padding).
  """
  batches = prompt_batches(examples, prompt_format, batch_size=batch_size, max_len=max_len,
                           buckets=(int(max_len),))
  return extract_features(model, batches, layers=(int(layer),), progress=False)[0]


@dataclasses.dataclass(frozen=True)
class Projection:
  """2-D coordinates [N, 2] of features with their labels and what each axis is."""

  coords: np.ndarray
  labels: np.ndarray
  axis_names: tuple[str, str]
  axes: np.ndarray  # [2, D] unit vectors the (centred) features were projected on
  explained: tuple[float, float]  # share of the total variance along each axis


def projection_2d(features: np.ndarray, labels: Sequence[str],
                  direction: np.ndarray | None = None) -> Projection:
  """PCA of features [N, D] to 2-D (numpy SVD of the centred data), or, given the refusal
  feature [D]: x = projection on the normalised feature, y = the residual's first PC."""
  f = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features shape {f.shape}; expected [N >= 2, D]")
  if labels.shape != (f.shape[0],):
    raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels for {f.shape[0]} features")
  centred = f - f.mean(axis=0)
  total = float((centred ** 2).sum()) or 1.0
  if direction is None:
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt[:1], np.zeros_like(vt[:1])])
    coords = centred @ axes.T
    names = ("PC 1", "PC 2")
  else:
    r = np.asarray(direction, np.float64).reshape(-1)
    if r.shape != (f.shape[1],):
      raise ValueError(f"direction shape {r.shape}; expected ({f.shape[1]},)")
    norm = np.linalg.norm(r)
    if not norm > 0:
      raise ValueError("direction is the zero vector")
    r = r / norm
    x = f @ r  # not centred: its sign says which side of the origin the prompt lies
    residual = centred - np.outer(centred @ r, r)
    _, _, vt = np.linalg.svd(residual, full_matrices=False)
    pc = vt[0]
    axes = np.stack([r, pc])
    coords = np.stack([x, residual @ pc], axis=1)
    names = ("projection on the refusal feature", "first PC of the residual")
  explained = tuple(float(((centred @ a) ** 2).sum() / total) for a in axes)
  return Projection(coords=coords, labels=labels, axis_names=names, axes=axes,
                    explained=explained)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class RocCurve:
  """ROC of "score >= t flags harmful": (0,0) to (1,1), its area and the operating point."""

  fpr: np.ndarray
  tpr: np.ndarray
  thresholds: np.ndarray  # thresholds[i] gives (fpr[i], tpr[i]); +inf at the (0,0) start
  auc: float
  point: tuple[float, float] | None  # (fpr, tpr) of the filter's actual keep/drop decisions
  threshold: float | None
  n_harmful: int
  n_benign: int


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, ...]:
  """(fpr, tpr, thresholds) over every distinct score, highest first; ties move both at once."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels).astype(bool)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"ROC needs both classes; got {n_pos} harmful and {n_neg} benign")
  order = np.argsort(-s, kind="mergesort")
  s, y = s[order], y[order]
  last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each run of equal scores
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  fpr = np.r_[0.0, fp / n_neg]
  tpr = np.r_[0.0, tp / n_pos]
  return fpr, tpr, np.r_[np.inf, s[last]]


def filter_roc(rows: Sequence[Mapping[str, Any]],
               summary: Mapping[str, Any] | None = None) -> RocCurve:
  """ROC of the filter's scores against provenance == 'harmful' (rows of filter_report.jsonl);
  the operating point is the rows' own kept/dropped decisions."""
  if not rows:
    raise ValueError("filter_roc got no rows")
  scores = np.array([float(r["score"]) for r in rows])
  harmful = np.array([r.get("provenance") == HARMFUL for r in rows])
  fpr, tpr, thr = roc_curve(scores, harmful)
  auc = float(np.trapezoid(tpr, fpr))
  point = None
  if all("kept" in r for r in rows):
    dropped = np.array([not r["kept"] for r in rows])
    point = (float((dropped & ~harmful).sum() / (~harmful).sum()),
             float((dropped & harmful).sum() / harmful.sum()))
  threshold = None if summary is None else summary.get("threshold")
  return RocCurve(fpr=fpr, tpr=tpr, thresholds=thr, auc=auc, point=point,
                  threshold=None if threshold is None else float(threshold),
                  n_harmful=int(harmful.sum()), n_benign=int((~harmful).sum()))


def cosine_tags(cosine_sets: Mapping[str, np.ndarray]) -> list[str]:
  """The models in cosine_sets ("teacher", "base"), in file order."""
  return list(dict.fromkeys(k.split("/", 1)[0] for k in cosine_sets))


def cosine_range(cosine_sets: Mapping[str, np.ndarray], pad: float = 0.05) -> tuple[float, float]:
  """A y-range covering every score, so the base and teacher box plots share their scale."""
  values = np.concatenate([np.asarray(v, np.float64).ravel() for v in cosine_sets.values()])
  lo, hi = float(values.min()), float(values.max())
  span = max(hi - lo, 1e-3)
  return lo - pad * span, hi + pad * span


def cosine_sets_of(cosine_sets: Mapping[str, np.ndarray], tag: str) -> dict[str, np.ndarray]:
  """{prompt set: scores} under one model (`tag`: teacher or base) from refusal/cosine_sets.npz's
  "tag/set" keys."""
  out = {k.split("/", 1)[1]: np.asarray(v, np.float64) for k, v in cosine_sets.items()
         if k.split("/", 1)[0] == tag}
  if not out:
    raise ValueError(f"no cosine sets for {tag!r}; have {sorted(cosine_sets)}")
  return out


__all__ = ["load_model", "prompt_sets", "prompt_features", "Projection", "projection_2d",
           "RocCurve", "roc_curve", "filter_roc", "cosine_tags", "cosine_range", "cosine_sets_of"]
