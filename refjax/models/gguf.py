"""GGUF files -> an HF-style config dict and fp32 numpy tensors under transformers' names.

`gguf.GGUFReader` reads the file and `gguf.quants.dequantize` expands each tensor, so no torch
is needed. llama.cpp stores the Q/K rows of llama-architecture models permuted (its rotary layout);
we undo that here, as transformers does when it loads a GGUF, so RoPE matches the HF checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from refjax.files import write_json
from refjax.models.config import ModelConfig
from refjax.models.decoder import abstract_decoder
from refjax.models.gguf_tokenizer import tokenizer_from_gguf
from refjax.models.naming import hf_tensor_for

# GGUF `general.architecture` -> transformers `model_type` (the ones our Decoder implements).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Rows permuted by llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute).
_PERMUTED_ARCHS = ("llama",)


class GGUFError(ValueError):
  """A GGUF file that cannot be read: truncated, corrupt, or of an unsupported kind."""


class _CheckedReader(gguf.GGUFReader):
  """GGUFReader that names the tensor whose bytes run past the end of a truncated file."""

  def _build_tensors(self, start_offs: int, fields: list) -> None:
    size = len(self.data)
    for field in fields:
      _, name_data, _, dims, raw_dtype, offset = field.parts
      qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
      if end > size:
        raise GGUFError(f"tensor {bytes(name_data).decode()!r} needs bytes up to {end} but the "
                        f"file has {size}: the file is truncated")
    super()._build_tensors(start_offs, fields)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file, turning the reader's bare numpy errors into one naming the file."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  try:
    return _CheckedReader(path)
  except GGUFError as e:
    raise GGUFError(f"{path}: {e}") from None
  except Exception as e:  # the reader raises IndexError/ValueError/struct errors on bad bytes
    raise GGUFError(f"{path} ({path.stat().st_size} bytes) is not a readable GGUF file; it is "
                    f"truncated or corrupt ({type(e).__name__}: {e})") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  f = reader.get_field(key)
  return default if f is None else f.contents()


def gguf_architecture(reader: gguf.GGUFReader) -> str:
  """The file's `general.architecture`, checked against the ones we can load."""
  arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
  if arch not in GGUF_ARCHITECTURES:
    raise GGUFError(f"{reader.data.filename}: general.architecture={arch!r} is not supported; "
                    f"expected one of {sorted(GGUF_ARCHITECTURES)}")
  return arch


