"""The method's losses, pure jnp in fp32: token cross-entropy, the one safe weighted mean, the
teacher's cosine regulariser and the student's distillation KL; and, on the host, how many logit
slots a step's targets need (`logit_slots`, read by `sum_at_targets`).

Every loss returns a scalar; a "safe" mean divides by max(sum of weights, TINY), so an all-padding
(all-zero-weight) batch gives 0 rather than NaN.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from refjax.method.refusal import COSINE_EPS, cosine_scores

REG_FORMS = ("one_minus_cos", "squared", "margin")
KD_DIRECTIONS = ("forward", "reverse")
DEFAULT_MARGIN = 0.5  # margin form: no loss once y·cos >= 0.5 (our default; the paper gives none)
TINY = 1e-9  # the floor on a sum of weights
TAIL_FLOOR = 1e-12  # the floor on the probability mass outside a top-k


def safe_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w·v) / sum(w) over all entries, 0 when every weight is 0."""
  w = weights.astype(jnp.float32)
  return jnp.sum(w * values.astype(jnp.float32)) / jnp.maximum(jnp.sum(w), TINY)


def token_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                        weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted next-token NLL, sum of weights), fp32.

  logits [B,T,V] at t predict tokens[:, t+1]; a target counts with weight
  loss_mask[:, t+1] * weights[b]. The last position predicts nothing.
  """
  # Shift targets and mask instead of slicing logits: no copy of the [B,T,V] array.
  w = target_weights(loss_mask, weights)
  return jnp.sum(nll_from_logits(logits, shifted_targets(tokens)) * w), jnp.sum(w)


def target_weights(loss_mask: jax.Array, weights: jax.Array) -> jax.Array:
  """[B,T] weight of the prediction made at each position: loss_mask shifted left by one (the
  logits at t predict token t+1) times the row weight; the last position gets 0."""
  b = loss_mask.shape[0]
  mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros((b, 1), loss_mask.dtype)], axis=1)
  return mask.astype(jnp.float32) * weights.astype(jnp.float32)[:, None]


def shifted_targets(tokens: jax.Array) -> jax.Array:
  """[B,T] the token each position predicts (tokens shifted left; the last position gets 0)."""
  return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def nll_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[...] negative log-likelihood of `targets` [...] under `logits` [...,V], fp32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


def sum_at_targets(hidden: jax.Array, weights: jax.Array, per_position: Callable[
    [jax.Array, jax.Array], jax.Array], capacity: int) -> tuple[jax.Array, jax.Array]:
  """(sum_i weights_i · per_position(hidden_i, i) over the positions i with a nonzero weight,
  1.0 if the batch took every position else 0.0).

  hidden [B,T,D] (final-normed), weights [B,T]; `per_position(h [N,D], flat index [N]) -> [N]` or
  [N,M] (M losses at once) maps hidden states to losses; it applies the LM head, so logits exist
  only where it is called. With capacity < B·T the target positions are gathered into `capacity`
  slots (a static shape; empty slots weigh 0); a batch with more targets takes every position
  instead (`lax.cond`), so no target is ever dropped.
  """
  b, t, d = hidden.shape
  flat_h, flat_w = hidden.reshape(b * t, d), weights.reshape(b * t).astype(jnp.float32)

  def weighted(values: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(values * w.reshape(w.shape + (1,) * (values.ndim - 1)), axis=0)

  def every() -> jax.Array:
    return weighted(per_position(flat_h, jnp.arange(b * t)), flat_w)

  if capacity >= b * t:
    return every(), jnp.float32(1.0)
  count = jnp.sum(flat_w != 0)

  def gathered() -> jax.Array:
    idx = jnp.nonzero(flat_w != 0, size=capacity, fill_value=0)[0]
    w = jnp.where(jnp.arange(capacity) < count, flat_w[idx], 0.0)
    return weighted(per_position(flat_h[idx], idx), w)

  fits = count <= capacity
  return jax.lax.cond(fits, gathered, every), 1.0 - fits.astype(jnp.float32)


def logit_slots(target_counts: np.ndarray, rows: int, length: int, share: float = 0.0) -> int:
  """Logit slots for a step of `rows` rows of `length` tokens: `share` of its positions, or with
  share 0 enough for a step of rows drawn at random from rows with `target_counts` targets each
  (mean + 3 standard deviations of the sum, up to a multiple of 64). At most rows · length."""
  every = rows * length
  if share > 0:
    return max(1, min(every, math.ceil(share * every)))
  counts = np.asarray(target_counts, np.float64)
  if counts.size == 0:
    return every
  need = rows * counts.mean() + 3.0 * math.sqrt(rows) * counts.std()
  return int(max(64, min(every, 64 * math.ceil(need / 64))))


def target_counts(rows: dict[str, np.ndarray]) -> np.ndarray:
  """Per row: the positions a loss reads (a nonzero loss_mask on the next token)."""
  return np.count_nonzero(rows["loss_mask"][:, 1:] * rows["weights"][:, None], axis=1)


def mean_cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array,
                       weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(token-weighted mean NLL, sum of weights)."""
  total, weight = token_cross_entropy(logits, tokens, loss_mask, weights)
  return total / jnp.maximum(weight, TINY), weight


