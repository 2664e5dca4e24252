"""Text in, text out: templating, length buckets, fixed batches, decoding and stop handling.

Prompts are sorted by length, cut into equal batches and left-padded to each batch's length
bucket, so jit compiles once per (bucket, batch, max_new_tokens) and little of a batch is
padding; the decode loop itself is `refjax.models.decode`.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.data.packing import shared_prompt_prefix
from refjax.data.prompts import Encoded, PromptFormat, bucket_length, pad_batch
from refjax.models.decode import SamplingConfig, decode, unstack
from refjax.models.decoder import Decoder


class Generator:
  """Text in, text out: templating, bucketing, batching, decoding and stop handling.

  Holds the decode-loop weights (`unstack`) made once, so every batch skips that copy; this
  costs one more copy of the layer weights in memory for the Generator's lifetime.
  """

  def __init__(self, model: Decoder, prompt_format: PromptFormat, *, batch_size: int = 8,
               max_prompt_len: int = 512, share_prefix: bool = False):
    self.graphdef, self.state = nnx.split(model)
    self.unstacked = unstack(self.graphdef, self.state)
    self.fmt = prompt_format
    self.batch_size = batch_size
    self.max_prompt_len = max_prompt_len
    # the leading tokens every prompt of a call shares (a chat template's system turn) run once
    # per batch, each row continuing from them (`decode(prefix=)`): the same answers, a shorter
    # prefill (config.prompt.share_prefix)
    self.share_prefix = share_prefix

  def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                   seed: int = 0, progress: bool = False) -> list[list[int]]:
    """Token-id prompts -> generated ids per prompt (stop token dropped), in input order.

    Prompts are decoded shortest first in equal batches (`batches`), so a batch pads to its own
    length bucket and no batch is mostly padding rows."""
    results: list[list[int]] = [[] for _ in prompts]
    rng = jax.random.key(seed)
    cut = shared_prompt_prefix([_as_encoded(list(p)) for p in prompts]) if self.share_prefix else 0
    prefix = jnp.asarray(list(prompts[0][:cut]), jnp.int32) if cut else None
    chunks = batches([len(p) - cut for p in prompts], self.batch_size)
    rows = len(chunks[0]) if chunks else 0  # one batch shape: a shorter last batch is padded
    if progress:
      from tqdm import tqdm
      chunks = tqdm(chunks, desc="generate", unit="batch")
    for idx in chunks:
      chunk = [list(prompts[i])[cut:] for i in idx]
      length = bucket_length(max(len(p) for p in chunk))
      enc = [_as_encoded(p) for p in chunk]
      batch = pad_batch(enc, length, self.fmt.pad_id, side="left", batch_size=rows)
      rng, sub = jax.random.split(rng)
      buf, lengths = decode(self.graphdef, self.state, jnp.asarray(batch["tokens"]),
                            jnp.asarray(batch["attention_mask"]), sub, sampling=sampling,
                            stop_ids=self.fmt.eos_ids, pad_id=self.fmt.pad_id,
                            unstacked=self.unstacked, prefix=prefix)
      buf, lengths = np.asarray(buf), np.asarray(lengths)
      for row, i in enumerate(idx):
        ids = buf[row, :lengths[row]].tolist()
        if ids and ids[-1] in self.fmt.eos_ids:
          ids = ids[:-1]
        results[i] = ids
    return results

  def generate_text(self, prompts: Sequence[str], sampling: SamplingConfig = SamplingConfig(),
                    *, inputs: Sequence[str] | None = None, seed: int = 0,
                    progress: bool = False) -> list[str]:
    """Raw user prompts (templated here) -> decoded answers."""
    inputs = inputs or [""] * len(prompts)
    ids = [self.fmt.encode(p, i, max_len=self.max_prompt_len).ids for p, i in zip(prompts, inputs)]
    out = self.generate_ids(ids, sampling, seed=seed, progress=progress)
    return [self.fmt.tokenizer.decode(o, skip_special_tokens=True) for o in out]

  def generate_raw(self, texts: Sequence[str], sampling: SamplingConfig = SamplingConfig(),
                   *, seed: int = 0) -> list[str]:
    """Already-rendered texts (e.g. a judge's own template) -> decoded continuations."""
    tok = self.fmt.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"][-self.max_prompt_len:] for t in texts]
    return [tok.decode(o, skip_special_tokens=True)
            for o in self.generate_ids(ids, sampling, seed=seed)]

  def __call__(self, prompts: Sequence[str]) -> list[str]:
    """The `generate_fn` evaluation expects: greedy answers to raw user prompts."""
    return self.generate_text(prompts)


def batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
  """Indices of `lengths`, shortest first, cut into ceil(n / batch_size) batches of
  ceil(n / batches) rows (the last one shorter when that does not divide): each batch pads to its
  own length bucket, and 100 prompts at batch size 32 decode as 4 x 25 rows, not 4 x 32."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  n = len(lengths)
  if not n:
    return []
  rows = -(-n // -(-n // batch_size))
  order = np.argsort(np.asarray(lengths), kind="stable")
  return [order[s:s + rows] for s in range(0, n, rows)]


def _as_encoded(ids: list[int]) -> Encoded:
  return Encoded(ids, len(ids) - 1, [0] * len(ids))


def timed(fn, *args, **kw):
  """(result, seconds) after blocking on the result; for benchmarks."""
  t0 = time.perf_counter()
  r = jax.block_until_ready(fn(*args, **kw))
  return r, time.perf_counter() - t0


__all__ = ["Generator", "SamplingConfig", "batches", "timed"]