def gguf_config(reader: gguf.GGUFReader) -> dict[str, Any]:
  """The transformers config.json dict the GGUF metadata describes (llama / qwen2)."""
  path = reader.data.filename
  arch = gguf_architecture(reader)
  k = lambda key: key.format(arch=arch)  # noqa: E731

  def need(key):
    value = _field(reader, k(key))
    if value is None:
      raise GGUFError(f"{path}: metadata key {k(key)!r} is missing")
    return value

  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:  # llama3 rope scaling baked into a tensor; factors are lost
    raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope scaling stored as frequency "
                    "factors) is not supported; load the HF checkpoint instead")
  heads = int(need(gguf.Keys.Attention.HEAD_COUNT))
  hidden = int(need(gguf.Keys.LLM.EMBEDDING_LENGTH))
  tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
  vocab = _field(reader, k(gguf.Keys.LLM.VOCAB_SIZE))
  if vocab is None:
    vocab = len(tokens.data) if tokens is not None else None
  if vocab is None:
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
      raise GGUFError(f"{path}: neither {k(gguf.Keys.LLM.VOCAB_SIZE)!r}, a token list, nor "
                      "'token_embd.weight' gives the vocabulary size")
    vocab = int(embd.shape[-1])
  cfg: dict[str, Any] = dict(
      architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
      model_type=GGUF_ARCHITECTURES[arch],
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(need(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
      num_hidden_layers=int(need(gguf.Keys.LLM.BLOCK_COUNT)),
      num_attention_heads=heads,
      num_key_value_heads=int(_field(reader, k(gguf.Keys.Attention.HEAD_COUNT_KV), heads)),
      head_dim=int(_field(reader, k(gguf.Keys.Attention.KEY_LENGTH), hidden // heads)),
      rms_norm_eps=float(need(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
      rope_theta=float(_field(reader, k(gguf.Keys.Rope.FREQ_BASE), 10000.0)),
      max_position_embeddings=int(_field(reader, k(gguf.Keys.LLM.CONTEXT_LENGTH), 4096)),
      tie_word_embeddings="output.weight" not in names,
      hidden_act="silu",
      torch_dtype="float32",
  )
  scaling = _field(reader, k(gguf.Keys.Rope.SCALING_TYPE))
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise GGUFError(f"{path}: {k(gguf.Keys.Rope.SCALING_TYPE)}={scaling!r} is not supported; "
                      "expected 'linear' or none")
    cfg["rope_scaling"] = {"rope_type": "linear",
                           "factor": float(need(gguf.Keys.Rope.SCALING_FACTOR))}
  if arch == "llama":
    cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    cfg["mlp_bias"] = False
  else:
    cfg["use_sliding_window"] = False
  for hf_key, gguf_key in (("bos_token_id", gguf.Keys.Tokenizer.BOS_ID),
                           ("eos_token_id", gguf.Keys.Tokenizer.EOS_ID),
                           ("pad_token_id", gguf.Keys.Tokenizer.PAD_ID)):
    value = _field(reader, gguf_key)
    if value is not None:
      cfg[hf_key] = int(value)
  return cfg


def hf_tensor_names(cfg: dict[str, Any]) -> list[str]:
  """Every tensor name an HF checkpoint of this config holds (from the Decoder's own table)."""
  model_cfg = ModelConfig.from_hf(cfg)
  names = []
  for path, _ in nnx.to_flat_state(nnx.state(abstract_decoder(model_cfg))):
    spec = hf_tensor_for(path)
    if spec is not None:
      names += spec.names(model_cfg.num_layers)
  return names


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (rows [h, 2, d/2] were stored as [h, d/2, 2])."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def iter_gguf_tensors(reader: gguf.GGUFReader, cfg: dict[str, Any] | None = None,
                      *, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, fp32 array in HF layout) for every tensor the config needs."""
  path = reader.data.filename
  arch = gguf_architecture(reader)
  cfg = cfg or gguf_config(reader)
  by_name = {t.name: t for t in reader.tensors}
  name_map = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                      cfg["num_hidden_layers"])
  names = hf_tensor_names(cfg)
  for hf_name in tqdm(names, desc=f"dequantize {Path(path).name}", disable=not progress,
                      unit="tensor"):
    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    t = by_name.get(gguf_name)
    if t is None:
      raise GGUFError(f"{path}: tensor {gguf_name!r} (for {hf_name}) is missing")
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
      w = np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    except Exception as e:
      raise GGUFError(f"{path}: tensor {gguf_name!r} ({t.tensor_type.name}, shape "
                      f"{list(t.shape)}) cannot be dequantized: {e}") from e
    if not np.isfinite(w).all():
      raise GGUFError(f"{path}: tensor {gguf_name!r} holds non-finite values; the file is corrupt")
    if arch in _PERMUTED_ARCHS:
      if ".self_attn.q_proj." in hf_name:
        w = _unpermute(w, cfg["num_attention_heads"])
      elif ".self_attn.k_proj." in hf_name:
        w = _unpermute(w, cfg["num_key_value_heads"])
    yield hf_name, w


def load_gguf(path: str | os.PathLike, *, progress: bool = False
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(HF config dict, {HF tensor name: fp32 array}) for a llama/qwen2 GGUF file."""
  reader = open_gguf(path)
  cfg = gguf_config(reader)
  return cfg, dict(iter_gguf_tensors(reader, cfg, progress=progress))


def load_gguf_tokenizer(path: str | os.PathLike):
  """The tokenizer (with chat template) the GGUF metadata describes, rebuilt without torch."""
  return tokenizer_from_gguf(path)


def gguf_to_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                   tokenizer: bool = True, progress: bool = False) -> Path:
  """Writes config.json, model.safetensors (fp32) and tokenizer files for a GGUF into out_dir.

  out_dir is written in place; callers that need atomicity write into a temp dir and rename.
  """
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  say = (lambda msg: print(f"[refjax] {msg}", file=sys.stderr)) if progress else (lambda _: None)
  say(f"reading {path}")
  cfg, tensors = load_gguf(path, progress=progress)
  say(f"writing {out / 'model.safetensors'} ({sum(t.nbytes for t in tensors.values()) / 2**20:.0f} MiB)")
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  os.chmod(out / "model.safetensors", 0o644)  # safetensors creates its file 0600
  del tensors
  write_json(out / "config.json", cfg, sort_keys=False)
  if tokenizer:
    say("rebuilding the tokenizer from the GGUF metadata")
    tok = load_gguf_tokenizer(path)
    tok.save_pretrained(str(out))
  return out


__all__ = ["GGUFError", "open_gguf", "gguf_config", "hf_tensor_names", "iter_gguf_tensors",
           "load_gguf", "load_gguf_tokenizer", "gguf_to_hf_dir"]
