"""Train-state checkpoints (Orbax) for `refjax.training.loop.train`: what a save holds, how a
resume rebuilds the state.

A state given to `train` already built keeps its frozen part (the base weights under LoRA, 540 MB
for SmolLM2-135M) out of its checkpoints: a save holds step, trained params, optimizer state and
rng, and a resume takes the frozen part from the state it was given, after checking it against a
checksum of the frozen weights the checkpoint was trained with. A lazily built state (a callable)
is saved whole, so that a resume never builds one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from refjax.training.state import TrainState

FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))
SAVED = "train_state_keys"  # meta: the TrainState fields a checkpoint holds
FROZEN_SUMS = "frozen_sums"  # meta: checksum of the frozen weights a checkpoint holds without
CHECK_RTOL = 1e-5  # sums on another mesh add in another order


@jax.jit
def _sums(frozen: Any) -> jax.Array:
  """[2] fp32: the sum and the sum of squares of every frozen weight (sharded inputs are fine)."""
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(frozen)]
  return jnp.stack([sum(jnp.sum(x) for x in leaves), sum(jnp.sum(x * x) for x in leaves)])


def frozen_sums(state: TrainState) -> list[float]:
  return [float(v) for v in np.asarray(_sums(state.frozen))] if jax.tree.leaves(
      state.frozen) else [0.0, 0.0]


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         extras: Mapping[str, Any], meta: dict[str, Any], *, with_frozen: bool,
         sums: list[float] | None = None) -> None:
  keys = FIELDS if with_frozen else tuple(k for k in FIELDS if k != "frozen")
  payload = {"train_state": {k: getattr(state, k) for k in keys}, "extras": dict(extras)}
  meta = {**meta, SAVED: list(keys), **({} if with_frozen else {FROZEN_SUMS: sums})}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(payload),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract: TrainState,
            given: TrainState | None, abstract_extras: Mapping[str, Any]
            ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
  """(state, extras, meta) of checkpoint `step`. `abstract`: the state's ShapeDtypeStructs with
  shardings; `given`: the caller's built state (its frozen part is used when the checkpoint holds
  none), None when the state is built lazily."""
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  keys = tuple(meta.get(SAVED, FIELDS))  # checkpoints from before this module hold every field
  target = {"train_state": {k: getattr(abstract, k) for k in keys},
            "extras": dict(abstract_extras)}
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())).state
  fields = dict(out["train_state"])
  if "frozen" not in fields:
    if given is None:
      raise ValueError(f"checkpoint {step} holds no frozen weights and no built state was given "
                       "to take them from")
    now, then = frozen_sums(given), meta.get(FROZEN_SUMS)
    if then is None or not np.allclose(now, then, rtol=CHECK_RTOL, atol=0.0):
      raise ValueError(
          f"checkpoint {step} was trained on other frozen weights (checksum {then}) than the "
          f"model given now ({now}): the base model changed; delete the checkpoints to start "
          "over")
    fields["frozen"] = given.frozen
  return TrainState(**fields), dict(out["extras"]), meta


__all__ = ["save", "restore", "frozen_sums", "FIELDS"]
