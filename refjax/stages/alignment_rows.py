"""The alignment examples the finetune stage draws, in one home for `distill` (the teacher's targets
are computed for exactly these) and `finetune` (which packs them): a seeded prefix of the alignment
set just long enough to fill every alignment row the longest-training method reads in its run, so
no target is computed for a row no step reads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refjax.data.packing import pack, prefix_filling, shared_prompt_prefix
from refjax.data.prompts import Encoded
from refjax.stages.context import Run


def epoch_steps(fc: Any, rows: int, rows_per_step: int) -> int:
  """finetune.epochs passes over the rows when set (> 0), else finetune.train.steps."""
  if float(fc.epochs) > 0:
    return max(1, math.ceil(float(fc.epochs) * rows / rows_per_step))
  return int(fc.train.steps)


def align_rows_per_step(fc: Any) -> int:
  """Alignment rows in each step of a method that trains on them (finetune.align_ratio of the batch,
  at least one)."""
  return max(1, int(round(float(fc.align_ratio) * int(fc.train.batch_size))))


def shared_prefix(fc: Any, encoded: list[Encoded]) -> int:
  """The prompt tokens all of `encoded` share, held once per packed row (finetune.share_prefix),
  else 0. Computed over a whole set, so every subset of it packs the same way."""
  return shared_prompt_prefix(encoded) if bool(fc.share_prefix) else 0


def encode_alignment(r: Run, fmt) -> list[Encoded]:
  """Every alignment example as the finetune stage packs it (capped at finetune.max_len)."""
  return [fmt.encode(e.instruction, e.input, e.response, max_len=int(r.cfg.finetune.max_len))
          for e in r.sets.alignment()]


def drawn_alignment(r: Run, fmt) -> tuple[list[int], list[Encoded], dict[str, int]]:
  """(indices into the alignment set, their encodings, counts) of the alignment examples a method
  with alignment rows draws: enough packed rows for its steps when no user example is dropped (the
  most steps any method takes), so every step reads a fresh row and none is read twice."""
  fc = r.cfg.finetune
  rows_len, seed = int(fc.pack_len), int(fc.train.seed)
  enc = encode_alignment(r, fmt)
  user = [fmt.encode(e.instruction, e.input, e.response, max_len=int(fc.max_len))
          for e in r.sets.user()]
  user_rows = pack(user, np.ones(len(user)), rows_len, fmt.pad_id, seed=seed,
                   shared_prefix=shared_prefix(fc, user)).rows
  per_step = align_rows_per_step(fc)
  needed = epoch_steps(fc, user_rows, int(fc.train.batch_size) - per_step) * per_step
  p = shared_prefix(fc, enc)
  index = prefix_filling(enc, needed, rows_len, fmt.pad_id, seed=seed, shared_prefix=p)
  return index, [enc[i] for i in index], {"rows_needed": needed, "of": len(enc),
                                          "shared_prefix": p}


__all__ = ["shared_prefix", "epoch_steps", "align_rows_per_step", "encode_alignment",
           "drawn_alignment"]
