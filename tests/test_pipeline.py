"""The whole pipeline through `run_pipeline` / the CLI on the tiny model: artifacts, resumption,
errors, and that teacher preparation moves the refusal feature the way the method intends."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refjax.main import run_pipeline

STAGE_FILES = {
    "teacher": ["refusal_base/refusal_feature.npz", "refusal_base/refusal_feature.json",
                "teacher/model/config.json", "teacher/model/model.safetensors",
                "teacher/metrics.jsonl", "teacher/refusal_updates.json"],
    "refusal": ["refusal/refusal_feature.npz", "refusal/auroc.json", "refusal/cosine_sets.npz"],
    "filter": ["filter/filter_report.jsonl", "filter/filter_summary.json"],
    "distill": ["distill/targets.npz", "distill/summary.json"],
    "finetune": ["methods/reft/model/model.safetensors", "methods/sft/model/model.safetensors",
                 "methods/reft/finetune.json"],
    "evaluate": ["eval.json", "report.md", "hs_fa.png", "methods/base/eval.json"],
}


def test_every_artifact_is_written(tiny_workdir):
  wd, cfg, summary = tiny_workdir
  assert list(summary) == list(cfg.stages)
  for stage, files in STAGE_FILES.items():
    for f in files:
      assert (wd / f).exists(), f"stage {stage} did not write {f}"
    assert (wd / "stages" / f"{stage}.done.json").exists()
  resolved = json.loads((wd / "config.json").read_text())
  assert resolved["method"] == cfg.method and resolved["teacher"]["reg_weight"] == 2.0
  assert not (wd / "teacher" / "checkpoints").exists()  # finished stages drop their checkpoints


def test_filter_records_every_user_example_once(tiny_workdir):
  wd, cfg, _ = tiny_workdir
  rows = [json.loads(l) for l in (wd / "filter/filter_report.jsonl").read_text().splitlines()]
  assert len(rows) == cfg.data.user_n == len({r["id"] for r in rows})
  assert sum(r["provenance"] == "harmful" for r in rows) == round(
      cfg.data.user_n * cfg.data.harmful_ratio)
  summary = json.loads((wd / "filter/filter_summary.json").read_text())
  assert summary["n_kept"] + summary["n_dropped"] == cfg.data.user_n
  assert summary["n_kept"] == sum(r["kept"] for r in rows)
  reft = json.loads((wd / "methods/reft/finetune.json").read_text())
  sft = json.loads((wd / "methods/sft/finetune.json").read_text())
  assert reft["user_examples_kept"] == summary["n_kept"]  # reft trains on the kept examples only
  assert sft["user_examples_kept"] == cfg.data.user_n


def test_teacher_preparation_sharpens_its_refusal_feature(tiny_workdir):
  wd, _, _ = tiny_workdir
  updates = json.loads((wd / "teacher/refusal_updates.json").read_text())
  assert len(updates) >= 2 and updates[0]["step"] == 0
  gap = [u["probe_cos_harmful"] - u["probe_cos_harmless"] for u in updates]
  assert gap[-1] > gap[0] + 0.1  # the regulariser pulls the classes apart along R_l
  auroc = json.loads((wd / "refusal/auroc.json").read_text())
  assert auroc["auroc_teacher"] > auroc["auroc_base"]
  assert auroc["separation_teacher"] > auroc["separation_base"]
  metrics = [json.loads(l) for l in (wd / "teacher/metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["reg"] < metrics[0]["reg"]


def test_distillation_and_reports(tiny_workdir):
  wd, _, _ = tiny_workdir
  metrics = [json.loads(l) for l in (wd / "methods/reft/metrics.jsonl").read_text().splitlines()]
  assert all("kd" in m and np.isfinite(m["kd"]) for m in metrics if "loss" in m)
  sft = [json.loads(l) for l in (wd / "methods/sft/metrics.jsonl").read_text().splitlines()]
  assert all("kd" not in m for m in sft)
  # distill made targets for exactly the alignment examples reft packs, and they fill every
  # alignment row reft's steps read without reading one twice
  dist = json.loads((wd / "distill/summary.json").read_text())
  reft = json.loads((wd / "methods/reft/finetune.json").read_text())
  drawn = reft["steps"] * reft["rows_per_step"]["align_"]
  assert reft["packing"]["align"]["examples"] == dist["examples"] <= dist["examples_of"]
  assert reft["packing"]["align"]["rows"] >= drawn and dist["align_rows_drawn"] >= drawn
  ev = json.loads((wd / "eval.json").read_text())
  assert set(ev["methods"]) == {"base", "reft", "sft", "judge_filter"}
  for entry in ev["methods"].values():
    assert 0 <= entry["harmful_score"]["harmful_score"] <= 100
    assert entry["judge"] == "qa_probe"  # the trained judge heads; keywords beside it
    assert set(entry["harmful_score"]["by_judge"]) == {"qa_probe", "refusal_keywords"}
  assert "| reft |" in (wd / "report.md").read_text()


def test_distill_targets_are_the_teachers_top_k_at_every_response_position(tiny_workdir):
  """distill/targets.npz holds, for each drawn example, the teacher's top-k at exactly the
  positions that predict a response token, equal to the top-k of its logits everywhere."""
  import jax.numpy as jnp

  from refjax.files import read_npz
  from refjax.method.losses import topk_targets
  from refjax.stages.alignment_rows import drawn_alignment
  from refjax.stages.context import Run
  from refjax.stages.distill import target_positions
  from refjax.stages.workdir import Workdir

  wd, cfg, _ = tiny_workdir
  r = Run(cfg, Workdir(wd))
  teacher, _, fmt = r.load(r.wd.teacher_model)
  _, enc, _ = drawn_alignment(r, fmt)
  z = read_npz(r.wd.distill_targets)
  assert len(z["example_ids"]) == len(enc) > 0
  k, temperature = int(cfg.finetune.kd_topk), float(cfg.finetune.kd_temperature)
  for n in sorted({0, len(enc) // 2, len(enc) - 1}):
    a, b = z["offsets"][n], z["offsets"][n + 1]
    pos = target_positions(enc[n])
    np.testing.assert_array_equal(z["positions"][a:b], pos)
    logits = teacher(jnp.asarray([enc[n].ids], jnp.int32)).logits[0, pos]
    ids, logp, tail = (np.asarray(x) for x in topk_targets(logits, k, temperature))
    np.testing.assert_allclose(z["logp"][a:b], logp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z["tail"][a:b], tail, rtol=1e-4, atol=1e-5)
    assert (z["ids"][a:b] == ids).mean() > 0.99  # ties in a tiny model's top-k may swap


def test_rerun_skips_finished_stages(tiny_workdir):
  wd, cfg, _ = tiny_workdir
  before = (wd / "stages/teacher.done.json").stat().st_mtime
  out = run_pipeline(cfg, str(wd), stages=["teacher", "refusal"])
  assert (wd / "stages/teacher.done.json").stat().st_mtime == before
  assert out["teacher"]["layer"] >= 1


def test_missing_artifact_fails_before_work(tmp_path):
  from configs import tiny
  with pytest.raises(FileNotFoundError, match="run the `refusal` stage first"):
    run_pipeline(tiny.get_config(), str(tmp_path), stages=["filter"])
  assert not (tmp_path / "config.json").exists()


def test_cli_rejects_unknown_method_and_stage(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "refjax.main", "--config=configs/tiny.py",
          f"--workdir={tmp_path}"]
  r = subprocess.run(base + ["--config.method=nope"], capture_output=True, text=True, env=env,
                     timeout=120)
  assert r.returncode != 0 and "config.method" in r.stderr and "'nope'" in r.stderr
  r = subprocess.run(base + ["--stages=teacher,bake"], capture_output=True, text=True, env=env,
                     timeout=120)
  assert r.returncode != 0 and "unknown stage" in r.stderr and "bake" in r.stderr
  r = subprocess.run(base + ["--config.teacher.reg_wieght=1"], capture_output=True, text=True,
                     env=env, timeout=120)
  assert r.returncode != 0 and "reg_wieght" in r.stderr
