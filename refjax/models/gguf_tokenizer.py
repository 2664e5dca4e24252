"""A GGUF file's tokenizer rebuilt with `tokenizers` alone (no torch): vocabulary, merges, control
tokens, pre-tokenizer and chat template all come from the file's `tokenizer.*` metadata.

transformers' own GGUF path (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) imports torch;
this one gives the same ids (tests/test_gguf_tokenizer.py compares both on both shipped models)
and needs only the `gguf` and `tokenizers` packages the project already depends on.
Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Qwen2, Llama-3) are
supported; anything else raises naming the file and the type.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gguf

# llama.cpp's token types (gguf.TokenType): CONTROL tokens become special added tokens,
# USER_DEFINED ones plain added tokens that are always matched whole.
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)

# `tokenizer.ggml.pre` -> the split regex the merges were learned with (llama.cpp's names). A
# pre-tokenizer not listed here uses GPT-2's byte-level regex (SmolLM2's "smollm" is GPT-2's).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
                        "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                        "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}


class GGUFTokenizerError(ValueError):
  """The file's tokenizer metadata is missing or of a kind this builder does not support."""


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerSpec:
  """The `tokenizer.*` metadata of a GGUF file, as plain Python values."""

  path: str
  model: str  # tokenizer.ggml.model ("gpt2" = byte-level BPE)
  pre: str | None  # tokenizer.ggml.pre
  tokens: list[str]
  token_types: list[int]
  merges: list[str]
  special_ids: dict[str, int]  # bos/eos/unk/pad -> id, those the file names
  chat_template: str | None


def read_tokenizer_spec(path: str | os.PathLike) -> GGUFTokenizerSpec:
  """Reads the tokenizer metadata with `gguf.GGUFReader`; a missing key raises naming the file."""
  path = Path(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises numpy/struct errors on a bad file
    raise GGUFTokenizerError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

  def field(key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()

  tokens = field(gguf.Keys.Tokenizer.LIST)
  if not tokens:
    raise GGUFTokenizerError(f"{path}: no {gguf.Keys.Tokenizer.LIST!r} metadata; the file carries "
                             "no tokenizer")
  special = {}
  for name, key in (("bos", gguf.Keys.Tokenizer.BOS_ID), ("eos", gguf.Keys.Tokenizer.EOS_ID),
                    ("unk", gguf.Keys.Tokenizer.UNK_ID), ("pad", gguf.Keys.Tokenizer.PAD_ID)):
    value = field(key)
    if value is not None:
      special[name] = int(value)
  return GGUFTokenizerSpec(
      path=str(path), model=str(field(gguf.Keys.Tokenizer.MODEL, "")),
      pre=field(gguf.Keys.Tokenizer.PRE), tokens=list(tokens),
      token_types=[int(t) for t in field(gguf.Keys.Tokenizer.TOKEN_TYPE, [])],
      merges=list(field(gguf.Keys.Tokenizer.MERGES, [])), special_ids=special,
      chat_template=field(gguf.Keys.Tokenizer.CHAT_TEMPLATE))


def _byte_spelling() -> dict[int, str]:
  """GPT-2's `bytes_to_unicode`: each byte -> the printable character byte-level vocabularies use."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def build_backend(spec: GGUFTokenizerSpec):
  """The `tokenizers.Tokenizer` the metadata describes: byte-level BPE, control tokens special."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  if spec.model != "gpt2":
    raise GGUFTokenizerError(
        f"{spec.path}: tokenizer.ggml.model={spec.model!r}; only byte-level BPE ('gpt2': SmolLM2, "
        "Qwen2, Llama-3) is rebuilt without torch. Load this model from an HF directory that has "
        "tokenizer.json instead")
  spelling = _byte_spelling()
  alphabet = set(spelling.values())
  vocab = {}
  for i, tok in enumerate(spec.tokens):
    key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
    vocab.setdefault(key, i)
  merges = [tuple(m.split(" ")) for m in spec.merges]
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None,
                                 continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZER_SPLITS.get(spec.pre or "")
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
  types = spec.token_types or [0] * len(spec.tokens)
  # A "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the
  # vocabulary past the model's embedding table (transformers skips these too).
  control = [AddedToken(t, normalized=False, special=True)
             for t, k in zip(spec.tokens, types) if k == _CONTROL and set(t) <= alphabet]
  if control:
    backend.add_special_tokens(control)
  user = [AddedToken(t, normalized=False, special=False)
          for t, k in zip(spec.tokens, types) if k == _USER_DEFINED and t in vocab]
  if user:
    backend.add_tokens(user)
  return backend


def tokenizer_from_gguf(path: str | os.PathLike):
  """A `PreTrainedTokenizerFast` with the file's special tokens and chat template (no torch)."""
  from transformers import PreTrainedTokenizerFast

  spec = read_tokenizer_spec(path)
  names = {f"{k}_token": spec.tokens[i] for k, i in spec.special_ids.items()
           if 0 <= i < len(spec.tokens)}
  tok = PreTrainedTokenizerFast(tokenizer_object=build_backend(spec), **names)
  if spec.chat_template:
    tok.chat_template = spec.chat_template
  return tok


__all__ = ["GGUFTokenizerError", "GGUFTokenizerSpec", "read_tokenizer_spec", "build_backend",
           "tokenizer_from_gguf", "PRE_TOKENIZER_SPLITS"]
