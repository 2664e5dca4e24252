"""The refusal feature as pure array functions: per-class sums, difference of means, cosine
scores, AUROC, separation d', and the one layer-choice rule.

`R_l = mean f_l(harmful) - mean f_l(harmless)` for every layer `l` at once, accumulated in fp32;
`refjax.method.features` streams a model's batches through these.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

POSITION_RULE = "last_prompt_token"  # f_l(x) is read at the last token of the rendered prompt
COSINE_EPS = 1e-8  # floor on |a|·|b| in cosine scores, so a zero vector scores 0, not NaN
AUROC_DECIMALS = 4  # layer choice compares AUROCs at this precision (ties are common at 1.0)


@struct.dataclass
class ClassSums:
  """Running fp32 sums of features per class, [L,D] each, and the row counts (fp32 scalars)."""

  harmful: jax.Array
  harmless: jax.Array
  n_harmful: jax.Array
  n_harmless: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, dim: int) -> "ClassSums":
    z = jnp.zeros((num_layers, dim), jnp.float32)
    return cls(z, z, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def __add__(self, other: "ClassSums") -> "ClassSums":
    return jax.tree.map(jnp.add, self, other)


def class_sums(features: jax.Array, valid: jax.Array, harmful: jax.Array) -> ClassSums:
  """Per-class sums of features [L,B,D] over valid rows; harmful [B] is 1/0 (harmful/harmless)."""
  valid = valid.astype(jnp.float32)
  is_harmful = harmful.astype(jnp.float32) * valid
  is_harmless = (1.0 - harmful.astype(jnp.float32)) * valid
  f = features.astype(jnp.float32)
  return ClassSums(
      harmful=jnp.einsum("lbd,b->ld", f, is_harmful, precision=jax.lax.Precision.HIGHEST),
      harmless=jnp.einsum("lbd,b->ld", f, is_harmless, precision=jax.lax.Precision.HIGHEST),
      n_harmful=jnp.sum(is_harmful),
      n_harmless=jnp.sum(is_harmless))


def refusal_feature(sums: ClassSums) -> jax.Array:
  """Difference of class means [L,D] (harmful minus harmless); an empty class counts as mean 0.

  Pure and jittable (the teacher recomputes it inside its loop); `compute_refusal_feature`
  checks on the host that neither class was empty.
  """
  return (sums.harmful / jnp.maximum(sums.n_harmful, 1.0)
          - sums.harmless / jnp.maximum(sums.n_harmless, 1.0))


def cosine_scores(features: jax.Array, feature: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """cos(f, R) over the last axis: features [L,B,D], feature [L,D] -> [L,B]; [B,D], [D] -> [B].

  fp32; the product of norms is floored at `eps`, so zero vectors give 0 and finite gradients.
  """
  f = features.astype(jnp.float32)
  r = feature.astype(jnp.float32)[..., None, :]
  dot = jnp.sum(f * r, axis=-1)
  fn = jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1), eps * eps))
  rn = jnp.sqrt(jnp.maximum(jnp.sum(r * r, axis=-1), eps * eps))
  return dot / jnp.maximum(fn * rn, eps)


def auroc(scores: np.ndarray | jax.Array, labels: np.ndarray | Sequence[int]) -> np.ndarray | float:
  """Tie-aware AUROC (Mann-Whitney U, average ranks) of scores [..., N]; labels [N], 1 = positive.

  Equals P(score_pos > score_neg) + 0.5 P(score_pos == score_neg); leading axes (e.g. layers)
  give one AUROC each.
  """
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels).astype(bool)
  if y.ndim != 1 or s.shape[-1] != y.shape[0]:
    raise ValueError(f"scores shape {s.shape} and labels shape {y.shape}; expected [..., N], [N]")
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative")
  flat = s.reshape(-1, s.shape[-1])
  out = np.empty(flat.shape[0])
  for i, row in enumerate(flat):
    out[i] = (_average_ranks(row)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
  return float(out[0]) if s.ndim == 1 else out.reshape(s.shape[:-1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of their ranks."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start and end of each run of equal values.
  new = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
  run_id = np.cumsum(new) - 1
  starts = np.flatnonzero(new)
  ends = np.concatenate([starts[1:], [len(x)]])
  mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(len(x))
  ranks[order] = mean_rank[run_id]
  return ranks


def separation(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-layer d' = (mean harmful - mean harmless) / pooled std of the cosine scores [L',N]."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  h, n = scores[:, labels], scores[:, ~labels]
  pooled = np.sqrt(0.5 * (h.var(axis=1) + n.var(axis=1))) + 1e-8
  return (h.mean(axis=1) - n.mean(axis=1)) / pooled


def layer_window(fractions: tuple[float, float], num_hidden: int) -> tuple[int, int]:
  """The hidden-state indices (lo, hi), inclusive, that a depth-fraction range allows; never 0
  (the token embeddings are the same for every prompt ending in the same template token)."""
  lo, hi = fractions
  n = num_hidden - 1
  return max(1, int(math.floor(lo * n))), max(1, min(n, int(math.ceil(hi * n))))


def choose_layer(layer_auroc: Sequence[float] | np.ndarray, layer_range: tuple[int, int],
                 layer_separation: Sequence[float] | np.ndarray | None = None) -> int:
  """The layer of R_l: the highest AUROC (at AUROC_DECIMALS) among layers lo..hi inclusive; ties go
  to the larger separation d', then to the earliest layer. NaN AUROCs never win."""
  a = np.round(np.asarray(layer_auroc, np.float64), AUROC_DECIMALS)
  if a.ndim != 1 or a.size < 2:
    raise ValueError(f"layer_auroc has shape {a.shape}; expected [L+1] with L >= 1")
  lo, hi = layer_range
  if not 0 <= lo <= hi < a.size:
    raise ValueError(f"layer_range=({lo}, {hi}); expected 0 <= lo <= hi <= {a.size - 1}")
  a = np.where(np.isnan(a), -np.inf, a)
  d = (np.zeros_like(a) if layer_separation is None
       else np.nan_to_num(np.asarray(layer_separation, np.float64), nan=-np.inf))
  return int(max(range(lo, hi + 1), key=lambda i: (a[i], d[i])))


__all__ = ["ClassSums", "class_sums", "refusal_feature", "cosine_scores", "auroc", "separation",
           "layer_window", "choose_layer", "POSITION_RULE", "COSINE_EPS"]
