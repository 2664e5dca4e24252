"""Two processes joined by jax.distributed on 127.0.0.1 (launch/local_multiprocess.sh) train 3
steps of the shared loop, each reading only its half of every batch, and match one process."""

from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest

import _subproc  # tests/ is on sys.path (pytest rootdir conftest)
from refjax import config as config_lib
from refjax import parallel

LAUNCH = str(_subproc.REPO / "launch" / "local_multiprocess.sh")
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["loss"] for line in lines]


def test_dry_run_prints_one_command_per_process():
  out = subprocess.run(["bash", LAUNCH, "--dry-run", "-n", "3", "--port", "4321", "--",
                        "-m", "refjax.tools.train_tiny", "--workdir=/tmp/x"],
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    assert f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=3" in line
    assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321" in line and "train_tiny" in line


def test_two_processes_match_one(tmp_path):
  args = ["-m", "refjax.tools.train_tiny", f"--steps={STEPS}", "--checkpoint_every=0"]
  single = _subproc.start(args + [f"--workdir={tmp_path / 'one'}",
                                  f"--params_out={tmp_path / 'one.npz'}"])
  multi = subprocess.run(
      ["bash", LAUNCH, "-n", "2", "--port", str(_free_port()), "--logdir", str(tmp_path / "logs"),
       "--", *args, f"--workdir={tmp_path / 'two'}", f"--params_out={tmp_path / 'two.npz'}"],
      env=_subproc.env(), capture_output=True, text=True, timeout=600)
  _, single_err = single.communicate(timeout=600)
  assert single.returncode == 0, single_err[-3000:]
  logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
  assert multi.returncode == 0, multi.stdout[-3000:] + logs
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(one) == len(two) == STEPS  # process 0 alone writes the metrics
  np.testing.assert_allclose(two, one, rtol=1e-5)
  with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
    for k in a.files:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert (tmp_path / "two" / "checkpoints" / str(STEPS)).is_dir()  # a multi-process orbax save


def test_initialize_validates_and_skips_single_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  cfg = config_lib.distributed_config()
  assert parallel.initialize(cfg) is False  # nothing configured: single process
  cfg.coordinator_address, cfg.num_processes, cfg.process_id = "127.0.0.1:1", 2, 5
  with pytest.raises(ValueError, match="process_id=5"):
    parallel.initialize(cfg)
  cfg.num_processes = 0
  with pytest.raises(ValueError, match="num_processes=0"):
    parallel.initialize(cfg)
  cfg.num_processes, cfg.process_id = 1, 0
  assert parallel.initialize(cfg) is False  # one process needs no coordination service


def test_single_process_reads_every_row():
  mesh = parallel.make_mesh(config_lib.mesh_config())
  sharding = parallel.batch_sharding(mesh, parallel.make_rules(), 2, 8)
  assert parallel.process_batch_rows(sharding, 8) == slice(0, 8)