def causal_lm_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                   extras: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The plain finetuning loss_fn: token-weighted mean CE over the targets `loss_mask` marks."""
  del rng, extras
  packed = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
  out = model(batch["tokens"], batch["attention_mask"], **packed)
  loss, weight = mean_cross_entropy(out.logits, batch["tokens"], batch["loss_mask"],
                                    batch["weights"])
  targets = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32)
                    * (batch["weights"] > 0).astype(jnp.float32)[:, None])
  return loss, {"loss_weight": weight, "num_targets": targets}


def cosine_regulariser(features: jax.Array, feature: jax.Array, labels_sign: jax.Array,
                       weights: jax.Array | None = None, *, form: str = "one_minus_cos",
                       margin: float = DEFAULT_MARGIN, eps: float = COSINE_EPS) -> jax.Array:
  """Pulls cos(f(x), R) toward y = +1 (harmful) / -1 (harmless); weighted mean over rows.

  features [B,D], feature [D] (held fixed: stop_gradient), labels_sign [B] in {+1,-1}, weights [B]
  (0 for padding rows). Forms: 'one_minus_cos' 1 - y·cos (default), 'squared' (cos - y)^2,
  'margin' relu(margin - y·cos).
  """
  if form not in REG_FORMS:
    raise ValueError(f"reg_form={form!r}; expected one of {REG_FORMS}")
  if features.ndim != 2 or feature.shape != features.shape[-1:]:
    raise ValueError(f"features {features.shape} and feature {feature.shape}; expected [B,D], [D]")
  cos = cosine_scores(features, jax.lax.stop_gradient(feature), eps)
  y = labels_sign.astype(jnp.float32)
  if form == "one_minus_cos":
    per_row = 1.0 - y * cos
  elif form == "squared":
    per_row = jnp.square(cos - y)
  else:
    per_row = jax.nn.relu(margin - y * cos)
  return safe_mean(per_row, jnp.ones_like(y) if weights is None else weights)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
            temperature: float = 1.0, direction: str = "forward") -> jax.Array:
  """T² · KL over the vocabulary, token-masked mean.

  forward = KL(teacher‖student) (usual distillation), reverse = KL(student‖teacher).
  logits [B,T,V] (teacher under stop_gradient), mask [B,T] (the weight of each position's
  prediction), computed in fp32 at temperature T (Hinton et al. 2015's T² keeps the gradient scale
  T-independent).
  """
  if direction not in KD_DIRECTIONS:
    raise ValueError(f"kd_direction={direction!r}; expected one of {KD_DIRECTIONS}")
  if temperature <= 0:
    raise ValueError(f"kd_temperature={temperature}; expected > 0")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} != teacher logits "
                     f"{teacher_logits.shape}")
  if mask.shape != student_logits.shape[:-1]:
    raise ValueError(f"mask {mask.shape}; expected {student_logits.shape[:-1]}")
  kl = kd_exact_kl(student_logits, teacher_logits, temperature=temperature, direction=direction)
  return temperature ** 2 * safe_mean(kl, mask)


def topk_targets(teacher_logits: jax.Array, k: int, temperature: float = 1.0
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The teacher's next-token distribution at temperature T, kept as its top k: (ids [...,k]
  int32, log-probs [...,k], the log of the remaining mass [...]) (MaxText-style offline KD)."""
  logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
                            / temperature, axis=-1)
  top, ids = jax.lax.top_k(logp, k)
  return ids.astype(jnp.int32), top, _rest(top)


