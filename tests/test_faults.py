"""A workdir is exactly what it says: the probes of a demanding user and an attacker, as tests.

Stale results are never reused (fingerprints), filter decisions are bound to the text they scored,
one run writes a workdir at a time, corrupt artifacts are redone, and every bad input is told in
one line naming its file, line, key or path. The tiny pipeline (configs/tiny.py) runs on a data
root of symbolic links to ../shared/data, with the SST-2 training file a private copy the tests
may edit (so ids are also shown to survive links).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import _subproc
from refjax.data import paths
from refjax.data.records import DataError
from refjax.data.sources import load_source
from refjax.files import read_json, read_jsonl
from refjax.main import run_pipeline
from refjax.stages.lock import WorkdirBusy, workdir_lock
from refjax.stages.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
SST2_TRAIN = "sst2/train_first10k.jsonl"


def linked_data_root(dst: Path) -> Path:
  """A data root of symbolic links to the real data, with the SST-2 train file a real copy."""
  src = paths.data_dir()
  dst.mkdir(parents=True)
  for entry in src.iterdir():
    if entry.name != "sst2":
      (dst / entry.name).symlink_to(entry)
  (dst / "sst2").mkdir()
  for f in (src / "sst2").iterdir():
    if f.name == Path(SST2_TRAIN).name:
      shutil.copyfile(f, dst / SST2_TRAIN)
    else:
      (dst / "sst2" / f.name).symlink_to(f)
  return dst


def tiny_cfg(root: Path, **overrides):
  from configs import tiny
  cfg = tiny.get_config()
  cfg.data.root = str(root)
  for key, value in overrides.items():
    cfg.update_from_flattened_dict({key: value})
  return cfg


def mtimes(wd: Path) -> dict[str, int]:
  return {str(p.relative_to(wd)): p.stat().st_mtime_ns for p in wd.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_workdir):
  """A finished tiny run on a linked data root: (workdir, data root, config). It is the shared
  tiny run's workdir copied: fingerprints digest content, not paths, so nothing reruns."""
  root = linked_data_root(tmp_path_factory.mktemp("base") / "data")
  wd = tmp_path_factory.mktemp("base_wd") / "wd"
  shutil.copytree(tiny_workdir[0], wd, symlinks=True)
  cfg = tiny_cfg(root)
  before = mtimes(wd)
  run_pipeline(cfg, wd)
  same = lambda d: {k: v for k, v in d.items() if k not in ("config.json", ".lock")}  # noqa: E731
  assert same(mtimes(wd)) == same(before)  # the data root moved: nothing reran
  return wd, root, cfg


@pytest.fixture
def copy(base, tmp_path):
  """A private copy of the finished run and of its data root (tests may change both)."""
  wd, root, _ = base
  new_root = linked_data_root(tmp_path / "data")
  shutil.copyfile(root / SST2_TRAIN, new_root / SST2_TRAIN)
  new_wd = tmp_path / "wd"
  shutil.copytree(wd, new_wd, symlinks=True)
  cfg = tiny_cfg(new_root)
  return new_wd, new_root, cfg


def test_ids_do_not_change_when_data_files_are_links(base):
  _, root, _ = base
  real = [e.id for e in load_source("sst2_train", limit=20)]
  try:
    paths.set_data_root(root)
    linked = [e.id for e in load_source("sst2_train", limit=20)]
    via_link = [e.id for e in load_source("harmless_val", limit=5)]  # a linked folder
  finally:
    paths.set_data_root(None)
  assert linked == real and real[0].startswith("sst2/train_first10k:")
  assert via_link[0].startswith("refusal_direction/harmless_val:")


def test_rerun_with_nothing_changed_writes_nothing(base):
  """A finished workdir re-reported: every stage current, not one file touched (so a read-only
  workdir can be re-reported too)."""
  wd, _, cfg = base
  before = mtimes(wd)
  out = run_pipeline(cfg, wd)
  assert set(out) == set(cfg.stages) and "table" in out["evaluate"]
  assert mtimes(wd) == before


