"""The Flax NNX decoder for the Llama family (Llama-2/3, Mistral-style, SmolLM2, Qwen2).

Layers are stored stacked (a leading `layers` axis on every block parameter) and run with
`jax.lax.scan`, so a 30-layer model compiles as fast as a 1-layer one and shards along `layers`
like MaxText. Parameter names follow transformers' (`self_attn.q_proj`, `mlp.gate_proj`, ...) so
weight import is a rename plus a transpose. Every parameter carries logical axis names in its
`out_sharding` metadata; `refjax.parallel` maps those to mesh axes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from refjax.models.config import ModelConfig
from refjax.models.layers import Block, RMSNorm, param, rope_inv_freq

# Segment ids of packed rows: 0 is padding, 1.. an example each; SHARED_SEGMENT marks a prompt
# prefix held once per row that every segment of the row attends to (refjax.data.packing).
SHARED_SEGMENT = -1


@struct.dataclass
class KVCache:
  """Per-layer keys/values [L,B,KV,S,Dh], valid-slot mask [B,S] and the next write slot.

  `unstack()` turns k/v into tuples of L arrays [B,KV,S,Dh] for the unrolled decode path: each
  layer's cache is then written in place and read without slicing a stacked array.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array  # scalar int32

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.jnp_dtype
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))

  def unstack(self) -> "KVCache":
    """k/v as tuples of per-layer arrays (a no-op when they already are)."""
    if isinstance(self.k, tuple):
      return self
    n = self.k.shape[0]
    return self.replace(k=tuple(self.k[i] for i in range(n)), v=tuple(self.v[i] for i in range(n)))


@struct.dataclass
class DecoderOutput:
  logits: jax.Array | None  # [B,T,V] fp32
  hidden: jax.Array | None  # [L+1,B,D] at hidden_positions (index L is after the final norm)
  all_hidden: jax.Array | None  # [L+1,B,T,D] when return_all_hidden
  cache: KVCache | None
  final: jax.Array | None = None  # [B,T,D] after the final norm (`Decoder.logits` maps it)