def _rest(top_logp: jax.Array) -> jax.Array:
  """log(1 - sum(exp(top))): the mass outside the top k (floored, so a full top-k stays finite)."""
  return jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(top_logp), axis=-1), TAIL_FLOOR))


def kd_topk_kl(student_logits: jax.Array, topk_ids: jax.Array, topk_logp: jax.Array,
               tail_logp: jax.Array, *, temperature: float = 1.0,
               direction: str = "forward") -> jax.Array:
  """[...] KL per position between the teacher's cached top-k targets and the student, both
  reduced to the teacher's top k tokens plus one bucket for the rest (no T² factor)."""
  if direction not in KD_DIRECTIONS:
    raise ValueError(f"kd_direction={direction!r}; expected one of {KD_DIRECTIONS}")
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  s_top = jnp.take_along_axis(log_s, topk_ids, axis=-1)
  s_tail = _rest(s_top)
  t_top, t_tail = topk_logp.astype(jnp.float32), tail_logp.astype(jnp.float32)
  if direction == "forward":  # sum p_t (log p_t - log p_s)
    return jnp.sum(jnp.exp(t_top) * (t_top - s_top), -1) + jnp.exp(t_tail) * (t_tail - s_tail)
  return jnp.sum(jnp.exp(s_top) * (s_top - t_top), -1) + jnp.exp(s_tail) * (s_tail - t_tail)


def kd_topk_loss(student_logits: jax.Array, topk_ids: jax.Array, topk_logp: jax.Array,
                 tail_logp: jax.Array, mask: jax.Array, *, temperature: float = 1.0,
                 direction: str = "forward") -> jax.Array:
  """`kd_loss` against cached teacher targets (`topk_targets`): T² · the masked mean of
  `kd_topk_kl`. With k = the vocabulary it equals the exact KL."""
  kl = kd_topk_kl(student_logits, topk_ids, topk_logp, tail_logp, temperature=temperature,
                  direction=direction)
  return temperature ** 2 * safe_mean(kl, mask)


def kd_exact_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
                temperature: float = 1.0, direction: str = "forward") -> jax.Array:
  """[...] KL per position over the vocabulary at temperature T (no T² factor)."""
  if direction not in KD_DIRECTIONS:
    raise ValueError(f"kd_direction={direction!r}; expected one of {KD_DIRECTIONS}")
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_t = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
  if direction == "forward":  # sum_v p_t (log p_t - log p_s)
    return optax.losses.kl_divergence_with_log_targets(log_s, log_t, axis=-1)
  return optax.losses.kl_divergence_with_log_targets(log_t, log_s, axis=-1)


__all__ = ["safe_mean", "token_cross_entropy", "shifted_targets", "nll_from_logits",
           "sum_at_targets", "logit_slots", "target_counts", "kd_topk_kl", "kd_exact_kl",
           "target_weights", "mean_cross_entropy", "causal_lm_loss", "cosine_regulariser",
           "kd_loss", "topk_targets", "kd_topk_loss",
           "REG_FORMS", "KD_DIRECTIONS", "DEFAULT_MARGIN", "TINY"]
