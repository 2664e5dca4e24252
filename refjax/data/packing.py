"""Examples packed into fixed-length rows: several short examples share a row, each its own
segment (attention and positions never cross a segment boundary), so padding is small and jit sees
one shape. The per-example weight rides on its response tokens (a dropped example has weight 0 and
is left out of the rows)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from refjax.data.prompts import Encoded


@dataclasses.dataclass
class Packed:
  """[R, L] arrays of packed rows and what packing did."""

  arrays: dict[str, np.ndarray]  # tokens, attention_mask, loss_mask (float), segment_ids, positions
  examples: int  # examples placed
  rows: int
  real_tokens: int

  @property
  def padding(self) -> float:
    """Share of the rows' token slots that hold padding."""
    slots = self.arrays["tokens"].size
    return 1.0 - self.real_tokens / slots if slots else 0.0


def pack(encoded: Sequence[Encoded], weights: Sequence[float], length: int, pad_id: int, *,
         seed: int = 0, extra: Mapping[str, Sequence[np.ndarray]] | None = None) -> Packed:
  """First-fit-decreasing packing of the examples with weight > 0 into rows of `length` tokens.

  `extra`: per-example arrays whose leading axis runs over the example's tokens (e.g. a teacher's
  cached top-k targets), packed alongside the tokens (padding: zeros).
  """
  if length < 2:
    raise ValueError(f"row length={length}; expected >= 2")
  keep = [i for i, w in enumerate(weights) if w > 0]
  too_long = [i for i in keep if len(encoded[i].ids) > length]
  if too_long:
    raise ValueError(f"{len(too_long)} examples are longer than the row length {length} (e.g. "
                     f"example {too_long[0]}: {len(encoded[too_long[0]].ids)} tokens); encode "
                     "with max_len <= the row length")
  order = np.random.default_rng(seed).permutation(len(keep))  # ties broken by a seeded order
  order = sorted((keep[i] for i in order), key=lambda i: -len(encoded[i].ids))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:  # first fit: the first row with room
    n = len(encoded[i].ids)
    for r, room in enumerate(free):
      if room >= n:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(length - n)
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
    at = 0
    for seg, i in enumerate(members, start=1):
      e, n = encoded[i], len(encoded[i].ids)
      out["tokens"][r, at:at + n] = e.ids
      out["attention_mask"][r, at:at + n] = 1
      out["loss_mask"][r, at:at + n] = np.asarray(e.response_mask, np.float32) * weights[i]
      out["segment_ids"][r, at:at + n] = seg
      out["positions"][r, at:at + n] = np.arange(n)
      for key, values in (extra or {}).items():
        out[key][r, at:at + n] = values[i]
      at += n
    real += at
  return Packed(out, len(keep), len(rows), real)


def prefix_filling(encoded: Sequence[Encoded], rows: int, length: int, pad_id: int, *,
                   seed: int = 0) -> list[int]:
  """Indices of the shortest prefix of a seeded permutation of `encoded` whose packing into rows of
  `length` tokens gives at least `rows` rows (every example when all of them give fewer), in
  their original order: a subset just large enough for `rows` row draws without repeats."""
  n = len(encoded)
  order = np.random.default_rng([seed, 1]).permutation(n)
  ones = np.ones(n)

  def rows_of(m: int) -> int:  # packed as the caller will pack them: in their original order
    return pack([encoded[i] for i in sorted(order[:m])], ones[:m], length, pad_id, seed=seed).rows

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
