"""One pure, jitted train step `(state, batch, extras) -> (state, metrics)` for every stage.

Batch (global arrays, dict):
  tokens          [B,T] int32
  attention_mask  [B,T] 1 = real token (left or right padding both fine)
  loss_mask       [B,T] 1 = this token is a *target*: the prediction of tokens[:, t] made at
                  position t-1 counts. Mark the response tokens (and the closing EOS); the first
                  column is never a target. This is transformers' `labels != -100` convention:
                  logits[:, t] are scored against tokens[:, t+1] with weight loss_mask[:, t+1].
  weights         [B] per-example weight; filtering an example = weight 0 (shapes never change).

`extras` is a dict of named frozen inputs (a teacher's state, a refusal feature) with a
shardings dict of the same keys: sharded, never donated, no optimizer state, and wrapped in
`stop_gradient`. The loss function reads them by name.

Gradient accumulation is an in-step `lax.scan` over `grad_accum` microbatches, not
`optax.MultiSteps`: (1) it is exact for token-weighted means (each microbatch's gradient is
weighted by its `loss_weight`, so the result equals the whole-batch gradient, which averaging
per-microbatch means would not), (2) no accumulator in the optimizer state, (3) one dispatch and
one host sync per optimizer step, so step numbers, checkpoints, schedules and the CPU
block-every-step rule all count optimizer updates.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from refjax.training.state import TrainState

Batch = Mapping[str, jax.Array]
Extras = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch, jax.Array, Extras], tuple[jax.Array, dict[str, jax.Array]]]
"""loss_fn(model, batch, rng, extras) -> (scalar loss, aux metrics).

aux["loss_weight"] (optional, scalar): the normaliser of this (micro)batch's mean loss (e.g. the
weighted target-token count); microbatches are combined weighted by it. Absent = equal weights.
"""

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "weights")
SUMMED_AUX = ("loss_weight", "num_targets")  # aux entries summed (not averaged) over microbatches
_TINY = 1e-9  # floor on the summed microbatch weights


def check_batch(batch: Mapping[str, Any]) -> None:
  """Raises naming the key if a token batch lacks an entry or has a mismatched shape (a batch of
  other arrays, e.g. features for a head, only needs one leading batch axis)."""
  if "tokens" not in batch:
    sizes = {k: v.shape[0] if v.ndim else None for k, v in batch.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"batch arrays have different leading sizes {sizes}")
    return
  for key in BATCH_KEYS:
    if key not in batch:
      raise KeyError(f"batch is missing {key!r}; expected keys {BATCH_KEYS}")
  bt = tuple(batch["tokens"].shape)
  if len(bt) != 2:
    raise ValueError(f"batch['tokens'] has shape {bt}; expected [B, T]")
  for key in ("attention_mask", "loss_mask"):
    if tuple(batch[key].shape) != bt:
      raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}; expected {bt}")
  if tuple(batch["weights"].shape) != bt[:1]:
    raise ValueError(f"batch['weights'] has shape {tuple(batch['weights'].shape)}; "
                     f"expected {bt[:1]}")


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B,...] -> [n, B/n, ...] with microbatch i = rows i, i+n, i+2n, ...: every device keeps
  contributing rows to every microbatch, so no resharding is needed."""
  def split(key, x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"batch[{key!r}] has {b} rows, not a multiple of optim.grad_accum={n}")
    return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
  return {k: split(k, v) for k, v in batch.items()}


def _constrain(mb: Batch, shardings: Mapping[str, Any] | None) -> Batch:
  if shardings is None:
    return mb
  return {k: jax.lax.with_sharding_constraint(v, shardings[k]) if k in shardings else v
          for k, v in mb.items()}


