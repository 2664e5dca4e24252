"""Packed rows: several examples per row, each its own segment. A packed example must see exactly
what it sees alone (attention and positions never cross a segment boundary)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from refjax.data.packing import pack, prefix_filling
from refjax.data.prompts import Encoded
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
  model = tiny_model(seed=1)
  out = model(jnp.asarray(a["tokens"]), jnp.asarray(a["attention_mask"]),
              positions=jnp.asarray(a["positions"]), segment_ids=jnp.asarray(a["segment_ids"]))
  seen = 0
  for r in range(packed.rows):
    for seg in range(1, int(a["segment_ids"][r].max()) + 1):
      cols = np.flatnonzero(a["segment_ids"][r] == seg)
      assert (a["positions"][r, cols] == np.arange(len(cols))).all()  # positions restart
      ids = a["tokens"][r, cols]
      alone = model(jnp.asarray(ids[None]), jnp.ones((1, len(cols)), jnp.int32)).logits[0]
      np.testing.assert_allclose(np.asarray(out.logits[r, cols]), np.asarray(alone), atol=2e-4,
                                 rtol=2e-4)
      seen += 1
  assert seen == 5


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
