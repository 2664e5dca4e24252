"""KV-cache decoding: token-for-token equal to transformers' greedy `generate` (tiny random
Llama with left padding, and the real SmolLM2-135M-Instruct for 32 new tokens), stop handling,
sampling, and the text-level Generator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from refjax.data.prompts import PromptConfig, PromptFormat, bucket_length, pad_batch
from refjax.evaluation.generation import Generator, batches
from refjax.models.decode import SamplingConfig, decode, unstack
from refjax.models.decoder import KVCache
from refjax.models.weights import load_hf_dir
from refjax.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(
      vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False)).eval()
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path)
  model, _ = load_hf_dir(path)
  return hf, model


def _hf_greedy(hf, tokens, mask, n, eos, pad):
  with torch.no_grad():
    out = hf.generate(torch.tensor(tokens).long(), attention_mask=torch.tensor(mask).long(),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
  return out[:, tokens.shape[1]:].numpy()


def test_greedy_matches_transformers_with_left_padding(tiny_pair):
  hf, model = tiny_pair
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, 259, (3, 10)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :4] = 0
  mask[2, :7] = 0
  tokens[mask == 0] = 0
  graphdef, state = nnx.split(model)
  ours, lengths = decode(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask),
                         jax.random.key(0), sampling=SamplingConfig(max_new_tokens=12),
                         stop_ids=(-1,), pad_id=0)
  ref = _hf_greedy(hf, tokens, mask, 12, None, 0)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  assert np.asarray(lengths).tolist() == [12, 12, 12]


@pytest.mark.parametrize("tied", [False, True])
def test_unrolled_decode_step_equals_scanned_step(tiny_pair, tied):
  """The decode loop's unrolled layers (per-layer weights and caches) compute what the scan does."""
  from refjax.models.tiny import tiny_model
  model = tiny_model(tie_word_embeddings=True) if tied else tiny_pair[1]
  rng = np.random.RandomState(3)
  tokens = jnp.asarray(rng.randint(3, 200, (2, 7)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7], jnp.int32)
  cache = model(tokens, mask, cache=KVCache.zeros(model.cfg, 2, 10)).cache
  nxt = jnp.asarray([[5], [9]], jnp.int32)
  scanned = model(nxt, cache=cache)
  unrolled = model(nxt, cache=cache, unstacked=unstack(*nnx.split(model)))
  np.testing.assert_allclose(unrolled.logits, scanned.logits, rtol=1e-5, atol=1e-5)
  assert isinstance(unrolled.cache.k, tuple) and len(unrolled.cache.k) == model.cfg.num_layers
  np.testing.assert_allclose(jnp.stack(unrolled.cache.k), scanned.cache.k, atol=1e-6)
  np.testing.assert_allclose(jnp.stack(unrolled.cache.v), scanned.cache.v, atol=1e-6)
  with pytest.raises(ValueError, match="cache"):
    model(nxt, unstacked=unstack(*nnx.split(model)))


def test_prepared_decode_weights_give_the_same_tokens(tiny_pair):
  _, model = tiny_pair
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(4).randint(3, 259, (2, 6)), jnp.int32)
  kw = dict(sampling=SamplingConfig(max_new_tokens=5), stop_ids=(-1,), pad_id=0)
  fresh, _ = decode(graphdef, state, tokens, jnp.ones_like(tokens), jax.random.key(0), **kw)
  prepared, _ = decode(graphdef, state, tokens, jnp.ones_like(tokens), jax.random.key(0),
                       unstacked=unstack(graphdef, state), **kw)
  np.testing.assert_array_equal(np.asarray(fresh), np.asarray(prepared))


def test_stop_token_ends_a_row_and_pads_after(tiny_pair):
  _, model = tiny_pair
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(1).randint(3, 259, (2, 6)), jnp.int32)
  mask = jnp.ones_like(tokens)
  free, _ = decode(graphdef, state, tokens, mask, jax.random.key(0),
                   sampling=SamplingConfig(max_new_tokens=8), stop_ids=(-1,), pad_id=0)
  stop = int(np.asarray(free)[0, 2])  # make row 0's third token a stop token
  out, lengths = decode(graphdef, state, tokens, mask, jax.random.key(0),
                        sampling=SamplingConfig(max_new_tokens=8), stop_ids=(stop,), pad_id=0)
  out, lengths = np.asarray(out), np.asarray(lengths)
  first = int(np.argmax(np.asarray(free)[0] == stop))
  assert lengths[0] == first + 1 and np.all(out[0, first + 1:] == 0)
  np.testing.assert_array_equal(out[0, :first + 1], np.asarray(free)[0, :first + 1])


