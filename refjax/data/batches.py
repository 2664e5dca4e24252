"""Examples -> fixed-shape numpy arrays: whole training sets (prompt + response, encoded once)
and prompt-only batches for scoring (bucketed lengths, padding rows marked invalid).

Training batches over an encoded set come from `refjax.training.data` (deterministic from seed
and position, so a resumed run sees the batches an uninterrupted one would have).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from refjax.data.packing import shared_prompt_prefix
from refjax.data.prompts import BUCKETS, Encoded, PromptFormat, bucket_length, pad_batch

HARMFUL, HARMLESS = "harmful", "harmless"
HARMFUL_SIGN = {HARMFUL: 1, HARMLESS: -1}


@dataclasses.dataclass
class EncodedSet:
  """Fixed-shape arrays for N examples (right-padded to `length`) and their ids."""

  ids: list[str]
  arrays: dict[str, np.ndarray]  # tokens, attention_mask, response_mask [N,T]; last_prompt_index,
  truncated: int  # labels_sign [N] (+1 harmful, -1 harmless, 0 unlabelled)

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def length(self) -> int:
    return self.arrays["tokens"].shape[1]

  def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


def encode_examples(examples: Sequence, fmt: PromptFormat, max_len: int, *,
                    with_response: bool = True) -> EncodedSet:
  """Renders examples (prompt + response when `with_response`) into right-padded [N, max_len]."""
  if not examples:
    raise ValueError("encode_examples: no examples to encode")
  enc = [fmt.encode(e.instruction, e.input, e.response if with_response else None,
                    max_len=max_len) for e in examples]
  arrays = pad_batch(enc, max_len, fmt.pad_id, side="right")
  arrays.pop("valid")
  arrays["labels_sign"] = np.array([HARMFUL_SIGN.get(e.label or "", 0) for e in examples],
                                   np.int32)
  return EncodedSet([e.id for e in examples], arrays, sum(e.truncated for e in enc))


def harmful_labels(examples: Sequence[Any], field: str = "label",
                   positive: str = HARMFUL, negative: str = HARMLESS) -> np.ndarray:
  """1/0 int32 labels from each example's `field` ('harmful'/'harmless' by default)."""
  out = np.zeros(len(examples), np.int32)
  for i, ex in enumerate(examples):
    value = getattr(ex, field, None)
    if value not in (positive, negative):
      raise ValueError(f"example {getattr(ex, 'id', i)!r}: {field}={value!r}; expected "
                       f"{positive!r} or {negative!r}")
    out[i] = value == positive
  return out


def prompt_batches(examples: Sequence[Any], prompt_format: PromptFormat, *, batch_size: int,
                   max_len: int = 512, labels: Sequence[int] | np.ndarray | None = None,
                   side: str = "right", sort_by_length: bool = True,
                   buckets: Sequence[int] = BUCKETS, share_prefix: bool = False
                   ) -> list[dict[str, np.ndarray]]:
  """Encodes the examples' prompts (instruction + input, no response) into fixed-shape batches.

  Each batch holds pad_batch's arrays [B, bucket] plus `index` [B] (position in `examples`, -1 on
  padding rows) and, given `labels`, `harmful` [B]. Sorting by length cuts padding; `index`
  restores the input order. Each batch's length is the smallest of `buckets` that fits it, so jit
  compiles once per bucket used. `share_prefix`: the leading tokens every prompt shares (the chat
  template's system turn) leave the rows and come once as `prefix` [P] in every batch; the scoring
  pass runs them once per batch (`refjax.method.features`) and the rows continue from them.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  if labels is not None and len(labels) != len(examples):
    raise ValueError(f"{len(labels)} labels for {len(examples)} examples")
  enc = [prompt_format.encode(ex.instruction, getattr(ex, "input", "") or "", max_len=max_len)
         for ex in examples]
  prefix = np.zeros((0,), np.int32)
  if share_prefix and enc:
    p = shared_prompt_prefix(enc)
    prefix = np.asarray(enc[0].ids[:p], np.int32)
    enc = [Encoded(e.ids[p:], e.last_prompt_index - p, e.response_mask[p:], e.truncated)
           for e in enc]
  order = np.arange(len(enc))
  if sort_by_length:
    order = np.argsort([len(e.ids) for e in enc], kind="stable")
  batches = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    chunk = [enc[i] for i in idx]
    length = bucket_length(max(len(e.ids) for e in chunk), buckets)
    batch = pad_batch(chunk, length, prompt_format.pad_id, side=side, batch_size=batch_size)
    batch["index"] = np.full((batch_size,), -1, np.int64)
    batch["index"][:len(idx)] = idx
    if labels is not None:
      batch["harmful"] = np.zeros((batch_size,), np.int32)
      batch["harmful"][:len(idx)] = np.asarray(labels)[idx]
    if len(prefix):
      batch["prefix"] = prefix
    batches.append(batch)
  return batches


__all__ = ["EncodedSet", "encode_examples", "harmful_labels", "prompt_batches", "HARMFUL_SIGN",
           "HARMFUL", "HARMLESS"]
