"""Optimizer from config: schedule values, the weight-decay mask, and validation errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from refjax import config as config_lib
from refjax.models import Decoder, ModelConfig
from refjax.training import optim



def _cfg(**kw):
  cfg = config_lib.optim_config()
  cfg.lr, cfg.warmup_steps, cfg.end_lr_ratio = 1.0, 2, 0.1
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.mark.parametrize("schedule,expected", [
    # steps 0..10 of a 10-step run: warmup 0 -> 1 over 2 steps, then 8 decay steps to 0.1
    ("constant", [0, .5, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ("linear", [0, .5, 1, .8875, .775, .6625, .55, .4375, .325, .2125, .1]),
    ("cosine", [0, .5] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 8)) for k in range(9)]),
])
def test_schedule_values(schedule, expected):
  fn = optim.make_schedule(_cfg(schedule=schedule), total_steps=10)
  np.testing.assert_allclose([float(fn(s)) for s in range(11)], expected, rtol=1e-5, atol=1e-7)


def test_no_warmup_starts_at_peak():
  fn = optim.make_schedule(_cfg(warmup_steps=0, schedule="linear", end_lr_ratio=0.0), 4)
  np.testing.assert_allclose([float(fn(s)) for s in range(5)], [1, .75, .5, .25, 0], atol=1e-7)


def _tiny_state(**kw):
  cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=4, attention_bias=True, **kw)
  return nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _mask_by_path(mask):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): bool(v)
          for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}


def test_decay_mask_default_excludes_norms_biases_embeddings():
  mask = _mask_by_path(optim.decay_mask(_tiny_state(lora_rank=2)))
  no_decay = sorted(k for k, v in mask.items() if not v)
  assert no_decay == sorted(k for k in mask if "norm" in k or "bias" in k or "embed_tokens" in k)
  assert any("bias" in k for k in no_decay) and any("layernorm" in k for k in no_decay)
  assert mask["lm_head/value"] and mask["layers/mlp/up_proj/kernel/value"]
  assert mask["layers/self_attn/q_proj/lora_a/value"]


def test_decay_mask_is_configurable():
  mask = _mask_by_path(optim.decay_mask(_tiny_state(), no_decay=(r"lm_head", r"mlp/")))
  assert not mask["lm_head/value"] and not mask["layers/mlp/gate_proj/kernel/value"]
  assert mask["embed_tokens/value"] and mask["layers/input_layernorm/scale/value"]


def test_weight_decay_applies_only_where_masked():
  params = {"kernel": jnp.ones((3,)), "norm": {"scale": jnp.ones((3,))}}
  tx, _ = optim.make_optimizer(_cfg(warmup_steps=0, schedule="constant", weight_decay=0.5,
                                    lr=0.1, clip_norm=0.0), total_steps=1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.05 * np.ones(3), rtol=1e-6)  # -lr * wd * w
  np.testing.assert_allclose(updates["norm"]["scale"], np.zeros(3))


def test_global_norm_clipping():
  params = {"w": jnp.zeros((4,))}
  tx, _ = optim.make_optimizer(_cfg(warmup_steps=0, schedule="constant", clip_norm=1.0,
                                    b1=0.0, b2=0.0, eps=1e-12), total_steps=1)
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # global norm 5
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  # Adam with b2=0 keeps the last squared (clipped) gradient: [0.6, 0.8, 0, 0] ** 2
  nu = jax.tree.leaves(state[1][0].nu)[0]
  np.testing.assert_allclose(nu, [0.36, 0.64, 0, 0], rtol=1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("schedule", "step", "config.optim.schedule: 'step'; expected one of"),
    ("lr", -1.0, "config.optim.lr: -1.0; expected >= 0"),
    ("end_lr_ratio", 2.0, "config.optim.end_lr_ratio: 2.0"),
    ("grad_accum", 0, "config.optim.grad_accum: 0"),
    ("b2", 1.0, "config.optim.b2: 1.0"),
])
def test_bad_values_are_named(key, value, match):
  """The config's one validator names the key (the optimizer trusts a validated section)."""
  with pytest.raises(ValueError, match=match.replace("(", r"\(")):
    config_lib.validate_optim(_cfg(**{key: value}))


def test_trainable_filter():
  assert optim.trainable_filter(0) is nnx.Param
  assert optim.trainable_filter(8) is nnx.LoRAParam
