"""Examples packed into fixed-length rows: several short examples share a row, each its own
segment (attention and positions never cross a segment boundary), so padding is small and jit sees
one shape. The per-example weight rides on its response tokens (a dropped example has weight 0 and
is left out of the rows).

A prompt prefix every example shares (the chat template's system turn and user header: 24 of an
SST-2 example's ~67 tokens for SmolLM2) can be held once per row (`shared_prefix`): it is segment
SHARED (-1), which every segment of the row also attends to, and each example's own tokens keep
their positions (counting from the prefix). An example then computes exactly what it computes alone,
with the prefix's tokens run once per row instead of once per example."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from refjax.data.prompts import Encoded
from refjax.models.decoder import SHARED_SEGMENT as SHARED


@dataclasses.dataclass
class Packed:
  """[R, L] arrays of packed rows and what packing did."""

  arrays: dict[str, np.ndarray]  # tokens, attention_mask, loss_mask (float), segment_ids, positions
  examples: int  # examples placed
  rows: int
  real_tokens: int
  shared_prefix: int = 0  # leading tokens of every example held once per row

  @property
  def padding(self) -> float:
    """Share of the rows' token slots that hold padding."""
    slots = self.arrays["tokens"].size
    return 1.0 - self.real_tokens / slots if slots else 0.0


def shared_prompt_prefix(encoded: Sequence[Encoded]) -> int:
  """Leading tokens that every example has in common, within every example's prompt (at least its
  last prompt token stays its own, so each example keeps a token to read its feature at)."""
  if not encoded:
    return 0
  first = encoded[0].ids
  n = min(min(e.last_prompt_index for e in encoded), len(first))
  for e in encoded[1:]:
    ids = e.ids
    m = 0
    while m < n and ids[m] == first[m]:
      m += 1
    n = m
  return n


def pack(encoded: Sequence[Encoded], weights: Sequence[float], length: int, pad_id: int, *,
         seed: int = 0, extra: Mapping[str, Sequence[np.ndarray]] | None = None,
         shared_prefix: int = 0) -> Packed:
  """First-fit-decreasing packing of the examples with weight > 0 into rows of `length` tokens.

  `extra`: per-example arrays whose leading axis runs over the example's tokens (e.g. a teacher's
  cached top-k targets), packed alongside the tokens (padding: zeros). `shared_prefix`: the number
  of leading prompt tokens all examples share (`shared_prompt_prefix`), held once per row.
  """
  if length < 2:
    raise ValueError(f"row length={length}; expected >= 2")
  keep = [i for i, w in enumerate(weights) if w > 0]
  too_long = [i for i in keep if len(encoded[i].ids) > length]
  if too_long:
    raise ValueError(f"{len(too_long)} examples are longer than the row length {length} (e.g. "
                     f"example {too_long[0]}: {len(encoded[too_long[0]].ids)} tokens); encode "
                     "with max_len <= the row length")
  p = int(shared_prefix)
  if p:
    head = encoded[keep[0]].ids[:p] if keep else []
    bad = [i for i in keep if encoded[i].ids[:p] != head or encoded[i].last_prompt_index < p
           or any(encoded[i].response_mask[:p])]
    if bad:
      raise ValueError(f"shared_prefix={p}: example {bad[0]} does not start with the other "
                       f"examples' first {p} tokens, or they reach past its prompt")
  order = np.random.default_rng(seed).permutation(len(keep))  # ties broken by a seeded order
  order = sorted((keep[i] for i in order), key=lambda i: -len(encoded[i].ids))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:  # first fit: the first row with room
    n = len(encoded[i].ids) - p
    for r, room in enumerate(free):
      if room >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(length - p - n)
  out = {"tokens": np.full((len(rows), length), pad_id, np.int32),
         "attention_mask": np.zeros((len(rows), length), np.int32),
         "loss_mask": np.zeros((len(rows), length), np.float32),
         "segment_ids": np.zeros((len(rows), length), np.int32),
         "positions": np.zeros((len(rows), length), np.int32)}
  for key, values in (extra or {}).items():
    first = np.asarray(values[keep[0]]) if keep else np.zeros((0,))
    out[key] = np.zeros((len(rows), length) + first.shape[1:], first.dtype)
  real = 0
  for r, members in enumerate(rows):
    if p:  # the shared prefix, once, at the row's start
      out["tokens"][r, :p] = encoded[members[0]].ids[:p]
      out["attention_mask"][r, :p] = 1
      out["segment_ids"][r, :p] = SHARED
      out["positions"][r, :p] = np.arange(p)
      for key, values in (extra or {}).items():
        out[key][r, :p] = np.asarray(values[members[0]])[:p]
    at = p
    for seg, i in enumerate(members, start=1):
      e, n = encoded[i], len(encoded[i].ids) - p
      out["tokens"][r, at:at + n] = e.ids[p:]
      out["attention_mask"][r, at:at + n] = 1
      out["loss_mask"][r, at:at + n] = np.asarray(e.response_mask[p:], np.float32) * weights[i]
      out["segment_ids"][r, at:at + n] = seg
      out["positions"][r, at:at + n] = np.arange(p, p + n)
      for key, values in (extra or {}).items():
        out[key][r, at:at + n] = np.asarray(values[i])[p:]
      at += n
    real += at
  return Packed(out, len(keep), len(rows), real, p)


def prefix_filling(encoded: Sequence[Encoded], rows: int, length: int, pad_id: int, *,
                   seed: int = 0, shared_prefix: int = 0) -> list[int]:
  """Indices of the shortest prefix of a seeded permutation of `encoded` whose packing into rows of
  `length` tokens gives at least `rows` rows (every example when all of them give fewer), in
  their original order: a subset just large enough for `rows` row draws without repeats."""
  n = len(encoded)
  order = np.random.default_rng([seed, 1]).permutation(n)
  ones = np.ones(n)

  def rows_of(m: int) -> int:  # packed as the caller will pack them: in their original order
    return pack([encoded[i] for i in sorted(order[:m])], ones[:m], length, pad_id, seed=seed,
                shared_prefix=shared_prefix).rows

  if n == 0 or rows_of(n) <= rows:
    return list(range(n))
  lo, hi = 1, n
  while lo < hi:  # the smallest m whose packing reaches `rows` (row counts grow with m)
    mid = (lo + hi) // 2
    if rows_of(mid) >= rows:
      hi = mid
    else:
      lo = mid + 1
  return sorted(int(i) for i in order[:hi])
