"""Jitted greedy / temperature decoding with a KV cache, over token ids.

Prefill fills the cache in one call; a `lax.while_loop` then decodes one token per step until
every row hit a stop token or `max_new_tokens`. Text in and out (templating, bucketing, batching)
is `refjax.evaluation.generation.Generator`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

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


def prefix_cache(model: nnx.Module, prefix: jax.Array, batch: int, length: int) -> KVCache:
  """The keys/values of `prefix` [P] (run once) for `batch` rows, with room for `length` more
  tokens: rows that continue from it see exactly what they would with the prefix in every row."""
  p = prefix.shape[0]
  out = model(prefix[None], cache=KVCache.zeros(model.cfg, 1, p + length), return_logits=False)
  c = out.cache
  rows = lambda a: jnp.broadcast_to(a, a.shape[:1] + (batch,) + a.shape[2:])
  return KVCache(rows(c.k), rows(c.v), jnp.broadcast_to(c.mask, (batch, p + length)), c.index)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "stop_ids", "pad_id"))
def decode(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array,
           rng: jax.Array, *, sampling: SamplingConfig, stop_ids: tuple[int, ...],
           pad_id: int, unstacked: Unstacked | None = None,
           prefix: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Left-padded prompts tokens/mask [B,P] -> new tokens [B,N] (pad after stop) and lengths [B].

  `prefix` [P0]: leading tokens every prompt shares, cut from `tokens` and run once (batch 1);
  each row continues from their keys/values, as if they led its prompt.

  The stop token itself is kept in the output and counted in the length. The decode loop runs
  the layers unrolled from `unstacked` (see `unstack`); without it they are sliced here, once
  per call (a full weight copy: pass a cached one when decoding many batches).
  """
  model: Decoder = nnx.merge(graphdef, state)
  b, p = tokens.shape
  n = sampling.max_new_tokens
  cache = (KVCache.zeros(model.cfg, b, p + n) if prefix is None
           else prefix_cache(model, prefix, b, p + n))
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


__all__ = ["SamplingConfig", "decode", "prefix_cache", "unstack"]
