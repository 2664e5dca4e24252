"""Every config file and documented variant loads and validates; `--config.x=y` overrides reach
every field through ml_collections' config flags (as refjax.main defines them); unknown fields,
variants, stages and methods are errors that name the bad value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from refjax import config as config_lib
from refjax.config_json import to_dict
from refjax.method.student import METHODS, parse_methods

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
NOT_CONFIGS = ("__init__",)  # configs/ modules without get_config
# The variants each config file documents; a file not listed here is checked with "" only.
VARIANTS = {
    "smollm": ["", "quick", "all", "paper", "paper,quick", "full", "full,quick"],
    "tiny": [""],
    "llama": ["", "task=gsm8k", "task=ag_news", "size=13b", "pod=v5e-16", "pod=gpu-2x8",
              "size=13b,pod=gpu-2x8", "size=13b,pod=v5e-16,lora=16", "lora=8,task=gsm8k"],
    "qwen": ["", "quick", "task=gsm8k", "task=ag_news", "student=base", "quick,task=gsm8k"],
}
BAD_VARIANTS = {"llama": ["nope", "task=nope", "size=70b", "pod=v3-8", "lora=x",
                          "size=13b,pod=v5e-16"],
                "qwen": ["nope", "task=nope", "student=chat", "quick=maybe"]}


def config_files() -> list[Path]:
  return sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in NOT_CONFIGS)


def all_variants() -> list[tuple[str, str]]:
  return [(p.stem, v) for p in config_files() for v in VARIANTS.get(p.stem, [""])]


def parse(argv: list[str]) -> ml_collections.ConfigDict:
  """Parses argv with a fresh FlagValues holding the config flag exactly as refjax.main has it."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", "configs/smollm.py", "Config file (get_config).",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def config_arg(stem: str, variant: str = "") -> str:
  path = str(CONFIG_DIR / f"{stem}.py")
  return f"--config={path}:{variant}" if variant else f"--config={path}"