def test_swapped_user_example_is_refiltered_never_trained_under_an_old_decision(copy, caplog):
  """The attack: a kept benign example replaced, under the same id, by a harmful prompt and answer.
  The old decision does not apply (bound to the text's hash); the rerun refilters it."""
  wd, root, cfg = copy
  rows = read_jsonl(Workdir(wd).filter_report)
  kept = next(r for r in rows if r["kept"] and r["provenance"] == "benign")
  idx = kept["id"].split(":")[1]
  harmful = json.loads((paths.data_dir() / "beavertails_refusals_spard/harmful_qa.jsonl")
                       .read_text().splitlines()[0])  # used, never printed
  lines = (root / SST2_TRAIN).read_text().splitlines()
  pos = next(i for i, line in enumerate(lines) if str(json.loads(line)["idx"]) == idx)
  row = json.loads(lines[pos])
  row.update(instruction=harmful["prompt"], input="", response=harmful["response"])
  lines[pos] = json.dumps(row, ensure_ascii=True)
  (root / SST2_TRAIN).write_text("\n".join(lines) + "\n")

  # The finetune stage alone, on the old decisions (the teacher's and the judge's): refused before
  # any work. (The judge reads the task's label set from the same file, so it is stale too.)
  with pytest.raises(FileNotFoundError, match=r"(filter|screen)_report.jsonl, which is stale .*"
                                              r"run the `(filter|screen)` stage first"):
    run_pipeline(cfg, wd, stages=["finetune"])
  # keep_weights itself refuses a row whose text has no decision.
  from refjax.stages import finetune
  from refjax.stages.context import Run
  r = Run(cfg, Workdir(wd))
  paths.set_data_root(root)
  try:
    _, _, fmt = r.load()
    with pytest.raises(ValueError, match=rf"no decision for the current text of 1 user examples "
                                         rf"\(e.g. id '{kept['id']}'\)"):
      finetune.keep_weights(r, r.sets.user(), fmt)
  finally:
    paths.set_data_root(None)

  with caplog.at_level("INFO"):
    run_pipeline(cfg, wd, stages=["judge", "filter", "screen", "distill", "finetune"])
  assert "filter: inputs changed: data.user" in caplog.text
  assert "screen: inputs changed: data.user" in caplog.text
  # the user rows decide how many alignment examples the finetune draws, so the targets follow
  assert "distill: inputs changed: data.user" in caplog.text
  new = {r["id"]: r for r in read_jsonl(Workdir(wd).filter_report)}[kept["id"]]
  assert new["text_sha256"] != kept["text_sha256"] and new["score"] != kept["score"]
  assert read_json(Workdir(wd).marker("teacher"))["fingerprint"]  # the teacher was kept


def test_changed_config_reruns_what_it_feeds_and_config_json_tells_the_truth(copy, caplog):
  wd, _, cfg = copy
  before = mtimes(wd)
  cfg.filter.target_recall = 0.5
  with caplog.at_level("INFO"):
    run_pipeline(cfg, wd)
  after = mtimes(wd)
  assert after["stages/teacher.done.json"] == before["stages/teacher.done.json"]
  assert after["stages/refusal.done.json"] == before["stages/refusal.done.json"]
  assert after["filter/filter_summary.json"] != before["filter/filter_summary.json"]
  assert "filter: inputs changed: config.filter" in caplog.text
  summary = read_json(Workdir(wd).filter_summary)
  assert summary["calibration"]["target_recall"] == 0.5
  assert read_json(Workdir(wd).config_json)["filter"]["target_recall"] == 0.5
  assert after["methods/sft/model/model.safetensors"] == before["methods/sft/model/model.safetensors"]
  assert after["methods/reft/model/model.safetensors"] != before[
      "methods/reft/model/model.safetensors"]  # reft trains on the filter's decisions


def test_force_all_reruns_everything_with_the_new_learning_rate(copy):
  wd, _, cfg = copy
  old = {m: (wd / f"methods/{m}/model/model.safetensors").read_bytes() for m in ("reft", "sft")}
  before = mtimes(wd)
  cfg.finetune.optim.lr = cfg.finetune.optim.lr / 10
  run_pipeline(cfg, wd, force=["all"])
  after = mtimes(wd)
  for stage in ("teacher", "refusal", "filter", "finetune", "evaluate"):
    assert after[f"stages/{stage}.done.json"] != before[f"stages/{stage}.done.json"], stage
  for m in ("reft", "sft"):
    assert (wd / f"methods/{m}/model/model.safetensors").read_bytes() != old[m], m
  assert read_json(Workdir(wd).config_json)["finetune"]["optim"]["lr"] == cfg.finetune.optim.lr


