"""The random test model: a byte-level tokenizer and a tiny Decoder (`model.name = "tiny"`).

They are real (a working BPE tokenizer with a ChatML template, a randomly initialised model), just
small, so the whole pipeline runs in seconds on a CPU without any download (configs/tiny.py).
"""

from __future__ import annotations

from flax import nnx

from refjax.models.config import ModelConfig
from refjax.models.decoder import Decoder

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer():
  """A byte-level BPE tokenizer without merges (259 ids: 3 specials + 256 bytes), ChatML template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for ch in sorted(alphabet):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token="<|im_start|>")
  fast.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
  fast.chat_template = CHATML
  return fast


def tiny_config(**kw) -> ModelConfig:
  """A 2-layer GQA model over the byte tokenizer's vocabulary."""
  base = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)
  base.update(kw)
  return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Decoder:
  return Decoder(tiny_config(**kw), rngs=nnx.Rngs(seed))


__all__ = ["byte_tokenizer", "tiny_config", "tiny_model", "CHATML", "SPECIALS"]
