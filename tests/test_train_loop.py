"""The shared loop survives being killed: SIGKILL + resume and SIGTERM + resume both end with the
parameters of an uninterrupted run (bit for bit); a NaN loss stops the run naming the step and
keeps the last good checkpoint; metrics land in JSONL and TensorBoard.

Runs go through `python -m refjax.tools.train_tiny` in subprocesses (signals need a process to
kill); they share a persistent compilation cache, so only the first run compiles.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import _subproc  # tests/ is on sys.path (pytest rootdir conftest)
from refjax.training.data import ArrayIterator
from refjax.training.loop import StepHook

STEPS = 8
TINY = ["-m", "refjax.tools.train_tiny", f"--steps={STEPS}", "--checkpoint_every=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _subproc.run(TINY + [f"--workdir={workdir}", f"--params_out={workdir}/params.npz",
                              "--eval_every=4"], cache_dir=cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir


def _params(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _wait_for(predicate, proc, timeout=300.0):
  deadline = time.time() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stderr.read()[-5000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.05)


def _assert_same_params(a: Path, b: Path):
  pa, pb = _params(a), _params(b)
  assert sorted(pa) == sorted(pb) and pa
  for k in pa:
    assert np.array_equal(pa[k], pb[k]), f"{k} differs after resuming"


def test_metrics_jsonl_tensorboard_and_config(uninterrupted):
  records = _records(uninterrupted)
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for r in train:
    assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and "lr" in r and "grad_norm" in r
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
  config = json.loads((uninterrupted / "config.json").read_text())
  assert config["train"]["steps"] == STEPS and config["optim"]["schedule"] == "cosine"
  ckpts = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())
  assert ckpts == [4, 6, 8]  # every 2 steps, max_to_keep=3


def test_sigkill_then_resume_equals_uninterrupted(uninterrupted, tmp_path, cache):
  args = TINY + [f"--workdir={tmp_path}", f"--params_out={tmp_path}/params.npz", "--eval_every=4"]
  proc = _subproc.start(args + ["--sleep=0.4"], cache_dir=cache)
  _wait_for(lambda: (tmp_path / "checkpoints" / "4").is_dir(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "params.npz").exists()
  resumed = _subproc.run(args, cache_dir=cache)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  summary = json.loads(_subproc.last_json_line(resumed.stdout))
  assert summary["resumed_from"] is not None and 4 <= summary["resumed_from"] < STEPS
  _assert_same_params(uninterrupted / "params.npz", tmp_path / "params.npz")
  # the killed run's records past the checkpoint were dropped: each step logged once
  assert [r["step"] for r in _records(tmp_path) if "loss" in r] == list(range(1, STEPS + 1))
  same = {r["step"]: r["loss"] for r in _records(uninterrupted) if "loss" in r}
  assert all(r["loss"] == same[r["step"]] for r in _records(tmp_path) if "loss" in r)


def test_sigterm_saves_exits_cleanly_and_resumes(uninterrupted, tmp_path, cache):
  args = TINY[:-1] + ["--checkpoint_every=0", f"--workdir={tmp_path}",
                      f"--params_out={tmp_path}/params.npz"]
  proc = _subproc.start(args + ["--sleep=0.4"], cache_dir=cache)
  metrics = tmp_path / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-5000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
  assert "SIGTERM" in err
  resumed = _subproc.run(args, cache_dir=cache)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  assert json.loads(_subproc.last_json_line(resumed.stdout))["resumed_from"] == saved[0]
  _assert_same_params(uninterrupted / "params.npz", tmp_path / "params.npz")


@pytest.mark.parametrize("flag", ["--nan_at_step=5", "--nan_grad_at_step=5"])
def test_non_finite_update_is_never_applied_and_the_checkpoint_resumes(flag, tmp_path, cache):
  """A NaN loss, or a finite loss with NaN gradients: the update from step 4 is dropped inside the
  step, nothing is saved past step 4, the error names the step, and the newest checkpoint holds
  finite parameters that a rerun resumes from to the end."""
  proc = _subproc.run(TINY + [f"--workdir={tmp_path}", flag], cache_dir=cache)
  assert proc.returncode != 0
  assert "NonFiniteLoss" in proc.stderr and "step 5 (the update from step 4)" in proc.stderr, \
      proc.stderr[-3000:]
  assert "was not applied" in proc.stderr and "step 4 in" in proc.stderr
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [2, 4]
  assert max(r["step"] for r in _records(tmp_path)) == 4
  resumed = _subproc.run(TINY + [f"--workdir={tmp_path}", f"--params_out={tmp_path}/p.npz"],
                         cache_dir=cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  out = json.loads(_subproc.last_json_line(resumed.stdout))
  assert out["resumed_from"] == 4 and out["step"] == STEPS and np.isfinite(out["loss"])
  assert all(np.isfinite(v).all() for v in _params(tmp_path / "p.npz").values())


def test_array_iterator_is_deterministic_and_resumable():
  arrays = {"x": np.arange(20), "y": np.arange(20) * 10}
  a = ArrayIterator(arrays, 4, seed=3)
  first = [next(a)["x"] for _ in range(12)]  # 5 batches per epoch: crosses two epochs
  b = ArrayIterator(arrays, 4, seed=3)
  b.set_state(a.get_state() | {"position": 7})
  assert np.array_equal(next(b)["x"], first[7])
  for epoch in range(2):  # each epoch is a permutation: no example twice
    seen = np.concatenate(first[epoch * 5:(epoch + 1) * 5])
    assert sorted(seen) == list(range(20))
  assert not np.array_equal(first[0], first[5])  # a new order each epoch
  half = ArrayIterator(arrays, 4, seed=3, rows=slice(2, 4))  # a process's rows of each batch
  assert np.array_equal(next(half)["y"], first[0][2:4] * 10)
  with pytest.raises(ValueError, match="seed"):
    b.set_state({"position": 0, "seed": 4})
  with pytest.raises(ValueError, match="different lengths"):
    ArrayIterator({"x": np.arange(3), "y": np.arange(4)}, 2)


def test_step_hook_validates_every():
  with pytest.raises(ValueError, match="every=0"):
    StepHook(0, lambda *a: None, "bad")
