"""Write a Decoder as an HF model directory that `transformers` loads with the same logits.

config.json comes from `ModelConfig.to_hf_dict`, weights are un-stacked and transposed back to
HF's names and layout (the table in `weights.hf_tensor_for`), LoRA adapters are merged first.
The directory appears atomically: it is written under a temp name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from refjax.files import atomic_dir, write_json
from refjax.models.config import ModelConfig
from refjax.models.decoder import Decoder
from refjax.models.lora import merge_lora
from refjax.models.naming import hf_tensor_for


def to_host(x: Any) -> np.ndarray:
  """A whole array on this host; arrays spread over several processes are all-gathered first."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def hf_state_dict(model: Decoder) -> dict[str, np.ndarray]:
  """{HF tensor name: host array in HF layout} for a Decoder without LoRA adapters."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    spec = hf_tensor_for(path)
    if spec is None:
      raise ValueError(f"{'/'.join(path)} is a LoRA adapter; call merge_lora(model) first")
    arr = to_host(var.get_value())
    parts = list(arr) if spec.stacked else [arr]
    for name, part in zip(spec.names(model.cfg.num_layers), parts):
      out[name] = np.ascontiguousarray(part.T if spec.transpose else part)
  return out


def _token_ids(tokenizer: Any) -> dict[str, int]:
  ids = {}
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    value = getattr(tokenizer, key, None)
    if isinstance(value, int):
      ids[key] = value
  return ids


def export_hf_dir(model: Decoder, cfg: ModelConfig | None, tokenizer: Any,
                  out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                  overwrite: bool = False) -> Path:
  """Writes config.json, model.safetensors (or a sharded index) and tokenizer files to out_dir.

  `cfg` defaults to model.cfg; LoRA adapters are merged into the kernels; `tokenizer` may be None.
  """
  from huggingface_hub import split_state_dict_into_shards_factory
  from safetensors.numpy import save_file

  cfg = cfg or model.cfg
  if cfg.lora_rank:
    model = merge_lora(model)
    cfg = cfg.replace(lora_rank=0)
  tensors = hf_state_dict(model)  # every process takes part in the gathers
  if jax.process_index() != 0:  # one writer on a shared filesystem
    return Path(out_dir)
  hf_cfg = cfg.to_hf_dict()
  if tokenizer is not None:
    hf_cfg.update(_token_ids(tokenizer))
  split = split_state_dict_into_shards_factory(
      tensors, get_storage_size=lambda t: t.nbytes, max_shard_size=max_shard_size,
      filename_pattern="model{suffix}.safetensors")
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    for filename, names in split.filename_to_tensors.items():
      save_file({n: tensors[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
      os.chmod(tmp / filename, 0o644)  # safetensors creates its file 0600
    if split.is_sharded:
      index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
      write_json(tmp / "model.safetensors.index.json", index, sort_keys=False)
    write_json(tmp / "config.json", hf_cfg, sort_keys=False)
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return Path(out_dir)


__all__ = ["export_hf_dir", "hf_state_dict", "to_host"]
