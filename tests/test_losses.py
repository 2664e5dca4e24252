"""The cosine regulariser and the KD term: hand-computed values, signs, gradients, scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.method.losses import cosine_regulariser, kd_loss

R = jnp.array([1.0, 0.0])
# Unit rows at cos = 1, 0, -0.6 (the last scaled: norms must not matter), labels +1, -1, -1.
F = jnp.array([[2.0, 0.0], [0.0, 1.0], [-3.0, 4.0]])
Y = jnp.array([1.0, -1.0, -1.0])
W = jnp.array([1.0, 1.0, 2.0])


@pytest.mark.parametrize("form,per_row,kw", [
    ("one_minus_cos", [1 - 1.0, 1 + 0.0, 1 - 0.6], {}),
    ("squared", [(1 - 1) ** 2, (0 + 1) ** 2, (-0.6 + 1) ** 2], {}),
    ("margin", [max(0.0, 0.5 - 1.0), max(0.0, 0.5 - 0.0), max(0.0, 0.5 - 0.6)], {"margin": 0.5}),
    ("margin", [max(0.0, 0.8 - 1.0), max(0.0, 0.8 - 0.0), max(0.0, 0.8 - 0.6)], {"margin": 0.8}),
])
def test_regulariser_hand_computed(form, per_row, kw):
  want = np.dot(W, per_row) / W.sum()
  got = cosine_regulariser(F, R, Y, W, form=form, **kw)
  assert float(got) == pytest.approx(float(want), abs=1e-6)
  unweighted = cosine_regulariser(F, R, Y, form=form, **kw)
  assert float(unweighted) == pytest.approx(float(np.mean(per_row)), abs=1e-6)


@pytest.mark.parametrize("form", ["one_minus_cos", "squared", "margin"])
def test_regulariser_gradient_moves_cos_toward_label(form):
  rng = np.random.default_rng(0)
  r = jnp.asarray(rng.normal(size=8), jnp.float32)
  f = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
  y = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
  w = jnp.ones(6)

  def cos(x):
    return jnp.sum(x * r, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(r))

  loss = lambda x, rr: cosine_regulariser(x, rr, y, w, form=form, margin=1.5)
  gf, gr = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, r)
  assert np.all(np.asarray(gr) == 0.0), "no gradient may flow into the refusal feature"
  stepped = f - 0.05 * gf
  delta = np.asarray(cos(stepped) - cos(f))
  assert np.all(delta[:3] > 0), "harmful rows: cos must rise toward +1"
  assert np.all(delta[3:] < 0), "harmless rows: cos must fall toward -1"
  assert float(loss(stepped, r)) < float(loss(f, r))


def test_regulariser_ignores_zero_weight_rows_and_rejects_bad_input():
  base = cosine_regulariser(F[:2], R, Y[:2], W[:2])
  padded = cosine_regulariser(jnp.concatenate([F[:2], jnp.full((1, 2), 1e6)]), R,
                              jnp.array([1.0, -1.0, 1.0]), jnp.array([1.0, 1.0, 0.0]))
  assert float(padded) == pytest.approx(float(base))
  g = jax.jit(jax.grad(lambda x: cosine_regulariser(x, R, Y, jnp.array([1.0, 1.0, 0.0]))))(F)
  assert np.all(np.asarray(g[2]) == 0.0)
  assert float(cosine_regulariser(F, R, Y, jnp.zeros(3))) == 0.0
  assert np.isfinite(float(cosine_regulariser(jnp.zeros((3, 2)), R, Y, W)))
  with pytest.raises(ValueError, match="reg_form"):
    cosine_regulariser(F, R, Y, W, form="cosine")
  with pytest.raises(ValueError, match="expected \\[B,D\\], \\[D\\]"):
    cosine_regulariser(F, jnp.ones(3), Y, W)


def _kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# Student and teacher logits [B=1, T=2, V=3]; the second token is masked out.
S = np.array([[[1.0, 2.0, 0.5], [0.0, 0.0, 9.0]]], np.float32)
T = np.array([[[2.0, 0.0, 1.0], [5.0, 0.0, 0.0]]], np.float32)
M = np.array([[1.0, 0.0]], np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_hand_computed_both_directions(temperature):
  ps, pt = _softmax(S[0, 0] / temperature), _softmax(T[0, 0] / temperature)
  fwd = kd_loss(jnp.asarray(S), jnp.asarray(T), jnp.asarray(M), temperature=temperature)
  rev = kd_loss(jnp.asarray(S), jnp.asarray(T), jnp.asarray(M), temperature=temperature,
                direction="reverse")
  assert float(fwd) == pytest.approx(temperature ** 2 * _kl(pt, ps), rel=1e-5)
  assert float(rev) == pytest.approx(temperature ** 2 * _kl(ps, pt), rel=1e-5)
  assert abs(float(fwd) - float(rev)) > 1e-3  # the directions really differ


def test_kd_sums_over_vocab_and_averages_over_tokens():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 5, 7)).astype(np.float32)
  t = rng.normal(size=(2, 5, 7)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  per_token = np.array([[_kl(_softmax(t[b, i]), _softmax(s[b, i])) for i in range(5)]
                        for b in range(2)])
  want = (per_token * mask).sum() / mask.sum()
  got = kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Summing over time instead of the vocabulary would change the answer:
  wrong = np.mean([_kl(_softmax(t[0, :, v]), _softmax(s[0, :, v])) for v in range(7)])
  assert abs(float(got) - wrong) > 1e-3
  assert float(kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros((2, 5)))) == 0.0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_zero_with_zero_gradient_when_equal(direction):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 11)) * 3, jnp.float32)
  mask = jnp.ones((2, 3))
  f = lambda s, t: kd_loss(s, t, mask, temperature=2.0, direction=direction)
  value, (gs, gt) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, x)
  assert abs(float(value)) < 1e-6
  assert np.abs(np.asarray(gs)).max() < 1e-6
  assert np.all(np.asarray(gt) == 0.0)  # teacher logits are under stop_gradient


def test_kd_temperature_squared_scaling():
  # Doubling T and the logits leaves the distributions unchanged: the loss scales by exactly 4.
  s, t, m = jnp.asarray(S), jnp.asarray(T), jnp.asarray(M)
  base = float(kd_loss(s, t, m, temperature=1.0))
  assert float(kd_loss(2 * s, 2 * t, m, temperature=2.0)) == pytest.approx(4 * base, rel=1e-5)


def test_kd_rejects_bad_input():
  s, t, m = jnp.asarray(S), jnp.asarray(T), jnp.asarray(M)
  with pytest.raises(ValueError, match="kd_direction"):
    kd_loss(s, t, m, direction="both")
  with pytest.raises(ValueError, match="kd_temperature"):
    kd_loss(s, t, m, temperature=0.0)
  with pytest.raises(ValueError, match="mask"):
    kd_loss(s, t, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="teacher logits"):
    kd_loss(s, t[..., :2], m)


def test_losses_jit_and_bf16_inputs_compute_in_fp32():
  f = jax.jit(lambda s, t, m: kd_loss(s, t, m, temperature=2.0))
  got = f(jnp.asarray(S, jnp.bfloat16), jnp.asarray(T, jnp.bfloat16), jnp.asarray(M))
  assert got.dtype == jnp.float32
  reg = jax.jit(lambda x: cosine_regulariser(x, R.astype(jnp.bfloat16), Y, W))(
      F.astype(jnp.bfloat16))
  assert reg.dtype == jnp.float32
