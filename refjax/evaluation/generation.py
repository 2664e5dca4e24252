"""Text in, text out: templating, length buckets, fixed batches, decoding and stop handling.

Prompts are left-padded to a length bucket and the batch to a fixed size, so jit compiles once per
(bucket, batch, max_new_tokens); the decode loop itself is `refjax.models.decode`.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.data.prompts import Encoded, PromptFormat, bucket_length, pad_batch
from refjax.models.decode import SamplingConfig, decode, unstack
from refjax.models.decoder import Decoder


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


def _as_encoded(ids: list[int]) -> Encoded:
  return Encoded(ids, len(ids) - 1, [0] * len(ids))


def timed(fn, *args, **kw):
  """(result, seconds) after blocking on the result; for benchmarks."""
  t0 = time.perf_counter()
  r = jax.block_until_ready(fn(*args, **kw))
  return r, time.perf_counter() - t0


__all__ = ["Generator", "SamplingConfig", "timed"]