@struct.dataclass
class Unstacked:
  """Per-layer parameter states and a [D,V] LM head, sliced and transposed once.

  A decode loop runs one token per step, so it is bound by reading the weights. Scanning the
  stacked layers makes XLA:CPU copy each layer's slice every step; slicing once before the loop
  and running the layers unrolled reads every weight exactly once per step.
  """

  layers: tuple[Any, ...]
  head: jax.Array


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Position ids that restart at 0 at each segment's first token (packed rows, right padded)."""
  t = jnp.arange(segment_ids.shape[-1])
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids 0,1,2,... over the real tokens of each row, so left padding changes nothing."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class Decoder(nnx.Module):
  """Token embedding, a scanned stack of blocks, final norm, LM head (tied or not)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = cfg.jnp_param_dtype
    emb = jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt)
    self.embed_tokens = param(nnx.Param, emb, ("vocab", "embed"))
    self.layers = Block((cfg.num_layers,), cfg, rngs)
    self.norm = RMSNorm((), cfg.hidden_size, cfg)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      w = jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt)
      self.lm_head = param(nnx.Param, w, ("embed", "vocab"))

  def __call__(
      self,
      tokens: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      attend_to: jax.Array | None = None,
      hidden_positions: jax.Array | None = None,
      return_all_hidden: bool = False,
      return_logits: bool = True,
      cache: KVCache | None = None,
      unstacked: Unstacked | None = None,
  ) -> DecoderOutput:
    """Runs tokens [B,T] (int) with attention_mask [B,T] (1 = real token).

    hidden_positions [B]: also return every layer's hidden state at that token of each row (the
    refusal feature reads the last prompt token). `segment_ids` [B,T] (packed rows: one id per
    example, 0 on padding, SHARED_SEGMENT on a row's shared prefix): a token attends within its
    segment and to the shared prefix; positions restart per segment unless given. `attend_to`
    [B,T]: the one other segment each token sees instead of SHARED_SEGMENT's (a prompt that several
    answers share, `refjax.evaluation.judge_features`). With `cache`,
    the tokens fill slots `cache.index ...` and attend to every valid earlier slot; the updated
    cache is returned.
    `unstacked` (from `self.unstack()`, made once outside a decode loop) runs the layers unrolled.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed rows) are for training passes, not cached decoding")
    if attend_to is not None and segment_ids is None:
      raise ValueError("attend_to names segments: pass segment_ids with it")
    if positions is None:
      if segment_ids is not None:
        positions = positions_from_segments(segment_ids)
      elif cache is None:
        positions = positions_from_mask(attention_mask)
      else:  # continue counting real tokens already in the cache
        positions = jnp.sum(cache.mask, -1, keepdims=True) + positions_from_mask(attention_mask)
    x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(cfg.jnp_dtype)
    inv_freq = rope_inv_freq(cfg)

    if cache is None:
      key_mask, q_slots, index = attention_mask, jnp.arange(t), None
      if segment_ids is not None:  # [B,T,T]: same segment or the row's shared prefix, real key
        also = (jnp.full_like(segment_ids, SHARED_SEGMENT) if attend_to is None
                else attend_to.astype(segment_ids.dtype))
        key_mask = ((segment_ids[:, :, None] == segment_ids[:, None, :])
                    | (segment_ids[:, None, :] == also[:, :, None])) & (
                        attention_mask[:, None, :] > 0)
    else:
      index = cache.index
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, index, axis=1)
      q_slots = index + jnp.arange(t)

    gather = (lambda h: h[jnp.arange(b), hidden_positions]) if hidden_positions is not None else None
    graphdef, layer_state = nnx.split(self.layers)

    def body(x, xs):
      layer = nnx.merge(graphdef, xs["layer"])
      kv = (xs["k"], xs["v"]) if cache is not None else None
      x, new_kv = layer(x, positions, inv_freq, key_mask, q_slots, kv, index)
      ys = {}
      if gather is not None:
        ys["hidden"] = gather(x)
      if return_all_hidden:
        ys["all"] = x
      if new_kv is not None:
        ys["k"], ys["v"] = new_kv
      return x, ys

    x0 = x
    if unstacked is not None:
      if cache is None:
        raise ValueError("unstacked layers are for cached decoding; pass cache= as well")
      cache = cache.unstack()
      ks, vs, outs = [], [], []
      for st, k, v in zip(unstacked.layers, cache.k, cache.v):
        x, y = body(x, {"layer": st, "k": k, "v": v})
        ks.append(y.pop("k"))
        vs.append(y.pop("v"))
        outs.append(y)
      ys = {name: jnp.stack([y[name] for y in outs]) for name in outs[0]}
      ys["k"], ys["v"] = tuple(ks), tuple(vs)
    else:
      scan_body = body
      if cfg.remat:
        scan_body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
      xs: dict[str, Any] = {"layer": layer_state}
      if cache is not None:
        xs["k"], xs["v"] = cache.k, cache.v
      x, ys = jax.lax.scan(scan_body, x, xs)
    x = self.norm(x)

    hidden = all_hidden = None
    if gather is not None:  # HF convention: [embeddings, block 1..L-1, norm(block L)]
      hidden = jnp.concatenate([gather(x0)[None], ys["hidden"][:-1], gather(x)[None]], 0)
    if return_all_hidden:
      all_hidden = jnp.concatenate([x0[None], ys["all"][:-1], x[None]], 0)
    if not return_logits:
      logits = None
    elif unstacked is not None:
      logits = jnp.matmul(x, unstacked.head.astype(x.dtype), preferred_element_type=jnp.float32)
    else:
      logits = self.logits(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(ys["k"], ys["v"], key_mask, index + t)
    return DecoderOutput(logits, hidden, all_hidden, new_cache, x)

  def unstack(self) -> Unstacked:
    """The layers as L separate states and the head as [D,V]: copies, made once per `decode`
    call unless it is given them (`Generator` keeps one set)."""
    _, layer_state = nnx.split(self.layers)
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], layer_state)
                   for i in range(self.cfg.num_layers))
    head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    return Unstacked(layers, head)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final-normed hidden [...,D] -> fp32 logits over the vocabulary."""
    if self.lm_head is None:  # tied: contract with the [V,D] table directly (no transpose copy)
      return jnp.einsum("...d,vd->...v", x, self.embed_tokens[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.matmul(x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)


def keep_layers(model: Decoder, n: int) -> Decoder:
  """The model cut to its first `n` blocks (the final norm then follows block n): a backbone for
  features of the lower layers at a fraction of the cost. The weights are shared, not copied."""
  if not 1 <= n <= model.cfg.num_layers:
    raise ValueError(f"n={n}; expected 1..{model.cfg.num_layers} blocks")
  if n == model.cfg.num_layers:
    return model
  graphdef, state = nnx.split(abstract_decoder(model.cfg.replace(num_layers=n)))
  src = dict(nnx.to_flat_state(nnx.state(model)))
  leaves = [(path, var.replace(src[path][...][:n] if path[0] == "layers" else src[path][...]))
            for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_decoder(cfg: ModelConfig) -> Decoder:
  """A Decoder whose parameters are ShapeDtypeStructs (no allocation): for loading and AOT."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


__all__ = ["SHARED_SEGMENT", "Decoder", "DecoderOutput", "KVCache", "Unstacked",
           "positions_from_mask", "positions_from_segments", "param_count", "keep_layers",
           "abstract_decoder"]
