"""Shared fixtures: the shared data folder (tests that read it skip when it is absent)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
  """`slow` tests run in CI (CI=true) or with REFJAX_SLOW=1 or an explicit -m; else they skip,
  which keeps the default local run under 20 minutes on 2 cores."""
  if os.environ.get("CI", "").lower() == "true" or os.environ.get("REFJAX_SLOW") == "1" or (
      config.getoption("-m")):
    return
  skip = pytest.mark.skip(reason="slow: runs in CI, or set REFJAX_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data_dir():
  """The data folder ($REFJAX_DATA or <repo>/../shared/data); tests that need it skip without it."""
  from refjax.data import paths

  try:
    return paths.data_dir()
  except FileNotFoundError as e:
    pytest.skip(f"shared data not available: {e}")


# --- The real models shipped in PyPI packages (refjax.models.shipped) --------------------------------
# Tests that need them skip, with the reason, when the cache can be neither found nor produced.

REAL_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence what a hash function does.",
    "List three prime numbers greater than ten.",
)


def _shipped_model_dir(name: str):
  """The cached HF dir of a registry model; fetches it (wheels from $REFJAX_WHEELS or PyPI)."""
  import os

  from refjax.models import shipped as assets

  if assets.is_cached(name):
    return assets.model_dir(name)
  quick_pip = {"PIP_RETRIES": "1", "PIP_TIMEOUT": "10"}  # fail fast without network
  saved = {k: os.environ.get(k) for k in quick_pip}
  os.environ.update(quick_pip)
  try:
    return assets.fetch(name)
  except Exception as e:  # noqa: BLE001 - any failure means "cannot produce it here"
    pytest.skip(f"{name} is not cached in {assets.model_dir(name)} and fetching it failed (no "
                f"wheels in $REFJAX_WHEELS and no PyPI access?): {type(e).__name__}: "
                f"{str(e)[:300]}")
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _gguf_reference(model_dir):
  """transformers' own fp32 load of the cached source GGUF: the parity reference."""
  from pathlib import Path

  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM

  gguf = next(Path(model_dir).glob("*.gguf"))
  return AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf.name,
                                              dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_prompts():
  """Four short harmless user requests (no chat template applied)."""
  return list(REAL_PROMPTS)


@pytest.fixture(scope="session")
def smollm2_dir():
  return _shipped_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir():
  return _shipped_model_dir("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf_reference(smollm2_dir):
  return _gguf_reference(smollm2_dir)


@pytest.fixture(scope="session")
def qwen_gguf_reference(qwen_dir):
  return _gguf_reference(qwen_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
  """(Decoder, ModelConfig) of SmolLM2-135M-Instruct in fp32 from the cache."""
  from refjax.models.weights import load_hf_dir

  return load_hf_dir(smollm2_dir)


# --- One tiny end-to-end run shared by the pipeline, notebook and report tests ---------------


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, shared_data_dir):
  """A workdir holding every artifact of `configs/tiny.py` run through all stages (once)."""
  from configs import tiny
  from refjax.main import run_pipeline

  workdir = tmp_path_factory.mktemp("tiny_run")
  cfg = tiny.get_config()
  cfg.judge.cache = str(tmp_path_factory.mktemp("judges"))  # never the user's cache
  summary = run_pipeline(cfg, str(workdir))
  return workdir, cfg, summary