def test_corrupt_artifacts_are_named_and_redone(copy, caplog):
  """A torn marker, a torn eval.json, a deleted model: each named, each unit redone."""
  wd, _, cfg = copy
  marker = Workdir(wd).marker("evaluate", "sft")
  marker.write_text(marker.read_text()[:20])  # a torn write
  evaluation = Workdir(wd).method_eval("reft")
  evaluation.write_text(evaluation.read_text()[:50])
  with caplog.at_level("WARNING"):
    out = run_pipeline(cfg, wd, stages=["evaluate"])
  assert str(marker) in caplog.text and "corrupt JSON" in caplog.text
  assert str(evaluation) in caplog.text
  assert read_json(marker)["fingerprint"] and "sft" in out["evaluate"]["methods"]
  assert read_json(evaluation)["harmful_score"]
  shutil.rmtree(Workdir(wd).method_model("sft"))
  with caplog.at_level("WARNING"):
    run_pipeline(cfg, wd)
  assert f"{Workdir(wd).method_model('sft') / 'config.json'} is missing" in caplog.text
  assert (Workdir(wd).method_model("sft") / "model.safetensors").exists()


def test_a_second_run_on_a_workdir_exits_at_once_naming_the_holder(base, tmp_path):
  wd = tmp_path / "wd"
  with workdir_lock(wd):
    with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()} on host "):
      with workdir_lock(wd):
        pass
    r = _subproc.run(["-m", "refjax.main", "--config=configs/tiny.py", f"--workdir={wd}",
                      f"--config.data.root={base[1]}", "--stages=generate"], timeout=300)
  assert r.returncode == 1, r.stderr[-2000:]
  assert f"workdir {wd} is in use by pid {os.getpid()} on host" in r.stderr
  assert not (wd / "generations.json").exists() and not (wd / "config.json").exists()


# --- bad input, told in one line ---------------------------------------------------------------


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return _subproc.run(["-m", "refjax.main", "--config=configs/tiny.py", *args], timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config.finetune.kd_wieght=1"], "refjax: error: --config.finetune.kd_wieght: "
     "config.finetune.kd_wieght is not a field of configs/tiny.py; did you mean "
     "config.finetune.kd_weight?"),
    (["--config=configs/nope.py"], "refjax: error: --config: config file configs/nope.py does not "
     "exist"),
    (["--config.model.name=smollm"], "refjax: error: config.model.name: 'smollm' is neither an "
     "existing path"),
    (["--config.method=,"], "refjax: error: config.method: ',' names no method"),
    (["--config.filter.threshold=2.0"], "refjax: error: config.filter.threshold: 2.0; expected nan "
     "(calibrate) or a cosine in [-1, 1]"),
])
def test_cli_errors_are_one_line_naming_the_key(args, message, tmp_path):
  r = cli(f"--workdir={tmp_path / 'wd'}", *args)
  assert r.returncode != 0
  assert message in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "wd").exists()  # nothing was written


