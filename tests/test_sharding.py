"""The same 5 steps on 1 device and on 8 simulated devices (meshes 8x1x1, 2x2x2, 1x2x4) give the
same losses, and parameters and optimizer state are sharded exactly as the rules say.

The 8-device part runs in a subprocess (`_sharding_worker.py`): XLA_FLAGS must be set before jax
is imported, and the rest of the suite keeps its single device.
"""

from __future__ import annotations

import json

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import _subproc  # tests/ is on sys.path (pytest rootdir conftest)
from refjax import config as config_lib
from refjax import parallel


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  proc = _subproc.run(["tests/_sharding_worker.py"], devices=8,
                      cache_dir=tmp_path_factory.mktemp("jax_cache"))
  assert proc.returncode == 0, proc.stderr[-5000:]
  out = json.loads(_subproc.last_json_line(proc.stdout))
  return out, {r["name"]: r for r in out["results"]}


def test_meshes_give_the_same_losses(worker):
  _, results = worker
  reference = results["1x1x1"]["losses"]
  assert results["1x1x1"]["devices"] == 1
  for name in ("8x1x1", "2x2x2", "1x2x4"):
    assert results[name]["devices"] == 8
    for step, (a, b) in enumerate(zip(reference, results[name]["losses"])):
      assert abs(a - b) <= 1e-5 * abs(a), f"mesh {name} step {step}: loss {b} vs 1 device {a}"


def test_params_and_optimizer_state_sharded_as_the_rules_say(worker):
  out, results = worker
  assert out["same_init"], "jit-initialised 2x2x2 params differ from the 1-device init"
  for name, r in results.items():
    assert r["bad"] == [], f"{name}: {r['bad'][:5]}"
    assert r["batch_spec"] == str(P(("data", "fsdp"), None))
  # With fsdp or tensor > 1 every matrix is split; 8x1x1 (pure data parallel) replicates them.
  for name in ("2x2x2", "1x2x4"):
    assert results[name]["sharded_params"] >= 9 and results[name]["sharded_opt_leaves"] >= 18
  assert results["8x1x1"]["sharded_params"] == 0


def _mesh(*sizes):
  return AbstractMesh(sizes, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_default_rules_table():
  rules = parallel.make_rules()
  assert parallel.logical_to_mesh(("vocab", "embed"), rules) == P("tensor", "fsdp")
  assert parallel.logical_to_mesh(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
  assert parallel.logical_to_mesh(("layers", "norm"), rules) == P(None, None)
  assert parallel.logical_to_mesh(("batch", "length"), rules) == P(("data", "fsdp"), None)
  # a mesh axis is used once per array: the second `embed` stays unsharded
  assert parallel.logical_to_mesh(("embed", "embed"), rules) == P("fsdp", None)
  with pytest.raises(ValueError, match="'bogus'"):
    parallel.logical_to_mesh(("bogus",), rules)


def test_rules_are_a_config_edit():
  rules = parallel.make_rules({"embed": None, "vocab": ["fsdp", "tensor"]})
  assert parallel.logical_to_mesh(("vocab", "embed"), rules) == P(("fsdp", "tensor"), None)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    parallel.make_rules({"mlp": "model"})


def test_indivisible_dims_fall_back_to_replication(caplog):
  rules = parallel.make_rules()
  mesh = _mesh(1, 2, 4)
  # 9 heads x 64 = 576 divides tensor=4; 3 kv heads x 64 = 192 too; 9 (heads as a dim) does not
  assert parallel.sharding_for((576, 576), ("embed", "heads"), mesh, rules).spec == P("fsdp",
                                                                                      "tensor")
  with caplog.at_level("WARNING"):
    s = parallel.sharding_for((576, 9), ("embed", "heads"), mesh, rules, "q")
  assert s.spec == P("fsdp", None)
  assert "does not divide" in caplog.text and "q" in caplog.text
  # a two-axis entry keeps the prefix that divides
  s = parallel.sharding_for((6,), (("batch"),), _mesh(2, 4, 1), rules)
  assert s.spec == P("data")


def test_mesh_shape_resolution():
  cfg = config_lib.mesh_config()
  assert parallel.resolve_mesh_shape(cfg, 8) == (1, 8, 1)
  cfg.data, cfg.fsdp, cfg.tensor = 2, -1, 2
  assert parallel.resolve_mesh_shape(cfg, 8) == (2, 2, 2)
  cfg.tensor = 3
  with pytest.raises(ValueError, match="not a multiple"):
    parallel.resolve_mesh_shape(cfg, 8)
  cfg.data, cfg.fsdp, cfg.tensor = -1, -1, 1
  with pytest.raises(ValueError, match="at most one"):
    parallel.resolve_mesh_shape(cfg, 8)
  cfg.data, cfg.fsdp, cfg.tensor = 0, 1, 1
  with pytest.raises(ValueError, match="mesh.data=0"):
    parallel.resolve_mesh_shape(cfg, 8)


def test_batch_that_does_not_divide_is_an_error():
  with pytest.raises(ValueError, match="batch size 6"):
    parallel.batch_sharding(_mesh(1, 4, 1), parallel.make_rules(), 2, batch_size=6)
