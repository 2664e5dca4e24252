"""Runs Python in a fresh process (own XLA_FLAGS / jax.distributed) for the training-core tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# LLVM -O0 roughly halves XLA:CPU compile time; these tests check partitioning, checkpoints and
# resumption (each run compares with runs under the same flags), not code generation.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def env(cache_dir: Path | None = None, devices: int = 1, **extra: str) -> dict[str, str]:
  """The child's environment: this repo importable, `devices` fake CPU devices, a shared
  persistent compilation cache so repeated runs of one program compile once, and PYTHON (what the
  launch scripts run) the interpreter running the tests, not whichever `python` PATH finds."""
  e = dict(os.environ)
  e.setdefault("PYTHON", sys.executable)
  e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  flags = [FAST_COMPILE] + ([f"--xla_force_host_platform_device_count={devices}"]
                            if devices > 1 else [])
  e["XLA_FLAGS"] = " ".join(flags)
  e["JAX_PLATFORMS"] = "cpu"
  if cache_dir is not None:
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  e.update(extra)
  return e


def run(args: list[str], *, timeout: float = 600, **env_kw) -> subprocess.CompletedProcess:
  """`python args...` to completion, output captured."""
  return subprocess.run([sys.executable, *args], env=env(**env_kw), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def start(args: list[str], *, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          **env_kw) -> subprocess.Popen:
  """`python args...` in the background, output captured (to pipes the caller must read, or to
  the files it passes: a full pipe nobody reads blocks the child)."""
  return subprocess.Popen([sys.executable, *args], env=env(**env_kw), cwd=REPO,
                          stdout=stdout, stderr=stderr, text=True)


def last_json_line(stdout: str) -> str:
  lines = [line for line in stdout.splitlines() if line.startswith(("{", "["))]
  if not lines:
    raise AssertionError(f"no JSON line in the child's output:\n{stdout[-3000:]}")
  return lines[-1]