def test_sampling_is_seeded_and_top_k_restricts(tiny_pair):
  _, model = tiny_pair
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.RandomState(2).randint(3, 259, (2, 6)), jnp.int32)
  mask = jnp.ones_like(tokens)
  s = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=1)
  greedy, _ = decode(graphdef, state, tokens, mask, jax.random.key(0),
                     sampling=SamplingConfig(max_new_tokens=6), stop_ids=(-1,), pad_id=0)
  top1, _ = decode(graphdef, state, tokens, mask, jax.random.key(5), sampling=s, stop_ids=(-1,),
                   pad_id=0)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))  # top-1 sampling = greedy
  s2 = SamplingConfig(max_new_tokens=6, temperature=5.0)
  a, _ = decode(graphdef, state, tokens, mask, jax.random.key(1), sampling=s2, stop_ids=(-1,),
                pad_id=0)
  b, _ = decode(graphdef, state, tokens, mask, jax.random.key(1), sampling=s2, stop_ids=(-1,),
                pad_id=0)
  c, _ = decode(graphdef, state, tokens, mask, jax.random.key(2), sampling=s2, stop_ids=(-1,),
                pad_id=0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)


def test_generator_text_round_trip_and_order():
  from refjax.models.tiny import tiny_model
  tok = byte_tokenizer()
  gen = Generator(tiny_model(0), PromptFormat(tok, PromptConfig()), batch_size=2)
  prompts = ["a", "a much longer prompt than the first", "b"]
  out = gen.generate_text(prompts, SamplingConfig(max_new_tokens=5))
  assert len(out) == 3 and all(isinstance(o, str) for o in out)
  alone = gen.generate_text(["b"], SamplingConfig(max_new_tokens=5))
  assert out[2] == alone[0]  # batch composition and padding do not change a row's answer
  # decoded shortest first, returned in input order: each answer is its own prompt's
  assert gen.generate_text(prompts[::-1], SamplingConfig(max_new_tokens=5)) == out[::-1]


def test_shared_prefix_runs_once_and_gives_the_same_tokens(monkeypatch):
  """With share_prefix, the tokens every prompt shares run once per batch (`decode(prefix=)`) and
  each row continues from them: the same sampled tokens (one seed) as the whole prompts, over two
  batches of left-padded rows of different lengths."""
  from refjax.evaluation import generation
  from refjax.models.tiny import tiny_model
  model, tok = tiny_model(0), byte_tokenizer()
  fmt = PromptFormat(tok, PromptConfig())
  common = [5, 17, 42, 42, 9, 3, 77, 12]
  prompts = [common + tail for tail in ([1], [2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13])]
  # sampled at temperature 1 with one seed: the tokens follow the whole distribution, so a row
  # that saw other context (or none of the prefix) would draw other tokens
  sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
  whole = Generator(model, fmt, batch_size=2).generate_ids(prompts, sampling)
  seen = []
  real = generation.decode
  monkeypatch.setattr(generation, "decode", lambda *a, **kw: seen.append(
      (int(a[3].sum(1).max()), None if kw["prefix"] is None else kw["prefix"].tolist()))
      or real(*a, **kw))
  shared = Generator(model, fmt, batch_size=2, share_prefix=True).generate_ids(prompts, sampling)
  assert [p for _, p in seen] == [common, common]
  assert max(n for n, _ in seen) == 6  # the rows hold only what follows the prefix
  assert shared == whole and all(len(o) > 0 for o in whole)


def test_batches_sort_by_length_and_split_evenly():
  lengths = [70, 52, 103, 60, 81] * 20  # 100 prompts
  chunks = batches(lengths, 32)
  assert [len(c) for c in chunks] == [25, 25, 25, 25]  # not 32 + 32 + 32 + 4
  flat = np.concatenate(chunks)
  assert sorted(flat.tolist()) == list(range(100))  # every prompt once
  assert np.all(np.diff(np.asarray(lengths)[flat]) >= 0)  # shortest first
  assert [len(c) for c in batches([1] * 101, 32)] == [26, 26, 26, 23]
  assert [len(c) for c in batches([1] * 5, 32)] == [5] and batches([], 8) == []
  with pytest.raises(ValueError, match="batch_size"):
    batches([1], 0)


def test_smollm2_greedy_matches_transformers_generate(smollm2_model, smollm2_tokenizer,
                                                     smollm2_gguf_reference, real_prompts):
  model, _ = smollm2_model
  fmt = PromptFormat(smollm2_tokenizer, PromptConfig(stop_tokens=("<|im_end|>",)))
  enc = [fmt.encode(p) for p in real_prompts]
  batch = pad_batch(enc, bucket_length(max(len(e.ids) for e in enc)), fmt.pad_id, side="left")
  graphdef, state = nnx.split(model)
  ours, _ = decode(graphdef, state, jnp.asarray(batch["tokens"]),
                   jnp.asarray(batch["attention_mask"]), jax.random.key(0),
                   sampling=SamplingConfig(max_new_tokens=32), stop_ids=(-1,), pad_id=fmt.pad_id)
  ref = _hf_greedy(smollm2_gguf_reference, batch["tokens"], batch["attention_mask"], 32, None,
                   fmt.pad_id)
  np.testing.assert_array_equal(np.asarray(ours), ref)