def test_non_utf8_data_names_file_and_line(tmp_path):
  root = linked_data_root(tmp_path / "data")
  lines = (root / SST2_TRAIN).read_bytes().split(b"\n")
  lines[6] = lines[6].replace(b"a", b"\xff", 1)
  (root / SST2_TRAIN).write_bytes(b"\n".join(lines))
  paths.set_data_root(root)
  try:
    with pytest.raises(DataError, match=rf"{SST2_TRAIN}, line 7: not UTF-8"):
      load_source("sst2_train", limit=20)
  finally:
    paths.set_data_root(None)


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_to_identical_artifacts(base, tmp_path):
  """One tiny pipeline killed (SIGKILL) ten times at random moments, across its stages, and
  restarted each time, ends with exactly the models, decisions and results of an uninterrupted run
  under the same flags; its metric logs and refusal-update history hold every step once."""
  _, root, _ = base
  cache = tmp_path / "jax_cache"
  cmd = ["-m", "refjax.main", "--config=configs/tiny.py", f"--config.data.root={root}"]
  ref = _subproc.run(cmd + [f"--workdir={tmp_path / 'ref'}"], cache_dir=cache, timeout=1200)
  assert ref.returncode == 0, ref.stderr[-3000:]
  wd, rng, kills = tmp_path / "killed", np.random.default_rng(0), []
  n_units = len(markers(tmp_path / "ref"))
  for i in range(10):
    # Kill i waits until the run has finished about i/10 of its units, then a random moment more:
    # the kills spread over the stages however fast this machine is.
    log = (tmp_path / f"kill{i}.log").open("w")  # a file, not a pipe nobody reads (it would block)
    proc = _subproc.start(cmd + [f"--workdir={wd}"], cache_dir=cache, stdout=log, stderr=log)
    target = i * n_units // 10
    while proc.poll() is None and len(markers(wd)) < target:
      time.sleep(0.2)
    time.sleep(float(rng.uniform(1, 6)))
    if proc.poll() is not None:
      log.close()
      break  # it finished before this kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    kills.append(markers(wd))
  done = _subproc.run(cmd + [f"--workdir={wd}"], cache_dir=cache, timeout=1200)
  assert done.returncode == 0, done.stderr[-3000:]
  assert len(kills) >= 5, kills  # most kills landed mid-run
  assert len({len(k) for k in kills}) >= 3, kills  # and in several different stages
  assert_same_run(tmp_path / "ref", wd)


def markers(wd: Path) -> list[str]:
  """The finished units of a workdir (stage and per-method done markers)."""
  stages = wd / "stages"
  return sorted(str(p.relative_to(stages)) for p in stages.rglob("*.done.json")) \
      if stages.exists() else []


def assert_same_run(a: Path, b: Path) -> None:
  for rel in ("teacher/model/model.safetensors", "methods/reft/model/model.safetensors",
              "methods/sft/model/model.safetensors", "filter/filter_report.jsonl",
              "refusal/refusal_feature.npz", "teacher/refusal_updates.json"):
    assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
  ea, eb = read_json(a / "eval.json"), read_json(b / "eval.json")
  for m in ea["methods"]:
    assert ea["methods"][m]["harmful_score"]["harmful_score"] == \
        eb["methods"][m]["harmful_score"]["harmful_score"]
  for stage_dir in ("teacher", "methods/reft", "methods/sft"):
    steps = [r["step"] for r in read_jsonl(b / stage_dir / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)), stage_dir  # every step once, in order
  updates = [u["step"] for u in read_json(b / "teacher/refusal_updates.json")]
  assert updates == [u["step"] for u in read_json(a / "teacher/refusal_updates.json")]


def test_student_lora_retrains_only_the_finetunes_and_only_adapters(copy):
  """finetune.lora_rank gives the student LoRA adapters while the teacher stays fully finetuned:
  only the finetunes rerun, and the exported student differs from the base model only by a
  low-rank update of the adapted projections (the full finetune before it moved every weight)."""
  from safetensors.numpy import load_file

  from refjax.stages.context import Run

  wd, _, cfg = copy
  before = mtimes(wd)
  full = load_file(str(wd / "methods/sft/model/model.safetensors"))
  cfg.finetune.lora_rank = 2
  run_pipeline(cfg, wd, stages=["teacher", "refusal", "filter", "judge", "screen", "distill",
                                "finetune"])
  after = mtimes(wd)
  for stage in ("teacher", "refusal", "filter", "distill"):
    assert after[f"stages/{stage}.done.json"] == before[f"stages/{stage}.done.json"], stage
  assert read_json(wd / "methods/sft/finetune.json")["lora_rank"] == 2
  run = Run(cfg, Workdir(wd / "base_export"))
  model, tok, _ = run.load()
  base = load_file(str(run.export(model, tok, wd / "base_export/model") / "model.safetensors"))
  lora = load_file(str(wd / "methods/sft/model/model.safetensors"))
  embed = next(k for k in base if "embed_tokens" in k)
  assert not np.array_equal(full[embed], base[embed])  # the full finetune moved it
  assert np.array_equal(lora[embed], base[embed])  # LoRA did not
  q = next(k for k in base if "q_proj.weight" in k)
  delta = lora[q].astype(np.float64) - base[q]
  assert np.abs(delta).max() > 0
  assert np.linalg.matrix_rank(delta, tol=1e-6 * np.abs(delta).max()) <= 2
