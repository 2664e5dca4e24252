"""Resumable host-side batchers over in-memory arrays: the batch at a position depends only on the
seed and the position, so a resumed run sees exactly the batches an uninterrupted one would.

Each process keeps only its rows of every global batch (`refjax.parallel.process_batch_rows`).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax
import numpy as np

from refjax.parallel import rules as rules_lib
from refjax.parallel.distributed import process_batch_rows
from refjax.parallel.plan import Parallel


class DataIterator(Protocol):
  """Host-local batches, resumable by position: the batch at a position depends only on the
  seed and the position, and `get_state`/`set_state` carry the position through checkpoints."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


class ArrayIterator:
  """Shuffled fixed-size batches from in-memory arrays [N, ...], epoch after epoch.

  Batch p holds examples perm_e[(p mod n) * B : (p mod n + 1) * B] with e = p // n, n = N // B
  (the remainder of each epoch is skipped) and perm_e a permutation seeded by (seed, e). This
  process keeps only `rows` of each global batch (its devices' share, see
  `refjax.parallel.process_batch_rows`).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
               rows: slice | None = None, shuffle: bool = True):
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays have different lengths {sizes}; expected one example count")
    self.num_examples = next(iter(sizes.values()))
    if not 1 <= batch_size <= self.num_examples:
      raise ValueError(f"batch_size={batch_size}; expected 1..{self.num_examples} (examples)")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.rows = rows if rows is not None else slice(0, batch_size)
    self.position = 0
    self._epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                    if self.shuffle else np.arange(self.num_examples))
    return self._perm

  def batch_indices(self, position: int) -> np.ndarray:
    """Example indices of the global batch at `position`."""
    per_epoch = self.num_examples // self.batch_size
    start = (position % per_epoch) * self.batch_size
    return self._permutation(position // per_epoch)[start:start + self.batch_size]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx = self.batch_indices(self.position)[self.rows]
    self.position += 1
    return {k: v[idx] for k, v in self.arrays.items()}

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position, "seed": self.seed}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"data state has seed {state['seed']}; this iterator's seed is {self.seed}")
    self.position = int(state["position"])


class PairedIterator:
  """Global batches whose first rows come from `first` and last rows from `second`.

  Each row carries `is_second` (0/1). Both sub-iterators draw whole global batches (resumable by
  position); this process keeps its `rows` of the concatenation.
  """

  def __init__(self, first: ArrayIterator, second: ArrayIterator, rows: slice | None = None):
    self.first, self.second, self.rows = first, second, rows

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    a, b = next(self.first), next(self.second)
    out = {k: np.concatenate([a[k], b[k]]) for k in a}
    out["is_second"] = np.concatenate([np.zeros(len(a["tokens"]), np.int32),
                                       np.ones(len(b["tokens"]), np.int32)])
    return {k: v[self.rows] for k, v in out.items()} if self.rows is not None else out

  def get_state(self) -> dict[str, Any]:
    return {"first": self.first.get_state(), "second": self.second.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.first.set_state(state["first"])
    self.second.set_state(state["second"])


def batch_shapes(arrays: Mapping[str, np.ndarray], batch_size: int) -> dict[str, tuple]:
  return {k: (batch_size,) + tuple(v.shape[1:]) for k, v in arrays.items()}


def make_iterator(arrays: Mapping[str, np.ndarray], par: Parallel, batch_size: int, seed: int,
                  second: Mapping[str, np.ndarray] | None = None, second_rows: int = 0):
  """A resumable iterator over `arrays` (and `second_rows` rows of `second` per batch).

  Returns (iterator, batch shardings); each process reads only its rows of each global batch.
  """
  total = batch_size
  shapes = batch_shapes(arrays, total)
  if second is not None and second_rows:
    shapes["is_second"] = (total,)
  shardings = rules_lib.batch_shardings(
      {k: jax.ShapeDtypeStruct(s, np.int32) for k, s in shapes.items()}, par.mesh, par.rules)
  rows = process_batch_rows(next(iter(shardings.values())), total)
  if second is None or not second_rows:
    return ArrayIterator(arrays, total, seed=seed, rows=rows), shardings
  if not 0 < second_rows < total:
    raise ValueError(f"second_rows={second_rows}; expected 0 < rows < batch_size={total}")
  it = PairedIterator(ArrayIterator(arrays, total - second_rows, seed=seed),
                      ArrayIterator(second, second_rows, seed=seed + 1), rows=rows)
  return it, shardings


__all__ = ["DataIterator", "ArrayIterator", "PairedIterator", "batch_shapes", "make_iterator"]
