"""The config's JSON form: what every run writes as `config.json`, and reading it back."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from refjax.config import ConfigError, base_config
from refjax.files import jsonable


def to_dict(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON values (what `config.json` holds; a NaN, e.g. an unset threshold, is null)."""
  return jsonable(c)


def from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict of a `config.json`: the schema's defaults with the file's values on top (JSON
  lists back to tuples, null back to NaN where the field is a float). An unknown key raises."""
  out = base_config()

  def merge(target: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
    for k, v in values.items():
      if k not in target:
        raise ConfigError(f"config.{prefix}{k}: not a field of the schema")
      default = target[k]
      if isinstance(default, ml_collections.ConfigDict) and isinstance(v, Mapping):
        if k == "rules":  # free-form table of logical axis -> mesh axes
          target[k] = ml_collections.ConfigDict(dict(v))
        else:
          merge(default, v, f"{prefix}{k}.")
      elif v is None and isinstance(default, float):
        target[k] = float("nan")
      elif isinstance(v, list):
        target[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
      else:
        target[k] = v

  merge(out, d, "")
  return out


__all__ = ["to_dict", "from_dict"]
