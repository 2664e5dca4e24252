"""The torch-free GGUF tokenizer equals the one transformers builds through its torch path, on
both shipped models: ids on a few thousand varied strings, special tokens, chat template output."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from refjax.models.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

FIXED = ["", "hello world", "  two leading spaces", "trailing   ", "a\n\n\nb\r\nc", "\t\ttabs",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "<think>x</think>",
         "日本語のテキスト", "emoji 🤖🔥 done", "x" * 300, "İstanbul ǅ ß ﬁ", "numbers 1234567 3.14159",
         "don't you'll I'M", "mixed\u200bzero\u2028width", "   \n   \n", "<|im_start|>"]
ALPHABET = ("abcdefghijklmnop XYZ 0123456789 \n\t  .,;:!?'\"-_()[]{}<|>/\\@#$%^&*+= "
            "éüñçøå ΑβΓ Жж 漢字かな 한국 🤖🔥👍🏽 \u200b\u00a0\u2028")


def _strings(n: int = 3000, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = list(FIXED)
  specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
  while len(out) < n:
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60)))
    if rng.random() < 0.15:  # chat special tokens inside text
      i = rng.randint(0, len(s))
      s = s[:i] + rng.choice(specials) + s[i:]
    out.append(s)
  return out


def _torch_path(model_dir: Path, tmp: Path):
  """transformers' own build from the GGUF alone (a folder holding only a link to it, so no
  tokenizer files of the cache dir take part)."""
  pytest.importorskip("torch")
  from transformers import AutoTokenizer
  gguf = next(model_dir.glob("*.gguf"))
  (tmp / gguf.name).symlink_to(gguf)
  return AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name), gguf


CONVERSATIONS = (
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
)


@pytest.mark.parametrize("fixture", ["smollm2_dir", "qwen_dir"])
def test_gguf_tokenizer_equals_transformers_torch_path(fixture, request, tmp_path):
  model_dir = Path(request.getfixturevalue(fixture))
  reference, gguf = _torch_path(model_dir, tmp_path)
  ours = tokenizer_from_gguf(gguf)
  strings = _strings()
  for special in (False, True):
    mismatched = [s for s in strings if ours(s, add_special_tokens=special)["input_ids"]
                  != reference(s, add_special_tokens=special)["input_ids"]]
    assert not mismatched, f"{len(mismatched)} of {len(strings)} strings differ, e.g. " \
                           f"{mismatched[0]!r}"
  assert ours.special_tokens_map == reference.special_tokens_map
  assert ours.all_special_ids == reference.all_special_ids
  assert len(ours) == len(reference)
  for msgs in CONVERSATIONS:
    for gen in (True, False):
      assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
          reference.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
  ids = ours("héllo 🤖 world")["input_ids"]
  assert ours.decode(ids) == reference.decode(ids) == "héllo 🤖 world"


def test_cached_model_dir_tokenizer_is_the_torch_free_one(smollm2_dir):
  """What the cache holds (written by the fetch) encodes as the GGUF tokenizer does."""
  from transformers import AutoTokenizer
  cached = AutoTokenizer.from_pretrained(str(smollm2_dir))
  ours = tokenizer_from_gguf(next(Path(smollm2_dir).glob("*.gguf")))
  for s in _strings(400, seed=1):
    assert cached(s)["input_ids"] == ours(s)["input_ids"], repr(s)


def test_builds_without_torch(smollm2_dir):
  """The code path itself never imports torch (a stand-in that fails on import proves it)."""
  gguf = next(Path(smollm2_dir).glob("*.gguf"))
  code = ("import sys; sys.modules['torch'] = None\n"
          "from refjax.models.gguf_tokenizer import tokenizer_from_gguf\n"
          f"t = tokenizer_from_gguf({str(gguf)!r})\n"
          "assert t('hi')['input_ids'] and t.chat_template\n"
          "print('ok')")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_non_bpe_gguf_is_refused_by_name(tmp_path):
  import gguf
  path = tmp_path / "spm.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list(["<unk>", "a"])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(GGUFTokenizerError, match=r"spm\.gguf.*'llama'.*byte-level BPE"):
    tokenizer_from_gguf(path)
