"""The train step's pieces: the masked, weighted next-token loss (hand-computed), exact gradient
accumulation, frozen extra inputs, and batch validation. A bigram toy model keeps compiles short."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from refjax import config as config_lib
from refjax import parallel
from refjax.method.losses import causal_lm_loss, token_cross_entropy
from refjax.models.decoder import DecoderOutput
from refjax.training import state as train_state
from refjax.training import step as train_step


V = 5


class Bigram(nnx.Module):
  """logits[b, t] = W[tokens[b, t]]: the smallest model with the Decoder's call signature."""

  def __init__(self, rngs: nnx.Rngs):
    w = jax.random.normal(rngs.params(), (V, V)) * 0.5
    self.w = nnx.Param(w, eager_sharding=False, sharding_names=("vocab", "embed"))

  def __call__(self, tokens, attention_mask=None):
    return DecoderOutput(self.w[...][tokens], None, None, None)


def _batch(rng=0, b=4, t=6):
  r = np.random.default_rng(rng)
  return {"tokens": r.integers(0, V, (b, t)).astype(np.int32),
          "attention_mask": np.ones((b, t), np.int32),
          "loss_mask": (r.random((b, t)) > 0.3).astype(np.int32),
          "weights": np.array([1.0, 0.0, 2.0, 1.0][:b], np.float32)}


def test_cross_entropy_by_hand_and_shift_convention():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  tokens = jnp.array([[0, 1, 2]])
  # loss_mask marks *targets*: token 1 (predicted at position 0) and token 2 (at position 1)
  total, weight = token_cross_entropy(logits, tokens, jnp.array([[1, 1, 1]]),
                                                 jnp.array([2.0]))
  np.testing.assert_allclose(total, 2 * -(np.log(0.25) + np.log(0.1)), rtol=1e-6)
  assert float(weight) == 4.0  # 2 targets x weight 2; column 0 is never a target
  total, weight = token_cross_entropy(logits, tokens, jnp.array([[1, 0, 1]]),
                                                 jnp.array([1.0]))
  np.testing.assert_allclose(total, -np.log(0.1), rtol=1e-6)
  assert float(weight) == 1.0


def test_zero_weight_filters_an_example_without_changing_shapes():
  graphdef, params = nnx.split(Bigram(nnx.Rngs(0)))
  loss_fn = jax.jit(lambda b: causal_lm_loss(nnx.merge(graphdef, params), b, None, {}))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  loss, aux = loss_fn(batch)
  changed = dict(batch, tokens=batch["tokens"].at[1].set((batch["tokens"][1] + 1) % V))
  loss2, _ = loss_fn(changed)  # row 1 has weight 0
  assert float(loss) == float(loss2)
  kept = [0, 2, 3]
  sub = {k: v[np.array(kept)] for k, v in batch.items()}
  loss3, _ = loss_fn(sub)
  np.testing.assert_allclose(loss, loss3, rtol=1e-6)
  all_zero = dict(batch, weights=jnp.zeros(4))
  loss4, aux4 = loss_fn(all_zero)
  assert float(loss4) == 0.0 and float(aux4["loss_weight"]) == 0.0


def _setup(extras=()):
  mesh = parallel.make_mesh(config_lib.mesh_config())
  rules = parallel.make_rules()
  tx = optax.sgd(0.1)
  graphdef, state, shardings = train_state.create_train_state(Bigram, tx, mesh, rules)
  bsh = parallel.batch_shardings(_batch(b=4), mesh, rules)
  return mesh, rules, tx, graphdef, state, shardings, bsh


def test_grad_accumulation_equals_the_whole_batch():
  mesh, rules, tx, graphdef, state, shardings, bsh = _setup()
  batch = parallel.host_to_global(_batch(rng=3), bsh, 4)  # rows have unequal target counts
  out = {}
  for accum in (1, 2, 4):
    step = train_step.make_train_step(causal_lm_loss, graphdef, tx,
                                      state_shardings=shardings, batch_shardings=bsh,
                                      grad_accum=accum, donate=False)
    new, metrics = step(state, batch, {})
    out[accum] = (jax.device_get(new.params), float(metrics["loss"]),
                  float(metrics["loss_weight"]))
  for accum in (2, 4):
    np.testing.assert_allclose(out[accum][1], out[1][1], rtol=1e-6)
    assert out[accum][2] == out[1][2]
    for a, b in zip(jax.tree.leaves(out[accum][0]), jax.tree.leaves(out[1][0])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="grad_accum=3"):
    train_step.make_train_step(causal_lm_loss, graphdef, tx,
                               state_shardings=shardings, batch_shardings=bsh,
                               grad_accum=3)(state, batch, {})


def test_extras_are_frozen_inputs_and_not_donated():
  mesh, rules, tx, graphdef, state, shardings, bsh = _setup()
  teacher = Bigram(nnx.Rngs(1))
  t_graphdef, t_state = nnx.split(teacher)
  t_shardings = parallel.param_shardings(t_state, mesh, rules)
  t_state = jax.device_put(t_state, t_shardings)
  seen = {}

  def distill(model, batch, rng, extras):
    teacher_state = extras["teacher"]
    t_logits = nnx.merge(t_graphdef, teacher_state)(batch["tokens"]).logits
    s_logits = model(batch["tokens"]).logits
    # a gradient w.r.t. the teacher would be nonzero here without stop_gradient
    seen["grad"] = jax.grad(lambda ts: jnp.sum(
        nnx.merge(t_graphdef, ts)(batch["tokens"]).logits))(teacher_state)
    kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(s_logits),
                                                     jax.nn.log_softmax(t_logits))
    return jnp.mean(kl), {}

  step = train_step.make_train_step(distill, graphdef, tx, state_shardings=shardings,
                                    batch_shardings=bsh, extra_shardings={"teacher": t_shardings})
  batch = parallel.host_to_global(_batch(), bsh, 4)
  before = jax.device_get(t_state)
  state, metrics = step(state, batch, {"teacher": t_state})
  state, metrics = step(state, batch, {"teacher": t_state})  # the teacher's buffers are alive
  assert not any(x.is_deleted() for x in jax.tree.leaves(t_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(t_state))):
    assert np.array_equal(a, b)
  assert float(metrics["loss"]) > 0
  assert int(state.step) == 2


def test_batch_validation_names_the_key():
  with pytest.raises(KeyError, match="weights"):
    train_step.check_batch({k: v for k, v in _batch().items() if k != "weights"})
  bad = dict(_batch(), loss_mask=np.ones((4, 5)))
  with pytest.raises(ValueError, match="loss_mask"):
    train_step.check_batch(bad)


def test_train_state_from_a_loaded_model():
  mesh = parallel.make_mesh(config_lib.mesh_config())
  rules = parallel.make_rules()
  model = Bigram(nnx.Rngs(5))  # stands in for load_hf_dir(..., shardings=param_shardings(...))
  w = np.asarray(model.w[...])
  tx = optax.adamw(0.1)
  graphdef, state, shardings = train_state.train_state_from_model(model, tx, mesh, rules)
  assert np.array_equal(np.asarray(state.params["w"][...]), w) and int(state.step) == 0
  assert jax.tree.leaves(state.frozen) == []
  bsh = parallel.batch_shardings(_batch(), mesh, rules)
  step = train_step.make_train_step(causal_lm_loss, graphdef, tx,
                                    state_shardings=shardings, batch_shardings=bsh)
  state, metrics = step(state, parallel.host_to_global(_batch(), bsh, 4), {})
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
