"""The Flax NNX decoder for the Llama family (Llama-2/3, Mistral-style, SmolLM2, Qwen2).

Layers are stored stacked (a leading `layers` axis on every block parameter) and run with
`jax.lax.scan`, so a 30-layer model compiles as fast as a 1-layer one and shards along `layers`
like MaxText. Parameter names follow transformers' (`self_attn.q_proj`, `mlp.gate_proj`, ...) so
weight import is a rename plus a transpose. Every parameter carries logical axis names in its
`out_sharding` metadata; `refjax.parallel` maps those to mesh axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from refjax.models.config import ModelConfig

_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite (pad queries)


def _param(cls, value, axes):
  return cls(value, eager_sharding=False, sharding_names=axes)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA), kernel stored [*stack, in, out] with logical axes."""

  def __init__(self, stack: tuple[int, ...], d_in: int, d_out: int, axes: tuple[str, str], *,
               bias: bool, lora_rank: int, lora_alpha: float, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = cfg.jnp_param_dtype
    sax = ("layers",) * len(stack)
    init = jax.nn.initializers.normal(0.02)
    self.kernel = _param(nnx.Param, init(rngs.params(), (*stack, d_in, d_out), pdt), sax + axes)
    self.bias = _param(nnx.Param, jnp.zeros((*stack, d_out), pdt), sax + axes[1:]) if bias else None
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    if lora_rank:
      # B starts at zero so adapters begin as the identity update (Hu et al. 2021).
      a = jax.nn.initializers.he_uniform()(rngs.params(), (*stack, d_in, lora_rank), pdt)
      self.lora_a = _param(nnx.LoRAParam, a, sax + (axes[0], None))
      self.lora_b = _param(nnx.LoRAParam, jnp.zeros((*stack, lora_rank, d_out), pdt),
                           sax + (None, axes[1]))
    else:
      self.lora_a = self.lora_b = None
    self.dtype = cfg.jnp_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # Matmuls on [B*T, D]: with 3-D activations the weight gradient contracts over two axes and
    # XLA:CPU inserts a transposing copy of every activation gradient before the dot.
    dt = self.dtype
    x2 = x.reshape(-1, x.shape[-1]).astype(dt)
    y = x2 @ self.kernel[...].astype(dt)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    if self.lora_a is not None:
      y = y + ((x2 @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)) * (
          jnp.asarray(self.lora_scale, dt))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nnx.Module):
  """RMSNorm computed in fp32 (as transformers does), cast back to the compute dtype."""

  def __init__(self, stack: tuple[int, ...], dim: int, cfg: ModelConfig):
    self.scale = _param(nnx.Param, jnp.ones((*stack, dim), cfg.jnp_param_dtype),
                        ("layers",) * len(stack) + ("norm",))
    self.eps = cfg.rms_norm_eps
    self.dtype = cfg.jnp_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * y).astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies, with linear or llama3 scaling as transformers computes them."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rope = cfg.rope_dict
  kind = rope.get("rope_type", "default")
  if kind == "linear":
    inv = inv / rope["factor"]
  elif kind == "llama3":
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B,T,H,D] by position [B,T] (transformers' rotate-half layout), in fp32."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with an optional KV cache slot range."""

  def __init__(self, stack, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name, d_in, d_out, axes, bias):
      r = cfg.lora_rank if name in cfg.lora_targets else 0
      return Linear(stack, d_in, d_out, axes, bias=bias, lora_rank=r, lora_alpha=cfg.lora_alpha,
                    cfg=cfg, rngs=rngs)

    self.q_proj = lin("q_proj", d, h * hd, ("embed", "heads"), cfg.attention_bias)
    self.k_proj = lin("k_proj", d, kv * hd, ("embed", "kv_heads"), cfg.attention_bias)
    self.v_proj = lin("v_proj", d, kv * hd, ("embed", "kv_heads"), cfg.attention_bias)
    self.o_proj = lin("o_proj", h * hd, d, ("heads", "embed"), False)
    self.cfg = cfg

  def __call__(self, x, positions, inv_freq, key_mask, q_slots, cache_kv=None, cache_index=None):
    """x [B,T,D]; key_mask [B,S] valid key slots; q_slots [T] absolute slot of each query.

    Without a cache S == T and keys are this call's tokens. With `cache_kv=(k, v)` of
    [B,KV,S,Dh], this call's keys are written at `cache_index` and attention covers the cache.
    """
    cfg = self.cfg
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    # Keys/values as [B,KV,S,Dh]: the layout the score and output contractions want, so a
    # cache is read without a transpose.
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    new_kv = None
    if cache_kv is not None:
      ck, cv = cache_kv
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=2)
      k, v, new_kv = ck, cv, (ck, cv)
    s = k.shape[2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T,S]
    allowed = causal[None] & key_mask[:, None, :].astype(bool)  # [B,T,S]
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Contract into [B,KV,G,T,Dh] and transpose the small result: asking the dot for [B,T,...]
    # directly makes XLA:CPU contract over the cache's non-minor axis (7x slower when decoding).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v).transpose(0, 3, 1, 2, 4)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return self.o_proj(out), new_kv


