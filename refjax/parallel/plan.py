"""The run's parallelism plan: one device mesh and one logical-axis rule table, shared by every
stage (`config.mesh` -> `Parallel.from_config`). Changing the parallelism is a config edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections

from refjax.parallel import rules as rules_lib
from refjax.parallel.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class Parallel:
  """The device mesh and the logical-axis rules every stage of a run shares."""

  mesh: jax.sharding.Mesh
  rules: Mapping[str, Any]

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Parallel":
    return cls(make_mesh(cfg.mesh), rules_lib.make_rules(dict(cfg.mesh.get("rules", {}) or {})))

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return rules_lib.replicated(self.mesh)


__all__ = ["Parallel"]
