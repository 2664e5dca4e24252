"""The decoder's building blocks (Llama family): Linear with optional LoRA, RMSNorm, RoPE,
grouped-query attention with an optional KV cache, SwiGLU MLP, and the pre-norm block.

Every parameter carries logical axis names in its `out_sharding` metadata (`refjax.parallel` maps
them to mesh axes); a leading `stack` shape holds all layers at once (the decoder scans them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from refjax.models.config import ModelConfig

_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite (pad queries)


def param(cls, value, axes):
  """An nnx variable with logical axis names, created without eager sharding."""
  return cls(value, eager_sharding=False, sharding_names=axes)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ LoRA), kernel stored [*stack, in, out] with logical axes."""

  def __init__(self, stack: tuple[int, ...], d_in: int, d_out: int, axes: tuple[str, str], *,
               bias: bool, lora_rank: int, lora_alpha: float, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt = cfg.jnp_param_dtype
    sax = ("layers",) * len(stack)
    init = jax.nn.initializers.normal(0.02)
    self.kernel = param(nnx.Param, init(rngs.params(), (*stack, d_in, d_out), pdt), sax + axes)
    self.bias = param(nnx.Param, jnp.zeros((*stack, d_out), pdt), sax + axes[1:]) if bias else None
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    if lora_rank:
      # B starts at zero so adapters begin as the identity update (Hu et al. 2021).
      a = jax.nn.initializers.he_uniform()(rngs.params(), (*stack, d_in, lora_rank), pdt)
      self.lora_a = param(nnx.LoRAParam, a, sax + (axes[0], None))
      self.lora_b = param(nnx.LoRAParam, jnp.zeros((*stack, lora_rank, d_out), pdt),
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
    self.scale = param(nnx.Param, jnp.ones((*stack, dim), cfg.jnp_param_dtype),
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
    """x [B,T,D]; key_mask [B,S] valid key slots, or [B,T,S] the keys each query may see (packed
    rows: its own segment only); q_slots [T] absolute slot of each query.

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
    keys = key_mask[:, None, :] if key_mask.ndim == 2 else key_mask
    allowed = causal[None] & keys.astype(bool)  # [B,T,S]
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


__all__ = ["param", "Linear", "RMSNorm", "rope_inv_freq", "apply_rope", "Attention", "MLP", "Block"]