class MLP(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, stack, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size

    def lin(name, d_in, d_out, axes):
      r = cfg.lora_rank if name in cfg.lora_targets else 0
      return Linear(stack, d_in, d_out, axes, bias=cfg.mlp_bias, lora_rank=r,
                    lora_alpha=cfg.lora_alpha, cfg=cfg, rngs=rngs)

    self.gate_proj = lin("gate_proj", d, f, ("embed", "mlp"))
    self.up_proj = lin("up_proj", d, f, ("embed", "mlp"))
    self.down_proj = lin("down_proj", f, d, ("mlp", "embed"))

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One pre-norm transformer block; instantiated once with all layers stacked."""

  def __init__(self, stack, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(stack, cfg.hidden_size, cfg)
    self.self_attn = Attention(stack, cfg, rngs)
    self.post_attention_layernorm = RMSNorm(stack, cfg.hidden_size, cfg)
    self.mlp = MLP(stack, cfg, rngs)

  def __call__(self, x, positions, inv_freq, key_mask, q_slots, cache_kv=None, cache_index=None):
    h, new_kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, key_mask, q_slots,
                               cache_kv, cache_index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_kv


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


@struct.dataclass
class Unstacked:
  """Per-layer parameter states and a [D,V] LM head, sliced and transposed once.

  A decode loop runs one token per step, so it is bound by reading the weights. Scanning the
  stacked layers makes XLA:CPU copy each layer's slice every step; slicing once before the loop
  and running the layers unrolled reads every weight exactly once per step.
  """

  layers: tuple[Any, ...]
  head: jax.Array


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
    self.embed_tokens = _param(nnx.Param, emb, ("vocab", "embed"))
    self.layers = Block((cfg.num_layers,), cfg, rngs)
    self.norm = RMSNorm((), cfg.hidden_size, cfg)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      w = jax.nn.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt)
      self.lm_head = _param(nnx.Param, w, ("embed", "vocab"))

  def __call__(
      self,
      tokens: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      hidden_positions: jax.Array | None = None,
      return_all_hidden: bool = False,
      return_logits: bool = True,
      cache: KVCache | None = None,
      unstacked: Unstacked | None = None,
  ) -> DecoderOutput:
    """Runs tokens [B,T] (int) with attention_mask [B,T] (1 = real token).

    hidden_positions [B]: also return every layer's hidden state at that token of each row (the
    refusal feature reads the last prompt token). With `cache`, the tokens fill slots
    `cache.index ...` and attend to every valid earlier slot; the updated cache is returned.
    `unstacked` (from `self.unstack()`, made once outside a decode loop) runs the layers unrolled.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    attention_mask = attention_mask.astype(jnp.int32)
    if positions is None:
      if cache is None:
        positions = positions_from_mask(attention_mask)
      else:  # continue counting real tokens already in the cache
        positions = jnp.sum(cache.mask, -1, keepdims=True) + positions_from_mask(attention_mask)
    x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(cfg.jnp_dtype)
    inv_freq = rope_inv_freq(cfg)

    if cache is None:
      key_mask, q_slots, index = attention_mask, jnp.arange(t), None
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
    return DecoderOutput(logits, hidden, all_hidden, new_cache)

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


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_decoder(cfg: ModelConfig) -> Decoder:
  """A Decoder whose parameters are ShapeDtypeStructs (no allocation): for loading and AOT."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


__all__ = ["Decoder", "DecoderOutput", "KVCache", "Unstacked", "positions_from_mask", "param_count",
           "abstract_decoder"]
