"""Mesh, logical-axis sharding rules, the run's mesh+rules plan, and multi-host batches."""

from refjax.parallel.distributed import host_to_global, initialize, process_batch_rows
from refjax.parallel.mesh import MESH_AXES, make_mesh, resolve_mesh_shape
from refjax.parallel.plan import Parallel
from refjax.parallel.rules import (DEFAULT_RULES, batch_sharding, batch_shardings, fit_spec,
                                   logical_shardings, logical_to_mesh, make_rules,
                                   param_shardings, replicated, sharding_for)

__all__ = ["MESH_AXES", "DEFAULT_RULES", "Parallel", "make_mesh", "resolve_mesh_shape",
           "make_rules", "logical_to_mesh", "fit_spec", "sharding_for", "logical_shardings",
           "param_shardings", "batch_sharding", "batch_shardings", "replicated", "initialize",
           "process_batch_rows", "host_to_global"]
