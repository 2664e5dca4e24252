"""One place that turns a `config.model` into (Decoder, tokenizer), sharded on the run's mesh.

`name` is whatever `refjax.models.hub` resolves: a shipped model (fetched and cached on first use),
a local HF directory or .gguf file, a hub id, or `tiny` / `tiny:SEED` (a random 2-layer model with
a byte tokenizer, for tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refjax.models import hub
from refjax.models.config import ModelConfig
from refjax.models.gguf_tokenizer import tokenizer_from_gguf
from refjax.models.tiny import byte_tokenizer, tiny_model
from refjax.models.weights import load_hf_dir
from refjax.parallel.plan import Parallel


def model_overrides(mc: Any) -> dict[str, Any]:
  """The ModelConfig fields a run's config.model sets on top of the checkpoint's config.json."""
  return dict(param_dtype=mc.param_dtype, dtype=mc.dtype, lora_rank=mc.lora_rank,
              lora_alpha=mc.lora_alpha, lora_targets=tuple(mc.lora_targets), remat=mc.remat)


def load_tokenizer(path: str | Path):
  """The tokenizer of a model directory (transformers) or of a .gguf file (rebuilt, no torch)."""
  path = Path(path)
  if path.is_file() and path.suffix == ".gguf":
    return tokenizer_from_gguf(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path))


def load_model_and_tokenizer(mc: Any, *, plan: Parallel | None = None):
  """(Decoder, tokenizer) for config.model; with `plan` each tensor is read straight into its
  sharding on the plan's mesh."""
  overrides = model_overrides(mc)
  if hub.is_tiny(mc.name):
    seed = int(mc.name.split(":")[1]) if ":" in mc.name else 0
    model = tiny_model(seed, **overrides)
    return (plan.place(model) if plan is not None else model), byte_tokenizer()
  path = hub.resolve(mc.name)
  shardings = None
  if plan is not None:
    config_json = Path(path) / "config.json"
    if config_json.exists():
      cfg = ModelConfig.from_hf(json.loads(config_json.read_text()), **overrides)
      shardings = plan.param_shardings(cfg)
  model, _ = load_hf_dir(path, shardings=shardings, **overrides)
  return model, load_tokenizer(path)


__all__ = ["model_overrides", "load_tokenizer", "load_model_and_tokenizer"]
