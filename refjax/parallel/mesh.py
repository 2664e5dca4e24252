"""The device mesh (`data`, `fsdp`, `tensor`) built from a `config.mesh` section; parallelism is a
config edit."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) with a -1 resolved; raises naming the key if they cannot fit."""
  sizes = []
  for name in MESH_AXES:
    value = int(mesh_cfg[name])
    if value == 0 or value < -1:
      raise ValueError(f"mesh.{name}={value}; expected a positive size or -1 (the rest)")
    sizes.append(value)
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not a "
                       f"multiple of the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}; "
                     f"expected the number of devices, {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all, every process) with Auto axis types (classic GSPMD).

  `jax.make_mesh` orders devices for the hardware's topology (and groups each process's devices
  together); an explicit `devices` list is used in the order given (tests use `devices[:1]`).
  """
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    shape = resolve_mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  devices = list(devices)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)