def loss_and_grads(loss_fn: LossFn, graphdef: nnx.GraphDef, state: TrainState, batch: Batch,
                   rng: jax.Array, extras: Extras, grad_accum: int = 1,
                   batch_shardings: Mapping[str, Any] | None = None):
  """(loss, aux, grads) of the trained params, accumulated exactly over `grad_accum` microbatches."""
  def f(params, mb, key):
    model = nnx.merge(graphdef, params, state.frozen)
    loss, aux = loss_fn(model, mb, key, extras)
    return loss.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(f, has_aux=True)
  if grad_accum == 1:
    (loss, aux), grads = grad_fn(state.params, batch, rng)
    return loss, dict(aux), grads

  mbs = _microbatches(batch, grad_accum)
  keys = jax.random.split(rng, grad_accum)

  def body(carry, xs):
    g_acc, l_acc, w_acc = carry
    mb, key = xs
    (loss, aux), g = grad_fn(state.params, _constrain(mb, batch_shardings), key)
    w = jnp.asarray(aux.get("loss_weight", 1.0), jnp.float32)
    g_acc = jax.tree.map(lambda a, b: a + w * b, g_acc, g)
    return (g_acc, l_acc + w * loss, w_acc + w), aux

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (g, lsum, wsum), auxs = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                       (mbs, keys))
  denom = jnp.maximum(wsum, _TINY)
  grads = jax.tree.map(lambda x: x / denom, g)
  aux = {k: (jnp.sum(v, 0) if k in SUMMED_AUX else jnp.mean(v, 0)) for k, v in auxs.items()}
  return lsum / denom, aux, grads


def _mesh_of(shardings: Any):
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(s, NamedSharding):
      return s.mesh
  raise ValueError("state_shardings holds no NamedSharding; build it with "
                   "refjax.training.state.state_shardings")


def make_train_step(loss_fn: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                    state_shardings: TrainState, batch_shardings: Mapping[str, Any],
                    extra_shardings: Mapping[str, Any] | None = None, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None, donate: bool = True) -> Callable:
  """The jitted `(state, batch, extras) -> (state, metrics)`; state donated, extras not.

  metrics: loss, grad_norm, param_norm, lr (with `schedule`), `applied` (1.0, or 0.0 when the
  loss or any gradient was not finite: then the update is dropped and the old state returned,
  step counter included, so a NaN never reaches the parameters), and loss_fn's aux (all
  replicated fp32 scalars).
  """
  if int(grad_accum) < 1:
    raise ValueError(f"grad_accum={grad_accum}; expected >= 1")
  grad_accum = int(grad_accum)
  mesh = _mesh_of(state_shardings)

  def step(state: TrainState, batch: Batch, extras: Extras):
    check_batch(batch)
    extras = jax.lax.stop_gradient(extras)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, aux, grads = loss_and_grads(loss_fn, graphdef, state, batch, rng, extras, grad_accum,
                                      batch_shardings)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)  # NaN/inf if any gradient entry is
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "param_norm": optax.global_norm(new_state.params),
               "applied": finite.astype(jnp.float32)}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
    return new_state, metrics

  rep = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step,
                 in_shardings=(state_shardings, dict(batch_shardings), dict(extra_shardings or {})),
                 out_shardings=(state_shardings, rep),
                 donate_argnums=(0,) if donate else ())


def make_eval_step(loss_fn: LossFn, graphdef: nnx.GraphDef, *, state_shardings: TrainState,
                   batch_shardings: Mapping[str, Any],
                   extra_shardings: Mapping[str, Any] | None = None) -> Callable:
  """The jitted `(state, batch, extras) -> metrics` (loss and aux, no update, nothing donated)."""
  mesh = _mesh_of(state_shardings)

  def evaluate(state: TrainState, batch: Batch, extras: Extras):
    model = nnx.merge(graphdef, state.params, state.frozen)
    loss, aux = loss_fn(model, batch, jax.random.fold_in(state.rng, state.step), extras)
    return {"loss": loss.astype(jnp.float32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}

  rep = NamedSharding(mesh, PartitionSpec())
  return jax.jit(evaluate, in_shardings=(state_shardings, dict(batch_shardings),
                                         dict(extra_shardings or {})),
                 out_shardings=rep)
