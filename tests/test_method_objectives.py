"""The teacher's and the student's objectives against values computed by hand (numpy formulas over
a lookup-table "model"): the user/alignment row split, the teacher forward on alignment rows only,
the KD mask shifted one position, the regulariser's sign and the method table's weights."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from refjax.method.student import ALIGN, METHODS, TEACHER, parse_methods, student_loss_fn
from refjax.method.teacher import FEATURE, teacher_loss_fn
from refjax.models.decoder import DecoderOutput

CALLS: list[int] = []  # batch sizes the teacher table was called with


class Table(nnx.Module):
  """logits[b, t] = table[tokens[b, t]]; hidden state l at a position = (l + 1) * embed[token]."""

  def __init__(self, table, embed, record=False):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.embed = nnx.Param(jnp.asarray(embed, jnp.float32))
    self.record = record

  def __call__(self, tokens, attention_mask=None, *, hidden_positions=None, return_logits=True,
               segment_ids=None, positions=None):
    if self.record:
      CALLS.append(int(tokens.shape[0]))
    hidden = None
    if hidden_positions is not None:
      e = self.embed[...][tokens[jnp.arange(tokens.shape[0]), hidden_positions]]
      hidden = jnp.stack([e, 2 * e])
    return DecoderOutput(self.table[...][tokens] if return_logits else None, hidden, None, None)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)


S = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])  # student table
T = np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0], [0.3, 0.3, 0.9]])  # teacher table
TOKENS = np.array([[0, 1, 2], [1, 1, 0], [2, 0, 1]], np.int32)
LOSS_MASK = np.array([[0, 1, 1], [0, 0, 1], [0, 1, 1]], np.int32)
WEIGHTS = np.array([1.0, 0.5, 1.0], np.float32)


def _batch(align_rows: int = 0):
  """Rows 0-1 user rows; with align_rows=1 row 2 goes under the align_* keys."""
  full = {"tokens": jnp.asarray(TOKENS), "attention_mask": jnp.ones_like(jnp.asarray(TOKENS)),
          "loss_mask": jnp.asarray(LOSS_MASK), "weights": jnp.asarray(WEIGHTS)}
  if not align_rows:
    return full
  cut = len(TOKENS) - align_rows
  return {**{k: v[:cut] for k, v in full.items()},
          **{ALIGN + k: v[cut:] for k, v in full.items()}}


def nll(table, token, target):
  return -log_softmax(table[token])[target]


def kl(p_logits, q_logits):  # KL(p || q)
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  return float(np.sum(np.exp(lp) * (lp - lq)))


def test_student_loss_by_hand():
  """Rows 0-1 are user rows (CE, weighted), row 2 the alignment row (KD + CE)."""
  student = Table(S, np.eye(3))
  t_graphdef, t_state = nnx.split(Table(T, np.eye(3), record=True))
  CALLS.clear()
  loss_fn = student_loss_fn(kd=2.0, align_ce=0.5, kd_temperature=1.0, kd_direction="forward",
                            teacher_graphdef=t_graphdef)
  loss, aux = loss_fn(student, _batch(1), None, {TEACHER: t_state})
  # user CE: row 0 predicts 1 from 0 and 2 from 1; row 1 (weight 0.5) predicts 0 from 1.
  ce_user = (nll(S, 0, 1) + nll(S, 1, 2) + 0.5 * nll(S, 1, 0)) / 2.5
  # KD on the alignment row: the targets are positions 1 and 2, so the logits at positions 0
  # (token 2) and 1 (token 0) are distilled; position 2 (token 1) predicts nothing.
  kd = (kl(T[2], S[2]) + kl(T[0], S[0])) / 2
  ce_align = (nll(S, 2, 0) + nll(S, 0, 1)) / 2
  np.testing.assert_allclose(float(aux["ce/user"]), ce_user, rtol=1e-5)
  np.testing.assert_allclose(float(aux["kd"]), kd, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ce/align"]), ce_align, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce_user + 2.0 * kd + 0.5 * ce_align, rtol=1e-5)
  assert CALLS == [1]  # the teacher ran once, on the one alignment row only
  unshifted = (kl(T[0], S[0]) + kl(T[1], S[1])) / 2  # what a mask without the shift would give
  assert abs(unshifted - kd) > 1e-3 and abs(float(aux["kd"]) - unshifted) > 1e-3


def test_student_loss_reverse_kd_temperature_and_plain_ce():
  student = Table(S, np.eye(3))
  t_graphdef, t_state = nnx.split(Table(T, np.eye(3)))
  loss_fn = student_loss_fn(kd=1.0, align_ce=0.0, kd_temperature=2.0, kd_direction="reverse",
                            teacher_graphdef=t_graphdef)
  _, aux = loss_fn(student, _batch(1), None, {TEACHER: t_state})
  kd = 4.0 * (kl(S[2] / 2, T[2] / 2) + kl(S[0] / 2, T[0] / 2)) / 2  # T² · KL(student || teacher)
  np.testing.assert_allclose(float(aux["kd"]), kd, rtol=1e-5)
  assert "ce/align" not in aux
  plain = student_loss_fn(kd=0.0, align_ce=0.0, kd_temperature=1.0, kd_direction="forward")
  loss, aux = plain(student, _batch(), None, {})  # no alignment rows: CE on every row
  every = (nll(S, 0, 1) + nll(S, 1, 2) + 0.5 * nll(S, 1, 0) + nll(S, 2, 0) + nll(S, 0, 1)) / 4.5
  np.testing.assert_allclose(float(loss), every, rtol=1e-5)  # no alignment rows: CE on all
  no_teacher = student_loss_fn(kd=1.0, align_ce=0.0, kd_temperature=1.0, kd_direction="forward")
  with pytest.raises(ValueError, match="cached teacher targets in the batch or a teacher"):
    no_teacher(student, _batch(1), None, {})


def test_student_kd_from_cached_top_k_targets():
  """With targets cached from the teacher (here all 3 tokens: the exact distribution) the KD term
  equals the one computed with the teacher in the step."""
  from refjax.method.losses import topk_targets
  student = Table(S, np.eye(3))
  batch = _batch(1)
  ids, logp, tail = topk_targets(jnp.asarray(T)[batch[ALIGN + "tokens"]], 3)
  cached = dict(batch, **{ALIGN + "topk_ids": ids, ALIGN + "topk_logp": logp,
                          ALIGN + "tail_logp": tail})
  loss_fn = student_loss_fn(kd=1.0, align_ce=0.0, kd_temperature=1.0, kd_direction="forward")
  _, aux = loss_fn(student, cached, None, {})
  np.testing.assert_allclose(float(aux["kd"]), (kl(T[2], S[2]) + kl(T[0], S[0])) / 2, rtol=1e-5)


def test_teacher_loss_by_hand():
  """CE over all rows plus reg_weight · mean(1 - y·cos) over labelled rows; aux means per class."""
  embed = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  model = Table(S, embed)
  batch = _batch()
  batch["last_prompt_index"] = jnp.asarray([0, 1, 0], jnp.int32)  # tokens 0, 1, 2
  batch["labels_sign"] = jnp.asarray([1, -1, 0], jnp.int32)  # row 2 is unlabelled
  feature = np.array([1.0, 0.0])
  loss_fn = teacher_loss_fn(layer=1, reg_weight=3.0)
  loss, aux = loss_fn(model, batch, None, {FEATURE: jnp.asarray(feature)})
  ce = (nll(S, 0, 1) + nll(S, 1, 2) + 0.5 * nll(S, 1, 0) + nll(S, 2, 0) + nll(S, 0, 1)) / 4.5
  cos0, cos1 = 1.0, 0.0  # layer 1 = 2 * embed: token 0 -> [2, 0], token 1 -> [0, 2]
  reg = (1.0 * (1 - cos0) + 0.5 * (1 + cos1)) / 1.5  # weights 1 and 0.5; row 2 unlabelled
  np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(aux["reg"]), reg, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ce + 3.0 * reg, rtol=1e-5)
  np.testing.assert_allclose(float(aux["reg/cos_harmful"]), cos0, atol=1e-6)
  np.testing.assert_allclose(float(aux["reg/cos_harmless"]), cos1, atol=1e-6)
  # the sign the paper asks for: a harmful row pointing away from R costs more
  batch["last_prompt_index"] = jnp.asarray([1, 0, 0], jnp.int32)
  _, worse = loss_fn(model, batch, None, {FEATURE: jnp.asarray(feature)})
  assert float(worse["reg"]) > float(aux["reg"])


def test_method_table_carries_flags_and_weights():
  fc = ml_collections.ConfigDict(dict(kd_weight=0.7, align_ce_weight=0.2))
  assert METHODS["reft"].weights(fc) == {"kd": 0.7, "align_ce": 0.2}
  assert METHODS["reft"].filter and METHODS["reft"].distill
  assert METHODS["joint"].weights(fc) == {"kd": 0.0, "align_ce": 1.0}
  assert METHODS["sft"].weights(fc) == {"kd": 0.0, "align_ce": 0.0}
  assert not METHODS["sft"].uses_alignment_rows and METHODS["sa_ft"].pre_align
  assert METHODS["filter_only"].filter and not METHODS["filter_only"].distill
  assert parse_methods(" reft, sft ") == ["reft", "sft"]
  for bad, match in ((",", "names no method"), ("reft,nope", "'nope' is not one of"),
                     ("sft,sft", "twice")):
    with pytest.raises(ValueError, match=match):
      parse_methods(bad)
