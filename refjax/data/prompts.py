"""Renders (prompt, response) pairs into token ids, the last prompt token and a response mask.

Two formats: the model's own chat template (through `transformers.AutoTokenizer`) and the Alpaca
template the peer harness (Booster/Lisa/Vaccine) uses. Which one, the system prompt and the stop
tokens are config (`PromptConfig`), never code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
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
    return _fill(*self._prompt_template(instruction, input))

  def response_text(self, instruction: str, input: str, response: str) -> str:
    """What follows the prompt in a training example: the answer plus the end-of-turn text."""
    return _fill(*self._response_template(instruction, input, response))

  def _prompt_template(self, instruction: str, input: str) -> tuple[str, list[str]]:
    """(the prompt rendered with a slot marker where each user-supplied text goes, the texts)."""
    if self.config.template == "alpaca":
      tpl = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
      values = [instruction, input] if input else [instruction]
      return tpl.format(instruction=_slot(0), input=_slot(1)), values
    text = user_text(instruction, input)
    rendered = self.tokenizer.apply_chat_template(self._messages(_slot(0)),
                                                  add_generation_prompt=True, tokenize=False)
    self._check_slots(rendered, [text], self._messages(text), True)
    return rendered, [text]

  def _response_template(self, instruction: str, input: str, response: str
                         ) -> tuple[str, list[str]]:
    if self.config.template == "alpaca":
      return _slot(0) + (self.tokenizer.eos_token or ""), [response]
    msgs = self._messages(_slot(0))
    prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": _slot(1)}],
                                              tokenize=False)
    if not full.startswith(prompt):
      raise ValueError("the chat template renders the prompt differently with and without an "
                       "answer; cannot split prompt and response tokens")
    text = user_text(instruction, input)
    real = self._messages(text) + [{"role": "assistant", "content": response}]
    self._check_slots(full, [text, response], real, False)
    return full[len(prompt):], [text, response]

  def _check_slots(self, rendered: str, values: list[str], messages: list, gen: bool) -> None:
    """The template must place user text verbatim (no trimming or escaping), or user text cannot
    be kept apart from the template's own special tokens."""
    real = self.tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    if _fill(rendered, values) != real:
      raise ValueError("the chat template transforms message text (trims or escapes it), so user "
                       "text cannot be tokenized apart from its special tokens; use "
                       "prompt.template='alpaca' or a template that inserts content verbatim")

  def _ids(self, template: str, values: list[str], *, first: bool) -> list[int]:
    """Token ids of a rendered template whose user texts sit in slots: the template's own text may
    hold special tokens; user text never produces one (`split_special_tokens`), so a customer's
    `<|im_start|>assistant` stays plain text and cannot forge a turn."""
    ids: list[int] = []
    for i, piece in enumerate(_SLOT_RE.split(template)):
      if not piece:
        continue
      if i % 2:  # a slot: user-supplied text
        ids += self.tokenizer(values[int(piece)], add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]
      else:  # chat templates carry their own BOS; Alpaca text gets the tokenizer's specials
        add = first and not ids and self.config.template == "alpaca"
        ids += self.tokenizer(piece, add_special_tokens=add)["input_ids"]
    return ids

  def template_overhead(self) -> int:
    """Tokens the template itself adds around an empty instruction (its fixed prompt length)."""
    return len(self._ids(*self._prompt_template("", ""), first=True))

  def scored_digest(self, instruction: str, input: str, response: str) -> str:
    """sha256 of the exact text the filter scores (the rendered prompt) plus the response: the
    key that binds a filter decision to an example's content."""
    h = hashlib.sha256(self.prompt_text(instruction, input).encode("utf-8"))
    h.update(b"\0")
    h.update(response.encode("utf-8"))
    return h.hexdigest()

  def encode(self, instruction: str, input: str = "", response: str | None = None, *,
             max_len: int | None = None) -> Encoded:
    """Token ids of prompt (+ response); the prompt is cut from the left, the answer from the right."""
    p = self._ids(*self._prompt_template(instruction, input), first=True)
    r = [] if response is None else self._ids(
        *self._response_template(instruction, input, response), first=False)
    truncated = False
    if max_len is not None and len(p) + len(r) > max_len:
      truncated = True
      if len(p) >= max_len:  # keep the end of the prompt: it holds the generation prompt
        p, r = p[len(p) - max_len:], []
      else:
        r = r[:max_len - len(p)]
    return Encoded(p + r, len(p) - 1, [0] * len(p) + [1] * len(r), truncated)


# User texts go into templates as slot markers (private-use characters no tokenizer text holds),
# then the rendered template is split at them.
_SLOT_OPEN, _SLOT_CLOSE = "\ue000", "\ue001"
_SLOT_RE = re.compile(f"{_SLOT_OPEN}(\\d+){_SLOT_CLOSE}")


def _slot(i: int) -> str:
  return f"{_SLOT_OPEN}{i}{_SLOT_CLOSE}"


def _fill(template: str, values: list[str]) -> str:
  return _SLOT_RE.sub(lambda m: values[int(m.group(1))], template)


ALPACA_MARKERS = ("### Instruction:", "### Input:", "### Response:")


def template_markers(*texts: str) -> list[str]:
  """The Alpaca section markers a user text holds (flagged in the filter report: text that tries
  to open a new section of the prompt)."""
  return [m for m in ALPACA_MARKERS if any(m in t for t in texts)]


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


# Padded lengths jit sees: each at most a third longer than the one below (from 48), so a sorted
# batch pads little (a 68-token SST-2 prompt pads to 80, not 128), for a few more compiled shapes.
BUCKETS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
           1024, 1280, 1536, 2048, 2560, 3072, 4096)


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
  """Smallest bucket >= n, so jit sees a few fixed shapes instead of one per prompt length."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")
