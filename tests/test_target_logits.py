"""Logits only at target positions (`finetune.target_logits`, `teacher.target_logits` < 1) give the
loss and gradients of logits everywhere, for every student loss term and the teacher's loss,
whether a batch's targets fit the gathered slots or not; the slots per step come from the rows'
target counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from refjax.method.losses import topk_targets
from refjax.method.student import ALIGN, TARGETS, TEACHER, student_loss_fn
from refjax.method.teacher import FEATURE, teacher_loss_fn
from refjax.models.tiny import tiny_model


def _rows(rng, b, t, vocab, targets):
  """[b,t] rows whose loss mask marks `targets` positions in total (per-row weights vary)."""
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.zeros(b * t, np.float32)
  mask[rng.choice(b * t, targets, replace=False)] = 1.0
  return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones((b, t), jnp.int32),
          "loss_mask": jnp.asarray(mask.reshape(b, t)),
          "weights": jnp.asarray(rng.uniform(0.5, 1.5, b).astype(np.float32))}


def _loss_and_grads(loss_fn, model, batch, extras):
  graphdef, state = nnx.split(model)

  def f(state):
    return loss_fn(nnx.merge(graphdef, state), batch, None, extras)

  (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
  return float(loss), aux, grads


def _assert_same(sparse, dense):
  """Loss, every aux metric and every gradient leaf of the two runs agree."""
  np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-5)
  for k in dense[1]:
    np.testing.assert_allclose(float(sparse[1][k]), float(dense[1][k]), rtol=1e-5, atol=1e-7,
                               err_msg=k)
  for g_s, g_d in zip(jax.tree.leaves(sparse[2]), jax.tree.leaves(dense[2])):
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_d), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("kind", ["ce", "kd_cached", "kd_exact"])
@pytest.mark.parametrize("user_targets", [5, 30])  # 16 slots of 4 x 8: fits / takes every position
def test_target_logits_equal_logits_everywhere(kind, user_targets):
  rng = np.random.default_rng(user_targets)
  student, teacher = tiny_model(0), tiny_model(1)
  vocab = student.cfg.vocab_size
  batch = _rows(rng, 4, 8, vocab, user_targets)
  kw = {"kd": 0.0, "align_ce": 0.0, "kd_temperature": 2.0, "kd_direction": "forward"}
  extras = {}
  if kind != "ce":
    a = _rows(rng, 2, 8, vocab, 6)
    batch.update({ALIGN + k: v for k, v in a.items()})
    kw.update(kd=1.0, align_ce=0.5, kd_direction="reverse" if kind == "kd_exact" else "forward")
    if kind == "kd_cached":
      t_logits = teacher(a["tokens"], a["attention_mask"]).logits
      batch.update({ALIGN + k: v for k, v in zip(TARGETS, topk_targets(t_logits, 5, 2.0))})
    else:
      t_graphdef, extras[TEACHER] = nnx.split(teacher)
      kw["teacher_graphdef"] = t_graphdef
  dense = _loss_and_grads(student_loss_fn(**kw), student, batch, extras)
  sparse = _loss_and_grads(student_loss_fn(**kw, logit_slots={"": 16, ALIGN: 8}), student, batch,
                           extras)
  _assert_same(sparse, dense)
  # 30 targets do not fit 16 slots: the batch takes every position (and says so)
  assert float(sparse[1]["logits_everywhere/user"]) == (1.0 if user_targets > 16 else 0.0)
  if kind != "ce":
    assert float(sparse[1]["logits_everywhere/align"]) == 0.0  # 6 targets in 8 slots


@pytest.mark.parametrize("targets", [5, 30])  # 16 slots of 4 x 8: fits / takes every position
def test_teacher_target_logits_equal_logits_everywhere(targets):
  rng = np.random.default_rng(targets)
  model = tiny_model(0)
  batch = _rows(rng, 4, 8, model.cfg.vocab_size, targets)
  batch.update(last_prompt_index=jnp.asarray([2, 3, 1, 4], jnp.int32),
               labels_sign=jnp.asarray([1.0, -1.0, 0.0, 1.0], jnp.float32))
  extras = {FEATURE: jnp.asarray(rng.normal(size=model.cfg.hidden_size), jnp.float32)}
  dense = _loss_and_grads(teacher_loss_fn(1, 0.5), model, batch, extras)
  sparse = _loss_and_grads(teacher_loss_fn(1, 0.5, logit_slots=16), model, batch, extras)
  _assert_same(sparse, dense)


def test_logit_slots_from_target_counts():
  from refjax.method.losses import logit_slots, target_counts
  rows = {"loss_mask": np.array([[0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], np.float32),
          "weights": np.array([1.0, 1.0, 0.0], np.float32)}
  np.testing.assert_array_equal(target_counts(rows), [2, 1, 0])  # the first token is no target
  assert logit_slots([2, 1, 0], 2, 4, share=0.5) == 4 and logit_slots([2], 2, 4, share=1.0) == 8
  counts = np.random.default_rng(0).integers(0, 100, 500)
  auto = logit_slots(counts, 8, 256)
  assert auto % 64 == 0 and 8 * counts.mean() + 3 * np.sqrt(8) * counts.std() <= auto < 2048
  assert logit_slots(np.full(10, 250), 8, 256) == 2048  # never more than the step's positions
