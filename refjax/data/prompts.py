"""Renders (prompt, response) pairs into token ids, the last prompt token and a response mask.

Two formats: the model's own chat template (through `transformers.AutoTokenizer`) and the Alpaca
template the peer harness (Booster/Lisa/Vaccine) uses. Which one, the system prompt and the stop
tokens are config (`PromptConfig`), never code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATES = ("chat", "alpaca")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Per-model prompt settings.

  template: "chat" (tokenizer's chat template) or "alpaca" (peer-harness template).
  system_prompt: optional system message for the chat template (None = the template's default).
  stop_tokens: extra strings that end a generation besides the tokenizer's EOS (e.g. "<|im_end|>").
  """

  template: str = "chat"
  system_prompt: str | None = None
  stop_tokens: tuple[str, ...] = ()

  def __post_init__(self):
    if self.template not in TEMPLATES:
      raise ValueError(f"prompt.template={self.template!r}; expected one of {TEMPLATES}")

  @classmethod
  def from_config(cls, c: Any) -> "PromptConfig":
    return cls(template=c.template, system_prompt=c.get("system_prompt") or None,
               stop_tokens=tuple(c.get("stop_tokens") or ()))


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One rendered example: ids, index of the last prompt token, 1 on response tokens."""

  ids: list[int]
  last_prompt_index: int
  response_mask: list[int]
  truncated: bool = False


def user_text(instruction: str, input: str = "") -> str:
  """The user turn for a chat template: the instruction, then the input block if any."""
  return f"{instruction}\n\n{input}" if input else instruction


class PromptFormat:
  """Turns instruction/input/response triplets into model token ids, one format per model."""

  def __init__(self, tokenizer: Any, config: PromptConfig = PromptConfig()):
    self.tokenizer = tokenizer
    self.config = config
    if config.template == "chat" and not getattr(tokenizer, "chat_template", None):
      raise ValueError("prompt.template='chat' but the tokenizer has no chat template; "
                       "use prompt.template='alpaca'")
    self.eos_ids = self._stop_ids()
    pad = tokenizer.pad_token_id
    self.pad_id = int(pad if pad is not None else self.eos_ids[0])

  @classmethod
  def from_config(cls, tokenizer: Any, c: Any) -> "PromptFormat":
    """The format a run's `config.prompt` section describes."""
    return cls(tokenizer, PromptConfig.from_config(c))

  def _stop_ids(self) -> tuple[int, ...]:
    ids = []
    if self.tokenizer.eos_token_id is not None:
      ids.append(int(self.tokenizer.eos_token_id))
    for tok in self.config.stop_tokens:
      tid = self.tokenizer.convert_tokens_to_ids(tok)
      if tid is None or tid == self.tokenizer.unk_token_id:
        raise ValueError(f"prompt.stop_tokens: {tok!r} is not a single token of this tokenizer")
      ids.append(int(tid))
    if not ids:
      raise ValueError("the tokenizer has no EOS token and prompt.stop_tokens is empty")
    return tuple(dict.fromkeys(ids))

  def _messages(self, text: str) -> list[dict[str, str]]:
    msgs = []
    if self.config.system_prompt:
      msgs.append({"role": "system", "content": self.config.system_prompt})
    msgs.append({"role": "user", "content": text})
    return msgs

  def prompt_text(self, instruction: str, input: str = "") -> str:
    """The rendered prompt, ending where the model's answer starts."""
    if self.config.template == "alpaca":
      tpl = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
      return tpl.format(instruction=instruction, input=input)
    return self.tokenizer.apply_chat_template(
        self._messages(user_text(instruction, input)), add_generation_prompt=True, tokenize=False)

  def response_text(self, instruction: str, input: str, response: str) -> str:
    """What follows the prompt in a training example: the answer plus the end-of-turn text."""
    if self.config.template == "alpaca":
      return response + (self.tokenizer.eos_token or "")
    msgs = self._messages(user_text(instruction, input))
    prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = self.tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
      raise ValueError("the chat template renders the prompt differently with and without an "
                       "answer; cannot split prompt and response tokens")
    return full[len(prompt):]

  def _ids(self, text: str, *, first: bool) -> list[int]:
    # Chat templates carry their own BOS; Alpaca text gets the tokenizer's usual specials.
    add = first and self.config.template == "alpaca"
    return list(self.tokenizer(text, add_special_tokens=add)["input_ids"])

  def encode(self, instruction: str, input: str = "", response: str | None = None, *,
             max_len: int | None = None) -> Encoded:
    """Token ids of prompt (+ response); the prompt is cut from the left, the answer from the right."""
    p = self._ids(self.prompt_text(instruction, input), first=True)
    r = [] if response is None else self._ids(self.response_text(instruction, input, response),
                                              first=False)
    truncated = False
    if max_len is not None and len(p) + len(r) > max_len:
      truncated = True
      if len(p) >= max_len:  # keep the end of the prompt: it holds the generation prompt
        p, r = p[len(p) - max_len:], []
      else:
        r = r[:max_len - len(p)]
    return Encoded(p + r, len(p) - 1, [0] * len(p) + [1] * len(r), truncated)


def pad_batch(encoded: Sequence[Encoded], length: int, pad_id: int, *, side: str = "right",
              batch_size: int | None = None) -> dict[str, np.ndarray]:
  """Stacks examples into fixed [B, length] arrays (static shapes under jit).

  Returns tokens, attention_mask, response_mask (1 on answer tokens), last_prompt_index [B] and
  valid [B] (0 for rows added to reach `batch_size`).
  """
  if side not in ("left", "right"):
    raise ValueError(f"side={side!r}; expected 'left' or 'right'")
  b = batch_size or len(encoded)
  if len(encoded) > b:
    raise ValueError(f"{len(encoded)} examples do not fit batch_size={b}")
  out = {
      "tokens": np.full((b, length), pad_id, np.int32),
      "attention_mask": np.zeros((b, length), np.int32),
      "response_mask": np.zeros((b, length), np.int32),
      "last_prompt_index": np.zeros((b,), np.int32),
      "valid": np.zeros((b,), np.int32),
  }
  for i, e in enumerate(encoded):
    n = len(e.ids)
    if n > length:
      raise ValueError(f"example {i} has {n} tokens > length={length}; encode with max_len")
    off = length - n if side == "left" else 0
    out["tokens"][i, off:off + n] = e.ids
    out["attention_mask"][i, off:off + n] = 1
    out["response_mask"][i, off:off + n] = e.response_mask
    out["last_prompt_index"][i] = off + e.last_prompt_index
    out["valid"][i] = 1
  return out


def bucket_length(n: int, buckets: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048, 4096)) -> int:
  """Smallest bucket >= n, so jit sees a few fixed shapes instead of one per prompt length."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")
