"""Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS set by tests/test_sharding.py):
the same 5 train steps on 1 device and on several meshes; prints one JSON line of results."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from flax import nnx
from refjax import config as config_lib
from refjax import parallel
from refjax.method.losses import causal_lm_loss
from refjax.models import Decoder, ModelConfig
from refjax.parallel import fit_spec
from refjax.tools.train_tiny import synthetic_data
from refjax.training import optim
from refjax.training import state as train_state
from refjax.training import step as train_step


MESHES = {"1x1x1": (1, 1, 1), "2x2x2": (2, 2, 2), "8x1x1": (8, 1, 1), "1x2x4": (1, 2, 4)}
STEPS, BATCH, SEQ = 5, 8, 16


def _check_shardings(tree, mesh, rules, where):
  """Every Variable's array has exactly the sharding the rules give its logical names."""
  bad, sharded = [], 0
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for path, var in leaves:
    if not isinstance(var, nnx.Variable):
      continue
    arr = var.get_value()
    names = var.get_metadata().get("out_sharding")
    want = fit_spec(arr.shape, parallel.logical_to_mesh(names, rules), mesh, where)
    got = arr.sharding
    if not (isinstance(got, jax.sharding.NamedSharding) and got.mesh == mesh
            and got.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), arr.ndim)):
      bad.append(f"{where}{jax.tree_util.keystr(path)}: {got} != {want}")
    shard = arr.addressable_shards[0].data.shape
    expected = tuple(d // int(np.prod([mesh.shape[a] for a in
                                       (() if e is None else ((e,) if isinstance(e, str) else e))]))
                     for d, e in zip(arr.shape, tuple(want) + (None,) * arr.ndim))
    if shard != expected:
      bad.append(f"{where}{jax.tree_util.keystr(path)}: shard {shard} != {expected}")
    sharded += int(np.prod(shard) < np.prod(arr.shape))
  return bad, sharded


def run(name: str, shape, source=None) -> dict:
  """5 steps on a mesh of that shape. The state is initialised by jit straight into its
  shardings, or (to save a compile) moved there from `source`, another mesh's initial state."""
  mesh_cfg = config_lib.mesh_config()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = shape
  n = int(np.prod(shape))
  mesh = parallel.make_mesh(mesh_cfg, devices=jax.devices()[:n])
  rules = parallel.make_rules()
  model_cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16)
  ocfg = config_lib.optim_config()
  ocfg.lr, ocfg.weight_decay, ocfg.warmup_steps, ocfg.schedule = 3e-3, 0.01, 1, "cosine"
  tx, schedule = optim.make_optimizer(ocfg, STEPS)
  model_fn = lambda rngs: Decoder(model_cfg, rngs=rngs)  # noqa: E731
  if source is None:
    graphdef, state, shardings = train_state.create_train_state(model_fn, tx, mesh, rules, seed=0)
  else:
    graphdef, abstract = train_state.abstract_train_state(model_fn, tx, nnx.Param, seed=0)
    shardings = train_state.state_shardings(abstract, mesh, rules)
    state = jax.device_put(jax.device_get(source), shardings)
  initial = jax.device_get(state.params)
  arrays = synthetic_data(BATCH * STEPS, SEQ, model_cfg.vocab_size, seed=7)
  example = {k: v[:BATCH] for k, v in arrays.items()}
  bsh = parallel.batch_shardings(example, mesh, rules)
  step = train_step.make_train_step(causal_lm_loss, graphdef, tx,
                                    state_shardings=shardings, batch_shardings=bsh,
                                    schedule=schedule)
  bad, sharded = _check_shardings(state.params, mesh, rules, "params")
  initial_state = jax.device_get(state)
  losses = []
  for i in range(STEPS):
    batch = parallel.host_to_global({k: v[i * BATCH:(i + 1) * BATCH] for k, v in arrays.items()},
                                    bsh, BATCH)
    state, metrics = step(state, batch, {})
    jax.block_until_ready((state, metrics))  # the fake-device collective deadlock (ENV.md)
    losses.append(float(metrics["loss"]))
  b2, s2 = _check_shardings(state.params, mesh, rules, "params")
  b3, s3 = _check_shardings(state.opt_state, mesh, rules, "opt_state")
  batch_spec = str(batch["tokens"].sharding.spec)
  return {"name": name, "losses": losses, "bad": bad + b2 + b3,
          "sharded_params": s2, "sharded_opt_leaves": s3, "batch_spec": batch_spec,
          "devices": n, "initial": initial, "initial_state": initial_state}


def main() -> int:
  assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"
  one = run("1x1x1", MESHES["1x1x1"])
  cube = run("2x2x2", MESHES["2x2x2"])  # jit-initialised into its shardings too
  same_init = all(bool(np.array_equal(a, b)) for a, b in
                  zip(jax.tree.leaves(one["initial"]), jax.tree.leaves(cube["initial"])))
  results = [one, cube] + [run(name, MESHES[name], source=one["initial_state"])
                           for name in ("8x1x1", "1x2x4")]
  for r in results:
    del r["initial"], r["initial_state"]
  print(json.dumps({"results": results, "same_init": same_init}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