def leaves(c: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted path, value) of every field; an empty ConfigDict (mesh.rules) is a field itself."""
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict) and len(v):
      yield from leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_variant_table_names_real_files():
  stems = {p.stem for p in config_files()}
  assert {"smollm", "tiny", "llama", "qwen"} <= stems
  assert set(VARIANTS) <= stems, f"VARIANTS lists files that do not exist: {set(VARIANTS) - stems}"


@pytest.mark.parametrize("stem,variant", all_variants())
def test_every_config_variant_loads_and_validates(stem, variant):
  cfg = parse(["prog", config_arg(stem, variant)])
  config_lib.validate(cfg)
  assert cfg.is_locked  # as main.py asks: a typo in an override cannot add a field
  assert set(parse_methods(cfg.method)) <= set(METHODS)
  # The resolved config is JSON-serialisable (every run writes it first).
  json.dumps(to_dict(cfg))


@pytest.mark.parametrize("stem", [p.stem for p in config_files()])
def test_unknown_variant_raises(stem):
  for bad in ["definitely_not_a_variant"] + BAD_VARIANTS.get(stem, []):
    with pytest.raises((ValueError, flags.Error)) as e:
      parse(["prog", config_arg(stem, bad)])
    assert stem in str(e.value), str(e.value)[-300:]


def test_variants_change_what_they_document():
  from configs import llama, qwen, smollm

  assert llama.get_config("").model.name == "meta-llama/Llama-2-7b-hf"
  assert llama.get_config("size=13b").model.name == "meta-llama/Llama-2-13b-hf"
  c = llama.get_config("task=gsm8k")
  assert c.data.task == "gsm8k"
  assert c.eval.fa_max_new_tokens > llama.get_config().eval.fa_max_new_tokens
  assert c.prompt.template == "alpaca"  # Llama-2 base has no chat template
  assert (c.model.param_dtype, c.model.dtype, c.model.remat) == ("float32", "bfloat16", True)
  for pod, chips in (("v4-32", 16), ("v5e-16", 16), ("gpu-2x8", 16)):
    m = llama.get_config(f"pod={pod}").mesh
    assert m.data * m.fsdp * m.tensor == chips
  # Batches split over the data x fsdp shards of every pod.
  for variant in VARIANTS["llama"]:
    c = llama.get_config(variant)
    shards = c.mesh.data * c.mesh.fsdp
    for size in (c.teacher.train.batch_size, c.finetune.train.batch_size, c.refusal.batch_size,
                 c.filter.batch_size, c.eval.batch_size):
      assert size % shards == 0, (variant, size, shards)
  assert llama.get_config("lora=8").model.lora_rank == 8

  q = qwen.get_config("")
  assert q.model.name == q.teacher.init == "qwen2.5-coder-0.5b-instruct"
  b = qwen.get_config("student=base")
  assert b.model.name != b.teacher.init == "qwen2.5-coder-0.5b-instruct"
  assert qwen.get_config("quick").teacher.train.steps < q.teacher.train.steps
  assert smollm.get_config("quick").teacher.train.steps < smollm.get_config().teacher.train.steps
  # The student's LoRA is the finetune's own: the teacher (model.lora_rank) stays full.
  s, f = smollm.get_config(), smollm.get_config("full")
  assert (s.model.lora_rank, s.finetune.lora_rank, f.finetune.lora_rank) == (0, 8, 0)
  assert f.finetune.optim.lr < s.finetune.optim.lr
  # The default filter is issue 15's levers; `:paper` is the paper's (BeaverTails, cosine).
  p = smollm.get_config("paper")
  assert (s.filter.scorer, s.filter.layer, s.data.alignment_mix.count(",")) == ("logistic", 25, 4)
  assert (p.filter.scorer, p.filter.layer, p.data.alignment_mix) == ("cosine", -1, "")
  assert smollm.get_config("quick").data.n_harmless_mix < s.data.n_harmless_mix
  with pytest.raises(ValueError, match="unknown variant key 'levers'"):
    smollm.get_config("levers")


def test_config_files_load_by_path_from_another_directory(tmp_path):
  """Config files load by path with only refjax importable (their helpers come from the package)."""
  code = ("import sys; from absl import flags; from ml_collections import config_flags\n"
          "for arg in sys.argv[1:]:\n"
          "  fv = flags.FlagValues()\n"
          "  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=['p', arg])\n"
          "  fv(['p', arg]); print(fv.config.model.name)")
  site = tmp_path / "site"  # refjax importable (as when installed), `configs` not
  site.mkdir()
  (site / "refjax").symlink_to(REPO / "refjax")
  out = subprocess.run([sys.executable, "-c", code, config_arg("llama", "task=gsm8k"),
                        config_arg("qwen", "quick")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["meta-llama/Llama-2-7b-hf", "qwen2.5-coder-0.5b-instruct"]


# --- refjax.config_arg.parse_arg --------------------------------------------------------------


def test_parse_arg():
  from refjax.config_arg import parse_arg

  assert parse_arg(None) == {} and parse_arg("") == {}
  assert parse_arg("a=1, b=x,quick") == {"a": "1", "b": "x", "quick": True}
  d = dict(task="sst2", lora=0, lr=1e-5, quick=False)
  assert parse_arg("lora=8,lr=2e-4,quick", d) == dict(task="sst2", lora=8, lr=2e-4, quick=True)
  assert parse_arg("quick=false", d)["quick"] is False
  assert parse_arg("task=gsm8k", d, {"task": ("sst2", "gsm8k")})["task"] == "gsm8k"
  for bad, match in (("nope=1", "unknown variant key 'nope'"), ("lora=x", "lora='x'"),
                     ("task", "needs a value"), ("quick=maybe", "true or false"),
                     ("lora=1,lora=2", "twice"), ("=3", "empty key")):
    with pytest.raises(ValueError, match=match):
      parse_arg(bad, d, where="configs/x.py")
  with pytest.raises(ValueError, match=r"task='ag'; expected one of \['sst2'\]"):
    parse_arg("task=ag", d, {"task": ("sst2",)})


# --- --config.x=y overrides ----------------------------------------------------------------


def _override(value):
  """(text for the flag, the value it must parse to) that differs from `value`."""
  if isinstance(value, bool):
    return str(not value).lower(), (not value)
  if isinstance(value, int):
    return str(value + 1), value + 1
  if isinstance(value, float):
    new = 0.5 if math.isnan(value) else value / 2 + 0.125
    return repr(new), new
  if isinstance(value, str):
    new = value + "_x" if value else "x"
    return new, new
  if isinstance(value, tuple):
    if value and all(isinstance(v, float) for v in value):
      new = tuple(v / 2 for v in value)
    else:
      new = tuple(value) + ("x",)
    return repr(new), new
  if isinstance(value, ml_collections.ConfigDict):
    return "{'embed': 'fsdp'}", {"embed": "fsdp"}
  raise AssertionError(f"no override rule for {type(value).__name__}")


@pytest.mark.parametrize("stem", [p.stem for p in config_files()])
def test_every_field_can_be_overridden(stem):
  base = parse(["prog", config_arg(stem)])
  fields = dict(leaves(base))
  expected, argv = {}, ["prog", config_arg(stem)]
  for path, value in fields.items():
    text, expected[path] = _override(value)
    argv.append(f"--config.{path}={text}")
  cfg = parse(argv)
  wrong = []
  for path, want in expected.items():
    have = cfg
    for part in path.split("."):
      have = have[part]
    if isinstance(have, ml_collections.ConfigDict):
      have = have.to_dict()
    if have != want:
      wrong.append(f"{path}: {have!r} != {want!r}")
  assert not wrong, wrong
  assert len(expected) > 100  # every section is covered


@pytest.mark.parametrize("field", ["nope", "model.nope", "teacher.optim.nope", "mesh.nope"])
def test_unknown_field_is_an_error(field):
  with pytest.raises(Exception, match="nope"):
    parse(["prog", config_arg("tiny"), f"--config.{field}=1"])


def test_cli_rejects_unknown_field_before_any_work(tmp_path):
  workdir = tmp_path / "wd"
  out = subprocess.run([sys.executable, "-m", "refjax.main", config_arg("tiny"),
                        f"--workdir={workdir}", "--config.nope=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "nope" in out.stderr
  assert not workdir.exists()


# --- the entry point and validate -----------------------------------------------------------


def test_run_pipeline_rejects_unknown_stage_and_method(tmp_path):
  from configs import tiny
  from refjax.main import run_pipeline

  with pytest.raises(ValueError, match="nope"):
    run_pipeline(tiny.get_config(), str(tmp_path), stages=["teacher", "nope"])
  cfg = tiny.get_config()
  cfg.method = "reft,nope"
  with pytest.raises(ValueError, match=r"config\.method: 'nope'"):
    run_pipeline(cfg, str(tmp_path))
  assert not (tmp_path / "config.json").exists()  # nothing was written, nothing ran


@pytest.mark.parametrize("path,value,key", [
    ("model.dtype", "float64", "model.dtype"),
    ("prompt.template", "vicuna", "prompt.template"),
    ("data.task", "mnli", "data.task"),
    ("data.harmful_ratio", 1.5, "data.harmful_ratio"),
    ("refusal.layer_range", (0.9, 0.1), "refusal.layer_range"),
    ("teacher.reg_form", "cubic", "teacher.reg_form"),
    ("filter.target_recall", 0.0, "filter.target_recall"),
    ("finetune.kd_direction", "sideways", "finetune.kd_direction"),
    ("finetune.align_ratio", 1.0, "finetune.align_ratio"),
    ("finetune.target_logits", 1.5, "finetune.target_logits"),
    ("finetune.lora_rank", -2, "finetune.lora_rank"),
    ("judge.non_answer_kinds", ("label", "sarcasm"), "judge.non_answer_kinds"),
    ("eval.judge", "vibes", "eval.judge"),
    ("teacher.optim.lr", -1.0, "teacher.optim.lr"),
    ("finetune.train.batch_size", 0, "finetune.train.batch_size"),
    ("stages", ("teacher", "nope"), "stages"),
])
def test_validate_names_the_bad_key(path, value, key):
  from configs import tiny

  cfg = tiny.get_config()
  cfg.update_from_flattened_dict({path: value})
  with pytest.raises(ValueError, match=rf"config\.{key.replace('.', r'.')}\b"):
    config_lib.validate(cfg)
