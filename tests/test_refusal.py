"""Refusal feature: streaming difference of means, cosine scores, AUROC, layer choice, artifact."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from refjax.data import batches as batch_lib
from refjax.method import features
from refjax.method import refusal
from refjax.stages import workdir as workdir_lib

from refjax.models.decoder import Decoder, keep_layers
from refusal_fixtures import TINY_CONFIG, WORDS, FakeExample, tiny_format, tiny_model


def _planted(rng, n, d=16, layers=3, strength=3.0):
  """Features [layers,n,d] and labels: harmful rows are shifted along a unit vector per layer."""
  dirs = rng.normal(size=(layers, d))
  dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
  labels = rng.integers(0, 2, n)
  feats = rng.normal(size=(layers, n, d)) + 5.0  # a shared offset, as real hidden states have
  feats += strength * labels[None, :, None] * dirs[:, None, :]
  return feats.astype(np.float32), labels.astype(np.int32), dirs


def _stream(feats, labels, batch_size, rng):
  """Class sums over fixed-size batches whose padding rows hold garbage and valid=0."""
  step = jax.jit(lambda acc, f, v, h: acc + refusal.class_sums(f, v, h))
  layers, n, d = feats.shape
  acc = refusal.ClassSums.zeros(layers, d)
  for s in range(0, n, batch_size):
    f = rng.normal(size=(layers, batch_size, d)).astype(np.float32) * 1e3  # garbage padding
    v = np.zeros(batch_size, np.int32)
    h = rng.integers(0, 2, batch_size).astype(np.int32)
    m = min(batch_size, n - s)
    f[:, :m], v[:m], h[:m] = feats[:, s:s + m], 1, labels[s:s + m]
    acc = step(acc, f, v, h)
  return acc


def test_planted_direction_is_recovered():
  rng = np.random.default_rng(0)
  feats, labels, dirs = _planted(rng, 400)
  sums = _stream(feats, labels, 32, rng)
  r = np.asarray(refusal.refusal_feature(sums))
  cos = np.asarray(refusal.cosine_scores(r[:, None, :], dirs))  # [L,1]: one cosine per layer
  assert r.shape == (3, 16)
  assert np.all(cos[:, 0] > 0.99), cos


def test_streaming_with_padding_equals_one_shot_mean():
  rng = np.random.default_rng(1)
  feats, labels, _ = _planted(rng, 77)
  sums = _stream(feats, labels, 16, rng)  # 5 batches, the last one mostly padding
  want = feats[:, labels == 1].mean(1) - feats[:, labels == 0].mean(1)
  np.testing.assert_allclose(np.asarray(refusal.refusal_feature(sums)), want, rtol=1e-5, atol=1e-5)
  assert int(sums.n_harmful) == int(labels.sum())
  assert int(sums.n_harmless) == int((1 - labels).sum())


def test_cosine_scores_shapes_and_zero_vectors():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(3, 5, 8)).astype(np.float32)
  r = rng.normal(size=(3, 8)).astype(np.float32)
  got = np.asarray(refusal.cosine_scores(f, r))
  norms = np.linalg.norm(f, axis=-1) * np.linalg.norm(r, axis=-1)[:, None]
  want = np.einsum("lbd,ld->lb", f, r) / norms
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(refusal.cosine_scores(f[1], r[1])), want[1], rtol=1e-5)
  zero = np.asarray(refusal.cosine_scores(np.zeros((2, 8), np.float32), r[0]))
  assert np.all(zero == 0.0)
  grad = jax.jit(jax.grad(lambda x: refusal.cosine_scores(x, jnp.asarray(r[0])).sum()))
  g = grad(jnp.zeros((2, 8)))
  assert np.all(np.isfinite(np.asarray(g)))


def _brute_auroc(s, y):
  pos, neg = s[y == 1], s[y == 0]
  wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return wins / (len(pos) * len(neg))


def test_auroc_matches_brute_force_with_ties():
  rng = np.random.default_rng(3)
  for _ in range(5):
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, 60).astype(float)  # many ties
    assert refusal.auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)
  assert refusal.auroc([1.0, 1.0, 1.0], [1, 0, 1]) == pytest.approx(0.5)
  assert refusal.auroc([0.1, 0.9], [0, 1]) == 1.0 and refusal.auroc([0.9, 0.1], [0, 1]) == 0.0
  per_layer = rng.normal(size=(4, 60))
  got = refusal.auroc(per_layer, y)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, [_brute_auroc(r, y) for r in per_layer], atol=1e-12)
  with pytest.raises(ValueError, match="both classes"):
    refusal.auroc([0.1, 0.2], [1, 1])


def test_choose_layer_is_the_one_rule():
  """Highest AUROC in the window; ties (at 4 decimals) go to the larger d', then the earliest."""
  a = [0.5, 0.7, 0.9, 0.95, 0.95, 0.99]
  assert refusal.choose_layer(a, (1, 5)) == 5
  assert refusal.choose_layer(a, (1, 4)) == 3  # tie 0.95, no d' -> earliest layer
  assert refusal.choose_layer(a, (1, 4), [0, 0, 0, 2.0, 3.5, 0]) == 4  # tie -> larger d'
  # 0.99991 and 0.99994 are equal at 4 decimals: the larger separation wins over the raw AUROC
  assert refusal.choose_layer([0.5, 0.99994, 0.99991], (1, 2), [0, 1.0, 2.0]) == 2
  assert refusal.choose_layer([0.5, float("nan"), 0.6], (1, 2)) == 2  # NaN never wins
  assert refusal.choose_layer([0.99, 0.6, 0.7], (1, 2)) == 2  # the window excludes index 0
  with pytest.raises(ValueError, match="layer_range"):
    refusal.choose_layer(a, (2, 6))


