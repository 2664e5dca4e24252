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
  seed and the position, and `get_state`/`set_state` carry the position through checkpoints.
  `batch_sizes` gives every key's global rows per batch."""

  batch_sizes: Mapping[str, int]

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

  @property
  def batch_sizes(self) -> dict[str, int]:
    """Global rows per batch of every key (what `host_to_global` builds)."""
    return {k: self.batch_size for k in self.arrays}

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


class GroupedIterator:
  """Batches made of several groups of rows, each from its own ArrayIterator (own rows, lengths
  and seed), their keys prefixed with the group's name ("" keeps the keys as they are): e.g. user
  rows and alignment rows of different lengths in one optimizer step."""

  def __init__(self, groups: Mapping[str, ArrayIterator]):
    self.groups = dict(groups)
    keys = [p + k for p, it in self.groups.items() for k in it.arrays]
    if len(set(keys)) != len(keys):
      raise ValueError(f"group keys collide: {sorted(keys)}")

  @property
  def batch_sizes(self) -> dict[str, int]:
    return {p + k: n for p, it in self.groups.items() for k, n in it.batch_sizes.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return {p + k: v for p, it in self.groups.items() for k, v in next(it).items()}

  def get_state(self) -> dict[str, Any]:
    return {p: it.get_state() for p, it in self.groups.items()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for p, it in self.groups.items():
      it.set_state(state[p])


def batch_shapes(arrays: Mapping[str, np.ndarray], batch_size: int) -> dict[str, tuple]:
  return {k: (batch_size,) + tuple(v.shape[1:]) for k, v in arrays.items()}


def _sharded(arrays: Mapping[str, np.ndarray], plan: Parallel, batch_size: int, seed: int
             ) -> tuple[ArrayIterator, dict[str, Any]]:
  shapes = batch_shapes(arrays, batch_size)
  shardings = rules_lib.batch_shardings(
      {k: jax.ShapeDtypeStruct(s, np.int32) for k, s in shapes.items()}, plan.mesh, plan.rules)
  rows = process_batch_rows(next(iter(shardings.values())), batch_size)
  return ArrayIterator(arrays, batch_size, seed=seed, rows=rows), shardings


def make_iterator(arrays: Mapping[str, np.ndarray], plan: Parallel, batch_size: int, seed: int):
  """A resumable iterator over `arrays` and the batch shardings; each process reads only its rows
  of each global batch."""
  return _sharded(arrays, plan, batch_size, seed)


def make_grouped_iterator(groups: Mapping[str, tuple[Mapping[str, np.ndarray], int]],
                          plan: Parallel, seed: int):
  """{prefix: (arrays, rows per batch)} -> (GroupedIterator, shardings of every prefixed key);
  group i draws with seed + i."""
  iterators, shardings = {}, {}
  for i, (prefix, (arrays, rows)) in enumerate(groups.items()):
    it, sh = _sharded(arrays, plan, rows, seed + i)
    iterators[prefix] = it
    shardings.update({prefix + k: v for k, v in sh.items()})
  return GroupedIterator(iterators), shardings


__all__ = ["DataIterator", "ArrayIterator", "GroupedIterator", "batch_shapes", "make_iterator",
           "make_grouped_iterator"]
