"""One place that turns a `config.model` into (Decoder, tokenizer), sharded on the run's mesh.

`name` is whatever `refjax.models.hub` resolves: a shipped model (fetched and cached on first use),
a local HF directory or .gguf file, a hub id, or `tiny` / `tiny:SEED` (a random 2-layer model with
a byte tokenizer, for tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from refjax.models import hub
from refjax.models.config import ModelConfig
from refjax.models.decoder import Decoder, abstract_decoder
from refjax.models.gguf_tokenizer import tokenizer_from_gguf
from refjax.models.tiny import byte_tokenizer, tiny_model
from refjax.models.weights import load_hf_dir
from refjax.parallel import rules as rules_lib
from refjax.parallel.plan import Parallel


def model_overrides(mc: Any) -> dict[str, Any]:
  """The ModelConfig fields a run's config.model sets on top of the checkpoint's config.json."""
  return dict(param_dtype=mc.param_dtype, dtype=mc.dtype, lora_rank=mc.lora_rank,
              lora_alpha=mc.lora_alpha, lora_targets=tuple(mc.lora_targets), remat=mc.remat)


def param_shardings(plan: Parallel, model_cfg: ModelConfig) -> Any:
  """Shardings of `nnx.state(Decoder(model_cfg))` on the plan's mesh, from shapes alone."""
  return rules_lib.param_shardings(nnx.state(abstract_decoder(model_cfg)), plan.mesh, plan.rules)


def place(plan: Parallel, model: Decoder) -> Decoder:
  """The model with every parameter moved into its sharding (tiny/random models)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, param_shardings(plan, model.cfg)))


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
    return (place(plan, model) if plan is not None else model), byte_tokenizer()
  path = hub.resolve(mc.name)
  shardings = None
  if plan is not None:
    config_json = Path(path) / "config.json"
    if config_json.exists():
      cfg = ModelConfig.from_hf(json.loads(config_json.read_text()), **overrides)
      shardings = param_shardings(plan, cfg)
  model, _ = load_hf_dir(path, shardings=shardings, **overrides)
  return model, load_tokenizer(path)


__all__ = ["model_overrides", "param_shardings", "place", "load_tokenizer",
           "load_model_and_tokenizer"]
