"""The filter's scorers on teacher features (arrays in, arrays out; issue 15).

    cosine      cos(f, R), R a difference of means with the harmful side balanced per source
                (the paper's single direction)
    max_cosine  max over one difference-of-means direction per harmful source (cluster)
    logistic    an L2 logistic-regression probe (IRLS on standardised features, sample weights
                balancing sources within a class and the two classes)

Features are [N, D] at one layer. Higher score = more harmful, for every scorer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from refjax.method.refusal import cosine_scores

SCORERS = ("cosine", "logistic", "max_cosine")  # filter.scorer


def cosine(features: np.ndarray, direction: np.ndarray) -> np.ndarray:
  """cos(f, r): features [N, D] x direction [D] -> [N]; directions [S, D] -> [S, N]."""
  f = jnp.asarray(features, jnp.float32)
  r = jnp.asarray(direction, jnp.float32)
  return np.asarray(cosine_scores(f if r.ndim == 1 else f[None], r))


def dom_direction(harmful: Sequence[np.ndarray], harmless: np.ndarray) -> np.ndarray:
  """Difference of means, harmful balanced per source: the mean over sources of each source's
  mean, minus the harmless mean. harmful: list of [n_s, D]; harmless [n, D] -> [D]."""
  mh = np.mean([np.asarray(h, np.float64).mean(0) for h in harmful], axis=0)
  return (mh - np.asarray(harmless, np.float64).mean(0)).astype(np.float32)


def multi_directions(harmful: Sequence[np.ndarray], harmless: np.ndarray) -> np.ndarray:
  """One difference-of-means direction per harmful source (cluster): [S, D]."""
  mn = np.asarray(harmless, np.float64).mean(0)
  return np.stack([np.asarray(h, np.float64).mean(0) - mn for h in harmful]).astype(np.float32)


def max_cosine(features: np.ndarray, directions: np.ndarray) -> np.ndarray:
  """max over directions [S, D] of cos(f, r_s): features [N, D] -> [N]."""
  return cosine(features, directions).max(axis=0)


def balanced_weights(labels: Sequence[int], sources: Sequence[str]) -> np.ndarray:
  """Sample weights [N]: every (class, source) group weighs the same within its class, and the
  two classes weigh the same."""
  keys = list(zip((int(y) for y in labels), sources))
  counts: dict = {}
  for k in keys:
    counts[k] = counts.get(k, 0) + 1
  per_class = {c: len({s for (cc, s) in counts if cc == c}) for c, _ in counts}
  return np.array([1.0 / (counts[k] * per_class[k[0]]) for k in keys])


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """score = ((f - mean) / scale) . w + b; fitted on [N, D] (one layer, or layers concatenated)."""

  mean: np.ndarray
  scale: np.ndarray
  w: np.ndarray
  b: float


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1.0,
                 sample_weight: np.ndarray | None = None, iters: int = 50) -> LinearProbe:
  """L2-regularised logistic regression by Newton's method (IRLS), on standardised features.

  x [N, D], y [N] in {0, 1}. `sample_weight` balances sources (e.g. 1 / rows of the row's source).
  The penalty is l2 * |w|^2 / 2 with the data term a weighted mean, so l2 is size-independent.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  mean, scale = x.mean(0), x.std(0) + 1e-6
  z = np.c_[(x - mean) / scale, np.ones(len(x))]
  sw = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
  sw = sw / sw.sum()
  beta = np.zeros(z.shape[1])
  reg = np.full(z.shape[1], l2)
  reg[-1] = 0.0
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
    grad = z.T @ (sw * (p - y)) + reg * beta
    hess = (z * (sw * p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
    step = np.linalg.solve(hess, grad)
    beta -= step
    if np.max(np.abs(step)) < 1e-6:
      break
  return LinearProbe(mean.astype(np.float32), scale.astype(np.float32),
                     beta[:-1].astype(np.float32), float(beta[-1]))


def logistic_scores(probe: LinearProbe, x: np.ndarray) -> np.ndarray:
  """Probability of harmful, [N] (monotone in the margin, so thresholds calibrate the same)."""
  m = ((np.asarray(x, np.float32) - probe.mean) / probe.scale) @ probe.w + probe.b
  return 1.0 / (1.0 + np.exp(-np.clip(m, -30, 30)))


def probe_arrays(probe: LinearProbe) -> dict[str, np.ndarray]:
  """The probe as named arrays (filter/logistic_probe.npz)."""
  return {"mean": probe.mean, "scale": probe.scale, "w": probe.w, "b": np.float32(probe.b)}


def probe_from_arrays(a) -> LinearProbe:
  return LinearProbe(np.asarray(a["mean"], np.float32), np.asarray(a["scale"], np.float32),
                     np.asarray(a["w"], np.float32), float(a["b"]))


__all__ = ["SCORERS", "cosine", "dom_direction", "multi_directions", "max_cosine",
           "balanced_weights", "LinearProbe", "fit_logistic", "logistic_scores", "probe_arrays",
           "probe_from_arrays"]
