"""LoRA through the shared train step: only the adapters train (and have optimizer state), the
base weights stay bit-identical, and merging the adapters gives the same logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from refjax import config as config_lib
from refjax import parallel
from refjax.method.losses import causal_lm_loss
from refjax.models import Decoder, ModelConfig
from refjax.tools.train_tiny import synthetic_data
from refjax.training import optim
from refjax.training import state as train_state
from refjax.training import step as train_step


CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, lora_rank=4, lora_alpha=8.0,
                  lora_targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def trained():
  mesh = parallel.make_mesh(config_lib.mesh_config())
  rules = parallel.make_rules()
  ocfg = config_lib.optim_config()
  ocfg.lr, ocfg.weight_decay, ocfg.schedule = 1e-2, 0.1, "constant"
  tx, _ = optim.make_optimizer(ocfg, 3)
  graphdef, state, shardings = train_state.create_train_state(
      lambda rngs: Decoder(CFG, rngs=rngs), tx, mesh, rules,
      wrt=optim.trainable_filter(CFG.lora_rank))
  before = jax.device_get(state)  # host copies: the step donates the state
  arrays = synthetic_data(8, 16, CFG.vocab_size, seed=0)
  bsh = parallel.batch_shardings(arrays, mesh, rules)
  batch = parallel.host_to_global(arrays, bsh, 8)
  step = train_step.make_train_step(causal_lm_loss, graphdef, tx,
                                    state_shardings=shardings, batch_shardings=bsh)
  for _ in range(3):
    state, metrics = step(state, batch, {})
  return graphdef, before, state, batch


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_adapters_are_trained(trained):
  _, before, state, _ = trained
  assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(
      state.params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  names = _flat(state.params)
  assert len(names) == 2 * len(CFG.lora_targets)  # lora_a and lora_b per target
  assert {k.split("'")[-2] for k in names} == {"lora_a", "lora_b"}
  assert not any("lora" in k for k in _flat(state.frozen))
  # optimizer moments exist for the adapters only
  n_adapter_arrays = len(jax.tree.leaves(state.params))
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert len(moments) == 2 * n_adapter_arrays  # Adam mu and nu


def test_base_weights_bit_identical_adapters_moved(trained):
  _, before, state, _ = trained
  base_before, base_after = _flat(before.frozen), _flat(jax.device_get(state.frozen))
  assert base_before.keys() == base_after.keys()
  for k in base_before:
    assert np.array_equal(base_before[k], base_after[k]), f"base weight {k} changed"
  after = _flat(jax.device_get(state.params))
  changed = [k for k, v in _flat(before.params).items() if not np.array_equal(v, after[k])]
  assert len(changed) == len(after)  # every adapter (B starts at 0) has moved
  assert int(state.step) == 3


def test_merged_weights_give_the_same_logits(trained):
  lora = pytest.importorskip("refjax.models.lora")
  graphdef, _, state, batch = trained
  model = nnx.merge(graphdef, state.params, state.frozen)
  merged = lora.merge_lora(model)
  assert merged.cfg.lora_rank == 0

  @jax.jit
  def logits(graphdef_state):  # jitted: eager nnx calls compile op by op
    m = nnx.merge(*graphdef_state)
    return m(batch["tokens"], batch["attention_mask"]).logits

  a = logits(nnx.split(model))
  b = logits(nnx.split(merged))
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5)
  # the adapters really contribute: logits differ from the base model alone
  no_adapters = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state.params), state.frozen)
  assert float(jnp.max(jnp.abs(logits(nnx.split(no_adapters)) - a))) > 1e-4
