"""Packed rows: several examples per row, each its own segment. A packed example must see exactly
what it sees alone (attention and positions never cross a segment boundary)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from refjax.data.packing import pack, prefix_filling, shared_prompt_prefix
from refjax.data.prompts import Encoded
from refjax.method.losses import causal_lm_loss
from refjax.models.decoder import SHARED_SEGMENT
from refjax.models.tiny import tiny_model


def _example(rng, n: int, prompt: int) -> Encoded:
  ids = rng.integers(3, 250, size=n).tolist()
  return Encoded(ids=ids, last_prompt_index=prompt - 1,
                 response_mask=[0] * prompt + [1] * (n - prompt))


def test_packed_examples_see_what_they_see_alone():
  rng = np.random.default_rng(0)
  examples = [_example(rng, n, 3) for n in (9, 5, 7, 4, 11)]
  packed = pack(examples, [1.0] * 5, length=16, pad_id=0, seed=0)
  a = packed.arrays
  assert packed.examples == 5 and packed.rows < 5  # several examples share a row
  assert packed.real_tokens == sum(len(e.ids) for e in examples)
  assert packed.padding == pytest.approx(1 - packed.real_tokens / a["tokens"].size)
  assert _segments_match_alone(a, head=[]) == 5


def _segments_match_alone(a, head: list[int]) -> int:
  """Checks every packed example's logits against the example run alone (`head` + its tokens:
  the shared prefix, if any, is the row's own first tokens); returns how many were checked."""
  model = tiny_model(seed=1)
  out = model(jnp.asarray(a["tokens"]), jnp.asarray(a["attention_mask"]),
              positions=jnp.asarray(a["positions"]), segment_ids=jnp.asarray(a["segment_ids"]))
  p, seen = len(head), 0
  for r in range(a["tokens"].shape[0]):
    assert (a["segment_ids"][r, :p] == SHARED_SEGMENT).all() and (a["tokens"][r, :p] == head).all()
    for seg in range(1, int(a["segment_ids"][r].max()) + 1):
      cols = np.flatnonzero(a["segment_ids"][r] == seg)
      assert (a["positions"][r, cols] == np.arange(p, p + len(cols))).all()  # from the prefix on
      ids = np.concatenate([head, a["tokens"][r, cols]]).astype(np.int32)
      alone = model(jnp.asarray(ids[None]), jnp.ones((1, len(ids)), jnp.int32)).logits[0, p:]
      np.testing.assert_allclose(np.asarray(out.logits[r, cols]), np.asarray(alone), atol=2e-4,
                                 rtol=2e-4)
      seen += 1
  return seen


def test_prefix_filling_is_the_smallest_seeded_prefix_that_fills_the_rows():
  rng = np.random.default_rng(3)
  examples = [_example(rng, int(n), 2) for n in rng.integers(4, 30, size=60)]
  ones = np.ones(60)
  total = pack(examples, ones, 32, 0, seed=0).rows
  for rows in (1, 5, total // 2, total - 1):
    index = prefix_filling(examples, rows, 32, 0, seed=0)
    assert index == sorted(set(index))
    got = pack([examples[i] for i in index], ones[:len(index)], 32, 0, seed=0).rows
    assert got >= rows  # enough rows for `rows` draws without a repeat
    order = np.random.default_rng([0, 1]).permutation(60)
    assert set(index) == set(order[:len(index)].tolist())  # a prefix of the seeded order
    shorter = sorted(order[:len(index) - 1].tolist())
    assert pack([examples[i] for i in shorter], ones[:len(shorter)], 32, 0, seed=0).rows < rows  # and the shortest
  assert prefix_filling(examples, total, 32, 0) == list(range(60))  # all of them are needed
  assert prefix_filling(examples, total + 10, 32, 0) == list(range(60))  # fewer rows than asked
  assert len(prefix_filling(examples, 3, 32, 0, seed=1)) < 60


def test_packing_without_segments_would_leak():
  """The check above can fail: without segment ids the second example attends to the first."""
  rng = np.random.default_rng(1)
  packed = pack([_example(rng, 6, 2), _example(rng, 6, 2)], [1.0, 1.0], length=12, pad_id=0)
  a = packed.arrays
  assert packed.rows == 1
  model = tiny_model(seed=1)
  mixed = model(jnp.asarray(a["tokens"]), jnp.asarray(a["attention_mask"])).logits[0, 6:]
  alone = model(jnp.asarray(a["tokens"][:, 6:]), jnp.ones((1, 6), jnp.int32)).logits[0]
  assert float(jnp.max(jnp.abs(mixed - alone))) > 1e-3


def test_dropped_examples_are_not_packed_and_weights_ride_on_responses():
  rng = np.random.default_rng(2)
  examples = [_example(rng, 5, 2), _example(rng, 5, 2), _example(rng, 5, 2)]
  packed = pack(examples, [1.0, 0.0, 0.5], length=16, pad_id=0)
  assert packed.examples == 2 and packed.real_tokens == 10
  assert sorted(set(packed.arrays["loss_mask"].ravel().tolist())) == [0.0, 0.5, 1.0]
  with pytest.raises(ValueError, match="longer than the row length"):
    pack([_example(rng, 20, 2)], [1.0], length=16, pad_id=0)


def test_cached_top_k_kd_approaches_exact_kd_on_a_tiny_model():
  """KD from the teacher's cached top-k (+ tail bucket) against exact KD, on tiny models' logits:
  never above it (a coarser distribution), equal at k = vocabulary, and within 5% at k = 32 when
  the teacher is as peaked as a trained LM (logits x8 here: top-32 holds most of the mass)."""
  from refjax.method.losses import kd_loss, kd_topk_loss, topk_targets
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 250, size=(2, 12)))
  mask = jnp.ones((2, 12), jnp.float32)
  student = tiny_model(seed=1)(tokens).logits
  for scale, k, rel in ((8.0, 32, 0.05), (1.0, 259, 0.0)):  # top-32 holds 85% of the mass here
    teacher = scale * tiny_model(seed=2)(tokens).logits
    exact = float(kd_loss(student, teacher, mask))
    cached = float(kd_topk_loss(student, *topk_targets(teacher, k), mask))
    assert cached <= exact + 1e-5
    assert abs(cached - exact) <= rel * exact + 1e-5, (k, cached, exact)


