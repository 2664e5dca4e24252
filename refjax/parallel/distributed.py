"""Multi-host setup (`jax.distributed`) and host-local batches -> global sharded arrays.

Each process reads only the rows of the global batch that its own devices hold
(`process_batch_rows`), and `host_to_global` stitches the per-process pieces into one global
`jax.Array` without any cross-host copy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Sharding

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(cfg: Mapping[str, Any] | None = None) -> bool:
  """Calls `jax.distributed.initialize` from a `config.distributed` section or the environment;
  True if multi-process. Must run before any JAX computation. A no-op when already initialised
  or nothing is configured."""
  cfg = cfg if cfg is not None else {}
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  address = cfg.get("coordinator_address") or os.environ.get(ENV_COORDINATOR, "")
  num = int(cfg.get("num_processes") or os.environ.get(ENV_NUM_PROCESSES, 0) or 0)
  pid = int(cfg.get("process_id", -1))
  if pid < 0:
    pid = int(os.environ.get(ENV_PROCESS_ID, -1))
  timeout = int(cfg.get("initialization_timeout", 300))
  if address:
    if num < 1:
      raise ValueError(f"distributed.num_processes={num} (or ${ENV_NUM_PROCESSES}); expected >= 1 "
                       f"when a coordinator address ({address}) is given")
    if not 0 <= pid < num:
      raise ValueError(f"distributed.process_id={pid} (or ${ENV_PROCESS_ID}); expected 0 <= id < "
                       f"num_processes={num}")
    if num == 1:
      return False
    jax.distributed.initialize(address, num_processes=num, process_id=pid,
                               initialization_timeout=timeout)
  elif cfg.get("auto_detect", False):
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    return False
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def process_batch_rows(sharding: Sharding, global_batch_size: int) -> slice:
  """The contiguous rows [start, stop) of a [B, ...] global batch that this process's devices hold.

  The process reads exactly these rows of every global batch (and no others).
  """
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts, stops = [], []
  for idx in index_map.values():
    s = idx[0] if idx else slice(None)
    start, stop, _ = s.indices(global_batch_size)
    starts.append(start)
    stops.append(stop)
  start, stop = min(starts), max(stops)
  covered = np.zeros(global_batch_size, bool)
  for a, b in zip(starts, stops):
    covered[a:b] = True
  if not covered[start:stop].all():
    raise ValueError(f"this process's batch rows {sorted(zip(starts, stops))} are not contiguous; "
                     "order the mesh devices by process (jax.make_mesh does)")
  return slice(start, stop)


def host_to_global(local: Mapping[str, np.ndarray], shardings: Mapping[str, Sharding],
                   global_batch_size: int | Mapping[str, int]) -> dict[str, jax.Array]:
  """Host-local rows (this process's `process_batch_rows`) -> global arrays [global_batch, ...];
  `global_batch_size` is one size for every key, or a size per key."""
  out: dict[str, Any] = {}
  for key, value in local.items():
    if key not in shardings:
      raise KeyError(f"batch key {key!r} has no sharding; expected one of {sorted(shardings)}")
    value = np.asarray(value)
    rows = global_batch_size if isinstance(global_batch_size, int) else global_batch_size[key]
    shape = (rows,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], value, shape)
  return out
