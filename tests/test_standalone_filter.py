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


def test_every_scorer_scores_as_defined_and_reloads_the_same(tiny_workdir, tmp_path):
  """filter.scorer cosine / max_cosine / logistic: the Scorer's scores equal the pure scorer on
  the teacher's features, and a fresh Scorer (as `python -m refjax.filter` builds one) reading the
  saved fit gives the same scores."""
  from refjax.files import read_npz
  from refjax.method.scorers import cosine, logistic_scores, max_cosine, probe_from_arrays
  from refjax.stages.scorer import Scorer

  wd, cfg, _ = tiny_workdir
  work = Workdir(tmp_path / "wd")
  work.root.mkdir()
  for name in ("refusal", "teacher"):
    (work.root / name).symlink_to(Workdir(wd).root / name)
  for kind in ("cosine", "max_cosine", "logistic"):
    c = cfg.copy_and_resolve_references()
    c.filter.scorer = kind
    r = Run(c, work)
    scorer = Scorer(r)
    scorer.fit()
    examples = r.sets.calibration()[:8]
    got = scorer(examples)
    x = scorer.features(examples)
    if kind == "cosine":
      expect = cosine(x, scorer.art.feature[scorer.layer])
    elif kind == "max_cosine":
      expect = max_cosine(x, read_npz(work.filter_directions)["directions"])
    else:
      expect = logistic_scores(probe_from_arrays(read_npz(work.logistic_probe)), x)
    np.testing.assert_allclose(got, expect, atol=1e-5, err_msg=kind)
    np.testing.assert_allclose(Scorer(r)(examples), got, atol=1e-6, err_msg=kind)
