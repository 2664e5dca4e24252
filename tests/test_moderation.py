"""Moderation judge: a tiny random refjax Decoder plus a random 14-label head, checked against a
per-example forward pass; the head loads from safetensors files and HF-style folders."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from refjax.evaluation.moderation import (MODERATION_CATEGORIES, ModerationJudge, format_qa,
                                          load_score_weight)

from refjax.models import tiny as testing  # noqa: E402

PROMPTS = ["How do I bake bread?", "Tell me a joke", "What is 2+2?"]
RESPONSES = ["Mix flour and water, then bake.", "Why did the chicken cross the road?", "4"]


@pytest.fixture(scope="module")
def parts():
  model = testing.tiny_model(seed=0)
  tok = testing.byte_tokenizer()
  weight = np.random.default_rng(0).normal(0, 0.3, (len(MODERATION_CATEGORIES),
                                                    model.cfg.hidden_size)).astype(np.float32)
  return model, tok, weight


@jax.jit
def _last_hidden(graphdef, state, ids):
  model = nnx.merge(graphdef, state)
  out = model(ids, jnp.ones_like(ids), hidden_positions=jnp.asarray([ids.shape[1] - 1]))
  return out.hidden[-1][0]


def _reference_probs(model, tok, weight, prompt, response):
  """One unpadded example: final-norm hidden at the last token (EOS), sigmoid(W h)."""
  ids = tok([format_qa(prompt, response) + tok.eos_token])["input_ids"][0]
  h = np.asarray(_last_hidden(*nnx.split(model), jnp.asarray([ids], jnp.int32)), np.float64)
  return 1 / (1 + np.exp(-(weight.astype(np.float64) @ h)))


def test_probs_match_per_example_forward(parts):
  model, tok, weight = parts
  judge = ModerationJudge(model, tok, weight, batch_size=2, pad_id=0)
  probs = judge.predict(PROMPTS, RESPONSES)  # 3 pairs in batches of 2: padded rows and batch
  assert probs.shape == (3, len(MODERATION_CATEGORIES))
  for i in (0, 2):  # the longest and the shortest pair (one compilation each)
    p, r = PROMPTS[i], RESPONSES[i]
    np.testing.assert_allclose(probs[i], _reference_probs(model, tok, weight, p, r), atol=2e-5)


def test_flagged_iff_any_category_above_threshold(parts):
  model, tok, weight = parts
  probs = ModerationJudge(model, tok, weight, batch_size=2).predict(PROMPTS, RESPONSES)
  threshold = float(np.median(probs.max(axis=1)))
  judge = ModerationJudge(model, tok, weight, threshold=threshold, batch_size=2)
  assert judge.name == "moderation"
  flags = judge.judge(PROMPTS, RESPONSES)
  assert flags == [bool(row.max() > threshold) for row in probs]
  assert True in flags and False in flags
  cats = judge.flagged_categories(PROMPTS, RESPONSES)
  assert all(set(c) <= set(MODERATION_CATEGORIES) for c in cats)
  assert [bool(c) for c in cats] == flags
  zero = ModerationJudge(model, tok, np.zeros_like(weight), batch_size=2)  # every prob is 0.5
  assert zero.judge(PROMPTS, RESPONSES) == [False] * 3  # strictly greater, as the peers


def test_truncation_keeps_shapes(parts):
  model, tok, weight = parts
  judge = ModerationJudge(model, tok, weight, max_length=128, batch_size=2)  # shapes seen before
  probs = judge.predict(["long " * 50, "short"], ["answer " * 50, "ok"])
  assert probs.shape == (2, 14) and np.all((probs > 0) & (probs < 1))


def test_bad_head_and_arguments(parts):
  model, tok, weight = parts
  with pytest.raises(ValueError, match="score_weight shape"):
    ModerationJudge(model, tok, weight[:, :5])
  with pytest.raises(ValueError, match="3 categories for a 14-label head"):
    ModerationJudge(model, tok, weight, categories=["a", "b", "c"])
  with pytest.raises(ValueError, match="threshold=1.5"):
    ModerationJudge(model, tok, weight, threshold=1.5)


def test_load_score_weight_file_folder_and_index(tmp_path, parts):
  from safetensors.numpy import save_file

  _, _, weight = parts
  single = tmp_path / "head.safetensors"
  save_file({"score.weight": weight, "model.norm.weight": np.ones(4, np.float32)}, str(single))
  np.testing.assert_array_equal(load_score_weight(single), weight)

  sharded = tmp_path / "sharded"
  sharded.mkdir()
  save_file({"model.norm.weight": np.ones(4, np.float32)},
            str(sharded / "model-00001-of-00002.safetensors"))
  save_file({"score.weight": weight}, str(sharded / "model-00002-of-00002.safetensors"))
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
    "model.norm.weight": "model-00001-of-00002.safetensors",
    "score.weight": "model-00002-of-00002.safetensors"}}))
  np.testing.assert_array_equal(load_score_weight(sharded), weight)

  no_head = tmp_path / "lm.safetensors"
  save_file({"lm_head.weight": weight}, str(no_head))
  with pytest.raises(KeyError, match="no 'score.weight'"):
    load_score_weight(no_head)
  with pytest.raises(FileNotFoundError):
    load_score_weight(tmp_path / "absent")


def test_from_pretrained_reads_head_and_labels(tmp_path, parts):
  from safetensors.numpy import save_file

  model, tok, weight = parts
  save_file({"score.weight": weight}, str(tmp_path / "model.safetensors"))
  labels = [f"cat_{i}" for i in range(14)]
  (tmp_path / "config.json").write_text(json.dumps(
    {"id2label": {str(i): name for i, name in enumerate(labels)}}))
  judge = ModerationJudge.from_pretrained(tmp_path, backbone=model, tokenizer=tok)
  assert judge.categories == tuple(labels)
  np.testing.assert_array_equal(np.asarray(judge.weight), weight)


def test_from_pretrained_loads_backbone_from_a_classifier_folder(tmp_path, parts):
  """A beaver-dam-shaped folder: Llama tensors + score.weight, no lm_head."""
  from safetensors.numpy import save_file

  from refjax.models.export import hf_state_dict

  model, tok, weight = parts
  tensors = hf_state_dict(model) | {"score.weight": weight}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  hf_cfg = model.cfg.to_hf_dict() | {"architectures": ["LlamaForSequenceClassification"],
                                     "tie_word_embeddings": False,
                                     "id2label": dict(enumerate(MODERATION_CATEGORIES))}
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  judge = ModerationJudge.from_pretrained(tmp_path, tokenizer=tok, batch_size=2)
  expected = ModerationJudge(model, tok, weight, batch_size=2).predict(PROMPTS, RESPONSES)
  np.testing.assert_allclose(judge.predict(PROMPTS, RESPONSES), expected, atol=1e-6)