def test_layer_window_and_separation():
  assert refusal.layer_window((0.25, 0.85), 31) == (7, 26)  # SmolLM2: 30 layers + embeddings
  assert refusal.layer_window((0.0, 1.0), 3) == (1, 2)  # never index 0
  scores = np.array([[1.0, 1.2, 0.0, 0.2], [0.5, 0.5, 0.5, 0.5]])
  d = refusal.separation(scores, np.array([1, 1, 0, 0]))
  np.testing.assert_allclose(d, [1.0 / 0.1, 0.0], rtol=1e-6)  # (1.1 - 0.1) / pooled std 0.1


def test_artifact_round_trip_and_missing_file(tmp_path):
  rng = np.random.default_rng(4)
  feat = rng.normal(size=(5, 8)).astype(np.float32)
  meta = {"model_hash": "abc", "n_harmful": 10, "n_harmless": 12,
          "layer_auroc": np.array([0.5, 0.8, float("nan"), 0.9, 0.7]), "layer_range": (1, 4)}
  workdir_lib.save_refusal_feature(tmp_path, feat, 3, meta)
  art = workdir_lib.load_refusal_feature(tmp_path)
  np.testing.assert_array_equal(art.feature, feat)
  assert art.layer == 3 and np.array_equal(art.direction, feat[3])
  assert art.meta["position"] == "last_prompt_token"
  assert art.meta["model_hash"] == "abc" and art.meta["n_harmful"] == 10
  assert art.meta["layer_auroc"] == [0.5, 0.8, None, 0.9, 0.7]
  with pytest.raises(ValueError, match="missing"):
    workdir_lib.save_refusal_feature(tmp_path / "x", feat, 3, {"model_hash": "abc"})
  with pytest.raises(ValueError, match="layer=7"):
    workdir_lib.save_refusal_feature(tmp_path / "x", feat, 7, meta)
  (tmp_path / workdir_lib.META_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="refusal_feature.json"):
    workdir_lib.load_refusal_feature(tmp_path)
  with pytest.raises(FileNotFoundError, match="refusal_feature.npz"):
    workdir_lib.load_refusal_feature(tmp_path / "empty")


BUCKETS = (64,)  # one padded length for every tiny batch: jit compiles once per function


def tiny_examples(n=11):
  """Placeholder prompts of two token lengths, alternating labels."""
  return [FakeExample(id=f"t:{i}", instruction=" ".join(WORDS[i:i + (3 if i % 3 else 7)]),
                      label="harmful" if i % 2 else "harmless") for i in range(n)]


def _reference_features(model, fmt, examples):
  """Eager (no jit), one call: every layer's hidden state at each row's own last prompt token.

  Rows are right-padded to the longest prompt only; with causal attention the pads after a row's
  last prompt token cannot change it, so this equals running each prompt alone.
  """
  enc = [fmt.encode(ex.instruction, ex.input) for ex in examples]
  n = max(len(e.ids) for e in enc)
  ids = np.array([e.ids + [fmt.pad_id] * (n - len(e.ids)) for e in enc])
  out = model(jnp.asarray(ids), return_all_hidden=True, return_logits=False)
  last = np.array([e.last_prompt_index for e in enc])
  return np.asarray(out.all_hidden)[:, np.arange(len(enc)), last]


@pytest.fixture(scope="module")
def tiny():
  model, fmt = tiny_model(), tiny_format()
  examples = tiny_examples()
  return model, fmt, examples, _reference_features(model, fmt, examples)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("share", [False, True])
