"""TrainState: everything a training run carries between steps, created straight into shardings.

The model is kept as (graphdef, params, frozen): `params` are the variables the optimizer
updates, `frozen` every other variable (the base weights under LoRA). The graphdef is static and
lives outside the state; the train step merges it back (`nnx.merge`) inside jit.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from refjax.parallel import rules as rules_lib

ModelFn = Callable[[nnx.Rngs], nnx.Module]


@struct.dataclass
class TrainState:
  """step: optimizer updates done (int32); params: trained nnx.State; frozen: the rest of the
  model's state (never updated); opt_state: optax state of params; rng: base key (uint32[2]),
  step s draws from fold_in(rng, s) so a resumed run draws the same numbers."""

  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def split_model(model: nnx.Module, wrt: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, variables matching `wrt`, every other variable)."""
  return nnx.split(model, wrt, ...)


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules: rules_lib.Rules) -> TrainState:
  """NamedShardings for every leaf: variables (and optimizer moments, which keep the variables'
  metadata) follow the logical-axis rules; step, counters and rng are replicated."""
  rep = rules_lib.replicated(mesh)
  return TrainState(
      step=rep,
      params=rules_lib.param_shardings(abstract_state.params, mesh, rules),
      frozen=rules_lib.logical_shardings(abstract_state.frozen, mesh, rules),
      opt_state=rules_lib.logical_shardings(abstract_state.opt_state, mesh, rules),
      rng=rep)


def _init_fn(model_fn: ModelFn, tx: optax.GradientTransformation, wrt: Any):
  def init(key: jax.Array) -> TrainState:
    k_init, k_train = jax.random.split(key)
    _, params, frozen = split_model(model_fn(nnx.Rngs(params=k_init)), wrt)
    return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params), k_train)
  return init


def abstract_train_state(model_fn: ModelFn, tx: optax.GradientTransformation, wrt: Any,
                         seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, TrainState of ShapeDtypeStructs): shapes only, nothing allocated."""
  graphdef, _, _ = split_model(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), wrt)
  return graphdef, jax.eval_shape(_init_fn(model_fn, tx, wrt), jax.random.PRNGKey(seed))


def create_train_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: rules_lib.Rules, *, wrt: Any = nnx.Param, seed: int = 0
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, shardings) with a random init run under jit straight into its shardings
  (no full copy ever lives on one device)."""
  graphdef, abstract = abstract_train_state(model_fn, tx, wrt, seed)
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(_init_fn(model_fn, tx, wrt), out_shardings=shardings)(
      jax.random.PRNGKey(seed))
  return graphdef, state, shardings


def train_state_from_model(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                           rules: rules_lib.Rules, *, wrt: Any = nnx.Param, seed: int = 0
                           ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """As `create_train_state` from a loaded model whose arrays already sit in their shardings
  (`load_hf_dir(..., shardings=param_shardings(...))`): its arrays are reused, not copied, and
  the optimizer state is initialised under jit straight into its shardings."""
  graphdef, params, frozen = split_model(model, wrt)

  def init(params, frozen, key):
    return TrainState(jnp.zeros((), jnp.int32), params, frozen, tx.init(params),
                      jax.random.split(key)[1])

  key = jax.random.PRNGKey(seed)
  shardings = state_shardings(jax.eval_shape(init, params, frozen, key), mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  # host (numpy) values: device_put of a local jax array onto a multi-process sharding builds a
  # malformed array in jax 0.10 (its addressable_shards fail, e.g. in orbax saves)
  rng = jax.device_put(np.asarray(jax.random.split(key)[1]), shardings.rng)
  step = jax.device_put(np.zeros((), np.int32), shardings.step)
  params = jax.device_put(params, shardings.params)  # no-ops when already placed so
  frozen = jax.device_put(frozen, shardings.frozen)
  return graphdef, TrainState(step, params, frozen, opt_state, rng), shardings
