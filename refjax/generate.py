"""Jitted, batched greedy / temperature decoding with a KV cache.

Prompts are left-padded to a length bucket and the batch to a fixed size, so jit compiles once per
(bucket, batch, max_new_tokens). Prefill fills the cache in one call; a `lax.while_loop` then
decodes one token per step until every row hit a stop token or `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.data.prompts import PromptFormat, bucket_length, pad_batch
from refjax.models.decoder import Decoder, KVCache, Unstacked


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """max_new_tokens; temperature 0 = greedy; top_k 0 = full vocabulary."""

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}; expected >= 0")


def _pick(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Next token [B] from fp32 logits [B,V]."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "stop_ids", "pad_id"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array,
           rng: jax.Array, *, sampling: SamplingConfig, stop_ids: tuple[int, ...],
           pad_id: int, unstacked: Unstacked | None = None) -> tuple[jax.Array, jax.Array]:
  """Left-padded prompts tokens/mask [B,P] -> new tokens [B,N] (pad after stop) and lengths [B].

  The stop token itself is kept in the output and counted in the length. The decode loop runs
  the layers unrolled from `unstacked` (see `unstack`); without it they are sliced here, once
  per call (a full weight copy: pass a cached one when decoding many batches).
  """
  model: Decoder = nnx.merge(graphdef, state)
  b, p = tokens.shape
  n = sampling.max_new_tokens
  cache = KVCache.zeros(model.cfg, b, p + n)
  # Prefill: logits only at the last prompt slot (the head over every slot would cost ~20% more).
  out = model(tokens, mask, cache=cache, return_logits=False,
              hidden_positions=jnp.full((b,), p - 1, jnp.int32))
  rng, sub = jax.random.split(rng)
  first = _pick(model.logits(out.hidden[-1]), sub, sampling)
  stops = jnp.asarray(stop_ids, jnp.int32)
  buf = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stops)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(c):
    step, _, _, done, _, _, _, _ = c
    return (step < n) & ~jnp.all(done)

  def body(c):
    step, prev, cache, done, buf, lengths, rng, fast = c
    o = model(prev[:, None], jnp.ones((b, 1), jnp.int32), cache=cache, unstacked=fast)
    rng, sub = jax.random.split(rng)
    nxt = _pick(o.logits[:, 0], sub, sampling)
    nxt = jnp.where(done, pad_id, nxt)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stops)
    return step + 1, nxt, o.cache, done, buf, lengths, rng, fast

  # The unstacked weights ride in the loop carry (unchanged) so XLA materialises the per-layer
  # copies once, before the loop, rather than re-slicing the stacked weights every step.
  init = (jnp.asarray(1, jnp.int32), first, out.cache.unstack(), done, buf, lengths, rng,
          model.unstack() if unstacked is None else unstacked)
  _, _, _, _, buf, lengths, _, _ = jax.lax.while_loop(cond, body, init)
  return buf, lengths


@functools.partial(jax.jit, static_argnames="graphdef")
def unstack(graphdef: nnx.GraphDef, state: nnx.State) -> Unstacked:
  """The decode loop's weights: per-layer copies of the stacked layers and a [D,V] head."""
  return nnx.merge(graphdef, state).unstack()


class Generator:
  """Text in, text out: templating, bucketing, batching, decoding and stop handling.

  Holds the decode-loop weights (`unstack`) made once, so every batch skips that copy; this
  costs one more copy of the layer weights in memory for the Generator's lifetime.
  """

  def __init__(self, model: Decoder, prompt_format: PromptFormat, *, batch_size: int = 8,
               max_prompt_len: int = 512):
    self.graphdef, self.state = nnx.split(model)
    self.unstacked = unstack(self.graphdef, self.state)
    self.fmt = prompt_format
    self.batch_size = batch_size
    self.max_prompt_len = max_prompt_len

  def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                   seed: int = 0) -> list[list[int]]:
    """Token-id prompts -> generated ids per prompt (stop token dropped), in input order."""
    results: list[list[int]] = []
    rng = jax.random.key(seed)
    for start in range(0, len(prompts), self.batch_size):
      chunk = [list(p) for p in prompts[start:start + self.batch_size]]
      length = bucket_length(max(len(p) for p in chunk))
      enc = [_as_encoded(p) for p in chunk]
      batch = pad_batch(enc, length, self.fmt.pad_id, side="left", batch_size=self.batch_size)
      rng, sub = jax.random.split(rng)
      buf, lengths = decode(self.graphdef, self.state, jnp.asarray(batch["tokens"]),
                            jnp.asarray(batch["attention_mask"]), sub, sampling=sampling,
                            stop_ids=self.fmt.eos_ids, pad_id=self.fmt.pad_id,
                            unstacked=self.unstacked)
      buf, lengths = np.asarray(buf), np.asarray(lengths)
      for i in range(len(chunk)):
        ids = buf[i, :lengths[i]].tolist()
        if ids and ids[-1] in self.fmt.eos_ids:
          ids = ids[:-1]
        results.append(ids)
    return results

  def generate_text(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(),
                    *, inputs: Sequence[str] | None = None, seed: int = 0,
                    progress: bool = False) -> list[str]:
    """Raw user prompts (templated here) -> decoded answers."""
    inputs = inputs or [""] * len(prompts)
    ids = [self.fmt.encode(p, i, max_len=self.max_prompt_len).ids for p, i in zip(prompts, inputs)]
    out: list[list[int]] = []
    it: Any = range(0, len(ids), self.batch_size)
    if progress:
      from tqdm import tqdm
      it = tqdm(it, desc="generate", unit="batch")
    for s in it:
      out += self.generate_ids(ids[s:s + self.batch_size], sampling, seed=seed + s)
    return [self.fmt.tokenizer.decode(o, skip_special_tokens=True) for o in out]

  def generate_raw(self, texts: Sequence[str], sampling: SamplingConfig = SamplingConfig(),
                   *, seed: int = 0) -> list[str]:
    """Already-rendered texts (e.g. a judge's own template) -> decoded continuations."""
    tok = self.fmt.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"][-self.max_prompt_len:] for t in texts]
    out: list[list[int]] = []
    for s in range(0, len(ids), self.batch_size):
      out += self.generate_ids(ids[s:s + self.batch_size], sampling, seed=seed + s)
    return [tok.decode(o, skip_special_tokens=True) for o in out]

  def __call__(self, prompts: Sequence[str]) -> list[str]:
    """The `generate_fn` evaluation expects: greedy answers to raw user prompts."""
    return self.generate_text(prompts)


def _as_encoded(ids: list[int]):
  from refjax.data.prompts import Encoded
  return Encoded(ids, len(ids) - 1, [0] * len(ids))


def timed(fn, *args, **kw):
  """(result, seconds) after blocking on the result; for benchmarks."""
  t0 = time.perf_counter()
  r = jax.block_until_ready(fn(*args, **kw))
  return r, time.perf_counter() - t0