def test_extract_features_matches_eager_reference(tiny, side, share):
  model, fmt, examples, ref = tiny
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=4, side=side, buckets=BUCKETS,
                                     share_prefix=share)
  assert len(batches) == 3 and sum(int(b["valid"].sum()) for b in batches) == len(examples)
  if share:  # the template's opening is held once per batch; the rows hold the rest
    full = [fmt.encode(e.instruction, e.input).ids for e in examples]
    p = len(batches[0]["prefix"])
    assert p > 10 and all(ids[:p] == full[0][:p] for ids in full)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(map(len, full)) - p * 11
  got = features.extract_features(model, batches, progress=False)
  assert got.shape == (model.cfg.num_layers + 1, len(examples), model.cfg.hidden_size)
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-5)


def test_extract_features_layer_subset(tiny):
  model, fmt, examples, ref = tiny
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=4, buckets=BUCKETS)
  sub = features.extract_features(model, batches, layers=(2, 0), progress=False)
  np.testing.assert_allclose(sub, ref[[2, 0]], rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="out of range"):
    features.extract_features(model, batches, layers=(3,), progress=False)


@pytest.mark.parametrize("share", [False, True])
def test_refusal_feature_and_scores_on_tiny_model(tiny, share):
  model, fmt, examples, ref = tiny
  labels = batch_lib.harmful_labels(examples)
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=4, labels=labels, buckets=BUCKETS,
                                     share_prefix=share)
  feature, sums = features.compute_refusal_feature(model, batches, progress=False)
  want = ref[:, labels == 1].mean(1) - ref[:, labels == 0].mean(1)
  np.testing.assert_allclose(np.asarray(feature), want, rtol=1e-3, atol=1e-5)
  assert int(sums.n_harmful) + int(sums.n_harmless) == len(examples)
  scores = features.score_batches(model, batches, feature, progress=False)
  # Layer 0 (embeddings of the same last template token) has a ~0 feature: its cosines are noise.
  np.testing.assert_allclose(scores[1:], np.asarray(refusal.cosine_scores(ref, want))[1:],
                             atol=1e-4)
  one = batch_lib.prompt_batches(examples[:3], fmt, batch_size=4, labels=[1, 1, 1], buckets=BUCKETS)
  with pytest.raises(ValueError, match="both classes"):
    features.compute_refusal_feature(model, one, progress=False)
  with pytest.raises(ValueError, match="label="):
    batch_lib.harmful_labels([FakeExample(id="x", instruction="w1", label="positive")])


def test_model_hash_changes_with_params(tiny):
  a = tiny[0]
  b = nnx.clone(a)
  assert features.model_hash(a) == features.model_hash(b)
  b.norm.scale[...] = b.norm.scale[...] * 2
  assert features.model_hash(a) != features.model_hash(b)


_SHARDED = textwrap.dedent("""
    import os, sys
    # -O0 roughly halves XLA:CPU compile time; this checks partitioning, not code generation.
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                               "--xla_backend_optimization_level=0")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from refjax.method import features, refusal
    from refjax.models import abstract_decoder
    from refusal_fixtures import TINY_CONFIG
    graphdef, abstract = nnx.split(abstract_decoder(TINY_CONFIG))  # the parent's params, no init
    with np.load(sys.argv[1]) as data:
      batches = [{k: data[f"{i}/{k}"] for k in features.BATCH_KEYS + ("harmful",)}
                 for i in range(int(data["n"]))]
      params = [data[f"param{i}"] for i in range(len(jax.tree.leaves(abstract)))]
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.tree.unflatten(jax.tree.structure(abstract), params)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    acc = refusal.ClassSums.zeros(TINY_CONFIG.num_layers + 1, TINY_CONFIG.hidden_size)
    for b in batches:
      b = jax.device_put(b, NamedSharding(mesh, P("data")))
      acc = jax.block_until_ready(features.accumulate_batch(graphdef, state, acc, b))
    np.save(sys.argv[2], np.asarray(refusal.refusal_feature(acc)))
    print("SHARDED_OK", len(jax.devices()))
""")


def test_streaming_sums_with_sharded_batches(tiny, tmp_path):
  """Batches split over 2 (fake CPU) devices give the eager reference's refusal feature."""
  model, fmt, examples, ref = tiny
  labels = batch_lib.harmful_labels(examples)
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=4, labels=labels, buckets=BUCKETS)
  arrays = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
  arrays.update({f"param{i}": np.asarray(x)
                 for i, x in enumerate(jax.tree.leaves(nnx.split(model)[1]))})
  np.savez(tmp_path / "batches.npz", n=len(batches), **arrays)
  env = dict(os.environ)
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here, env.get("PYTHONPATH", "")])
  out = tmp_path / "feature.npy"
  res = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "batches.npz"), str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "SHARDED_OK 2" in res.stdout
  want = ref[:, labels == 1].mean(1) - ref[:, labels == 0].mean(1)
  np.testing.assert_allclose(np.load(out), want, rtol=1e-3, atol=1e-5)