def _with_prefix(rng, head: list[int], n: int, prompt: int) -> Encoded:
  ids = head + rng.integers(3, 250, size=n).tolist()
  p = len(head) + prompt
  return Encoded(ids=ids, last_prompt_index=p - 1, response_mask=[0] * p + [1] * (len(ids) - p))


def test_a_shared_prefix_is_held_once_per_row_and_each_example_sees_what_it_sees_alone():
  rng = np.random.default_rng(4)
  head = [7, 9, 11, 13, 17]
  examples = [_with_prefix(rng, head, n, 2) for n in (6, 3, 8, 4, 5, 9, 2)]
  assert shared_prompt_prefix(examples) == 5
  packed = pack(examples, [1.0] * 7, length=20, pad_id=0, seed=0, shared_prefix=5)
  a = packed.arrays
  assert packed.shared_prefix == 5 and packed.examples == 7
  assert packed.real_tokens == 5 * packed.rows + sum(len(e.ids) - 5 for e in examples)
  assert packed.rows < pack(examples, [1.0] * 7, length=20, pad_id=0, seed=0).rows
  assert _segments_match_alone(a, head) == 7


def test_a_shared_prefix_gives_the_same_loss_and_gradient():
  """Token-weighted CE and its gradient over the same examples, prefix per example vs per row."""
  rng = np.random.default_rng(5)
  head = [5, 6, 7, 8]
  examples = [_with_prefix(rng, head, n, 2) for n in (6, 3, 8, 4, 5, 9, 2, 7)]
  w = [1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]
  model = tiny_model(seed=2)

  def loss_and_grad(shared):
    a = pack(examples, w, length=24, pad_id=0, seed=0, shared_prefix=shared).arrays
    batch = {k: jnp.asarray(v) for k, v in a.items()}
    batch["weights"] = jnp.ones(a["tokens"].shape[0], jnp.float32)
    graphdef, state = nnx.split(model)
    f = lambda s: causal_lm_loss(nnx.merge(graphdef, s), batch, None, {})[0]
    return jax.value_and_grad(f)(state)

  (l0, g0), (l1, g1) = loss_and_grad(0), loss_and_grad(4)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_a_shared_prefix_must_be_shared_and_within_every_prompt():
  rng = np.random.default_rng(6)
  examples = [_with_prefix(rng, [5, 6], 4, 1), _with_prefix(rng, [5, 9], 4, 1)]
  assert shared_prompt_prefix(examples) == 1
  with pytest.raises(ValueError, match="shared_prefix=2: example 1"):
    pack(examples, [1.0, 1.0], length=16, pad_id=0, shared_prefix=2)
  short = [_with_prefix(rng, [5, 6, 7], 2, 0), _with_prefix(rng, [5, 6, 7], 4, 2)]
  assert shared_prompt_prefix(short) == 2  # the last prompt token stays each example's own
