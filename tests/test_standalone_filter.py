"""`python -m refjax.filter`: a prepared teacher screens any user file with the decisions the
pipeline's filter stage makes for the same rows."""

import json
import subprocess
import sys

import numpy as np

from refjax.files import read_json, read_jsonl
from refjax.stages.context import Run
from refjax.stages.workdir import Workdir

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_standalone_filter_equals_the_stage(tiny_workdir, tmp_path):
  wd, cfg, _ = tiny_workdir
  user = Run(cfg, Workdir(wd)).sets.user()
  data = tmp_path / "customer.jsonl"
  data.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input,
                                      "response": e.response}) + "\n" for e in user))
  out = tmp_path / "screened"
  r = subprocess.run([sys.executable, "-m", "refjax.filter", f"--teacher={wd}",
                      f"--data={data}", f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  stage = read_jsonl(Workdir(wd).filter_report)
  alone = read_jsonl(out / "filter_report.jsonl")
  assert [row["kept"] for row in alone] == [row["kept"] for row in stage]
  np.testing.assert_allclose([row["score"] for row in alone], [row["score"] for row in stage],
                             atol=1e-6)
  assert [row["text_sha256"] for row in alone] == [row["text_sha256"] for row in stage]
  kept = read_jsonl(out / "kept.jsonl")
  assert len(kept) == sum(row["kept"] for row in stage)
  summary = read_json(out / "filter_summary.json")
  assert summary["threshold"] == read_json(Workdir(wd).filter_summary)["threshold"]
  assert f"{summary['n_kept']} of {len(user)} kept" in r.stdout
  for line in r.stdout.splitlines() + r.stderr.splitlines():  # numbers only, never the text
    assert not any(e.instruction[:30] in line for e in user if len(e.instruction) > 30)


def test_standalone_filter_names_a_bad_file(tiny_workdir, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "no known fields"}\n')
  r = subprocess.run([sys.executable, "-m", "refjax.filter", f"--teacher={tiny_workdir[0]}",
                      f"--data={bad}", f"--out={tmp_path / 'o'}"], cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 1
  assert "bad.jsonl, line 1: expected 'instruction'" in r.stderr