def test_scorer_cut_keeps_every_layer_feature_exactly(tiny):
  """The filter's scorer runs the teacher cut to l + 1 blocks (`stages.scorer`): f_l(x) is the
  same as the whole model's at every l, and cutting one block more would change it (the cut
  model's last hidden state is normed)."""
  _, fmt, examples, _ = tiny
  model = Decoder(TINY_CONFIG.replace(num_layers=4), rngs=nnx.Rngs(3))
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=4, buckets=BUCKETS)
  whole = features.extract_features(model, batches, progress=False)
  for layer in range(5):
    cut = keep_layers(model, min(layer + 1, 4))
    assert cut.cfg.num_layers == min(layer + 1, 4)
    got = features.extract_features(cut, batches, layers=(layer,), progress=False)[0]
    np.testing.assert_allclose(got, whole[layer], rtol=1e-5, atol=1e-6, err_msg=str(layer))
    if 1 <= layer <= 3:
      short = features.extract_features(keep_layers(model, layer), batches, layers=(layer,),
                                        progress=False)[0]
      assert not np.allclose(short, whole[layer], atol=1e-3)


def test_probe_is_the_feature_and_scores_of_separate_passes(tiny):
  """`probe` runs each prompt once; what it returns equals the separate feature and score passes."""
  model, fmt, examples, _ = tiny
  labels = batch_lib.harmful_labels(examples)
  probe_b = batch_lib.prompt_batches(examples, fmt, batch_size=4, labels=labels, buckets=BUCKETS)
  val_b = batch_lib.prompt_batches(examples[::-1], fmt, batch_size=4, labels=labels[::-1],
                                   buckets=BUCKETS)
  p = features.probe(model, probe_b, val_b, labels[::-1], progress=False)
  feature, sums = features.compute_refusal_feature(model, probe_b, progress=False)
  np.testing.assert_allclose(p.feature, feature, rtol=1e-5, atol=1e-6)
  assert int(p.sums.n_harmful) == int(sums.n_harmful) == int(labels.sum())
  np.testing.assert_array_equal(p.probe_labels, labels)
  np.testing.assert_allclose(p.probe_scores[1:], features.score_batches(
      model, probe_b, feature, progress=False)[1:], atol=1e-5)
  np.testing.assert_allclose(p.val_scores[1:], features.score_batches(
      model, val_b, feature, progress=False)[1:], atol=1e-5)
  assert p.layer_auroc[2] == pytest.approx(refusal.auroc(p.val_scores[2], labels[::-1]))


def test_teacher_hook_takes_step_zero_from_the_start_probe(tiny):
  """The stage's probe of the start model is the step-0 update (record and R_l, not recomputed);
  every later update is computed from the current parameters, the same as without it."""
  from types import SimpleNamespace
  from refjax.method import teacher
  from refjax.training.fit import train_graphdef
  model, fmt, examples, _ = tiny
  labels = batch_lib.harmful_labels(examples)
  probe_b = batch_lib.prompt_batches(examples, fmt, batch_size=4, labels=labels, buckets=BUCKETS)
  _, params, frozen = nnx.split(model, nnx.Param, ...)
  state = SimpleNamespace(params=params, frozen=frozen)
  # a start probe the current parameters would not give, so using it is visible
  other = nnx.merge(*nnx.split(model)[:1], jax.tree.map(lambda a: a * 1.5, nnx.state(model)))
  start = features.probe(other, probe_b, probe_b, labels, progress=False)
  seen = []
  gd = train_graphdef(model)
  hook = teacher.refusal_update_hook(gd, 1, probe_b, probe_b, labels, 5, seen.append, start=start)
  fresh = teacher.refusal_update_hook(gd, 1, probe_b, probe_b, labels, 5)
  got = hook.fn(0, state, {})
  np.testing.assert_array_equal(got.extras[teacher.FEATURE], start.feature[1])
  assert seen == [teacher.update_record(0, start, 1)]
  assert not np.allclose(fresh.fn(0, state, {}).extras[teacher.FEATURE], start.feature[1])
  got, want = hook.fn(5, state, {}), fresh.fn(5, state, {})
  np.testing.assert_allclose(got.extras[teacher.FEATURE], want.extras[teacher.FEATURE],
                             rtol=1e-6)
  assert got.metrics == pytest.approx(want.metrics, rel=1e-6) and seen[-1]["step"] == 5
