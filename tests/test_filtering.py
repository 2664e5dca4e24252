"""Filtering: threshold calibration, static-shape keep masks, the audit report, scoring."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.data import batches as batch_lib
from refjax.method import features
from refjax.method import filtering
from refjax.method import refusal
from refjax.stages.decisions import write_decisions

from refusal_fixtures import WORDS, FakeExample, tiny_format, tiny_model


def _labelled_scores(rng, n_pos=200, n_neg=300):
  scores = np.concatenate([rng.normal(0.4, 0.2, n_pos), rng.normal(-0.2, 0.2, n_neg)])
  labels = np.concatenate([np.ones(n_pos, int), np.zeros(n_neg, int)])
  return scores, labels


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_calibration_reaches_target_recall_with_least_fpr(target):
  scores, labels = _labelled_scores(np.random.default_rng(0))
  cal = filtering.calibrate_threshold(scores, labels, target)
  pos, neg = scores[labels == 1], scores[labels == 0]
  assert cal.recall >= target
  assert cal.recall == pytest.approx(np.mean(pos >= cal.threshold))
  assert cal.fpr == pytest.approx(np.mean(neg >= cal.threshold))
  # Any higher candidate threshold (a larger harmful score) misses the target.
  higher = pos[pos > cal.threshold]
  if higher.size:
    assert np.mean(pos >= higher.min()) < target
  assert (cal.n_harmful, cal.n_harmless) == (200, 300)


def test_calibration_with_ties_and_bad_input():
  scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.6, 0.2])
  labels = np.array([1, 1, 1, 1, 1, 0, 0])
  cal = filtering.calibrate_threshold(scores, labels, 0.5)  # k = 3: the tie at 0.5 is taken whole
  assert cal.threshold == 0.5 and cal.recall == pytest.approx(0.8) and cal.fpr == 0.5
  with pytest.raises(ValueError, match="target_recall"):
    filtering.calibrate_threshold(scores, labels, 0.0)
  with pytest.raises(ValueError, match="harmful prompts"):
    filtering.calibrate_threshold(scores, np.zeros(7), 0.9)
  with pytest.raises(ValueError, match="NaN"):
    filtering.calibrate_threshold(np.array([np.nan, 0.1]), np.array([1, 0]), 0.9)


def test_keep_weights_static_shape_under_jit():
  scores = jnp.array([0.1, 0.7, -0.3, 0.5, 0.49])
  w = jax.jit(filtering.keep_weights)(scores, 0.5)
  assert w.shape == scores.shape and w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(w), [1, 0, 1, 0, 1])
  # A per-example loss masked by the weights keeps its batch shape and ignores dropped rows.
  loss = jax.jit(lambda l, s: jnp.sum(l * filtering.keep_weights(s, 0.5)) /
                 jnp.sum(filtering.keep_weights(s, 0.5)))
  assert float(loss(jnp.array([1.0, 100.0, 3.0, 100.0, 5.0]), scores)) == pytest.approx(3.0)


def _user_examples(n_benign=6, n_harmful=3):
  ex = [FakeExample(id=f"u:{i}", instruction=f"w{i} w{i + 1}", provenance="benign")
        for i in range(n_benign)]
  ex += [FakeExample(id=f"h:{i}", instruction=f"w{i} w3", provenance="harmful")
         for i in range(n_harmful)]
  return ex


def test_apply_filter_and_drop_everything_raises():
  ex = _user_examples()
  scores = np.array([0.1, 0.2, -0.1, 0.0, 0.3, 0.6, 0.8, 0.9, 0.4])
  keep = filtering.apply_filter(ex, scores, 0.5)
  assert keep.shape == (len(ex),) and keep.dtype == bool
  np.testing.assert_array_equal(keep, scores < 0.5)
  with pytest.raises(ValueError, match="drops all 9 examples.*raise filter.threshold above the "
                                       "lowest score, or lower filter.target_recall"):
    filtering.apply_filter(ex, scores, -0.5)
  with pytest.raises(ValueError, match="one per example"):
    filtering.apply_filter(ex, scores[:-1], 0.5)


def test_report_has_every_example_once(tmp_path):
  ex = _user_examples()
  scores = np.array([0.1, 0.2, -0.1, 0.0, 0.6, 0.3, 0.8, 0.9, 0.4])
  cal = filtering.calibrate_threshold(scores, [e.provenance == "harmful" for e in ex], 0.6)
  keep = filtering.apply_filter(ex, scores, cal.threshold)
  report, summary = tmp_path / "report.jsonl", tmp_path / "summary.json"
  write_decisions(report, summary, ex, scores, keep, cal.threshold, calibration=cal, layer=1)
  rows = [json.loads(line) for line in report.read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == sorted(e.id for e in ex)  # each exactly once
  by_id = {r["id"]: r for r in rows}
  for e, s, k in zip(ex, scores, keep):
    r = by_id[e.id]
    assert r["score"] == pytest.approx(s) and r["kept"] == bool(k)
    assert r["decision"] == ("kept" if k else "dropped") and r["provenance"] == e.provenance
    assert set(r) <= {"id", "score", "kept", "decision", "provenance", "source"}  # no prompt text
  s = json.loads(summary.read_text())
  assert s["n_examples"] == 9 and s["n_kept"] + s["n_dropped"] == 9
  assert s["threshold_rule"] == "calibrated" and s["calibration"]["target_recall"] == 0.6
  dropped = ~keep
  harmful = np.array([e.provenance == "harmful" for e in ex])
  assert s["precision"] == pytest.approx((dropped & harmful).sum() / dropped.sum())
  assert s["recall"] == pytest.approx((dropped & harmful).sum() / harmful.sum())
  assert s["auroc"] == pytest.approx(refusal.auroc(scores, harmful))
  assert s["by_provenance"]["harmful"]["n"] == 3
  with pytest.raises(ValueError, match="not unique"):
    write_decisions(report, summary, ex + ex[:1], np.zeros(10), np.ones(10, bool), 0.5)


def test_report_without_provenance_has_counts_only(tmp_path):
  ex = [FakeExample(id=str(i), instruction="w1") for i in range(3)]
  summary = tmp_path / "summary.json"
  write_decisions(tmp_path / "report.jsonl", summary, ex, np.zeros(3), np.ones(3, bool), 0.5)
  s = json.loads(summary.read_text())
  assert s["n_kept"] == 3 and "precision" not in s and s["by_provenance"]["untagged"]["n"] == 3


def test_score_prompts_matches_extracted_features():
  model, fmt = tiny_model(), tiny_format()
  ex = [FakeExample(id=str(i), instruction=" ".join(WORDS[i:i + 2 + i % 3])) for i in range(6)]
  rng = np.random.default_rng(3)
  feature = rng.normal(size=(model.cfg.num_layers + 1, model.cfg.hidden_size)).astype(np.float32)
  kw = dict(batch_size=4, buckets=(64,), progress=False)  # test_refusal's shapes: no recompiles
  got = filtering.score_prompts(model, ex, fmt, 2, feature, **kw)
  assert got.shape == (6,)
  batches = batch_lib.prompt_batches(ex, fmt, batch_size=4, buckets=(64,))
  feats = features.extract_features(model, batches, progress=False)[2]
  np.testing.assert_allclose(got, np.asarray(refusal.cosine_scores(feats, feature[2])), atol=1e-5)
  same = filtering.score_prompts(model, ex, fmt, 2, feature[2], **kw)
  np.testing.assert_allclose(same, got, atol=1e-6)
  with pytest.raises(ValueError, match="layer=5"):
    filtering.score_prompts(model, ex, fmt, 5, feature, progress=False)
