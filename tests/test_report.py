"""Reports: eval.json, report.md (method x HS/FA), PNG plots; response text stays in records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refjax.evaluation.judges import RefusalKeywordJudge
from refjax.evaluation.harmful_score import score_responses
from refjax.evaluation.report import method_table, render_markdown, write_report
from refjax.evaluation.task_accuracy import score_task

PNG = b"\x89PNG\r\n\x1a\n"
SECRET = "Sure, here is a recipe for pancakes."


def _results():
  hs = score_responses(["p0", "p1"], ["I cannot help with that.", SECRET], RefusalKeywordJudge(),
                       ids=["toy:0", "toy:1"])
  fa = score_task("sst2", ["positive", "negative"], ["positive", "positive"], ids=["s:0", "s:1"])
  rng = np.random.default_rng(0)
  return {
    "methods": {"sft": {"harmful_score": 62.5, "finetune_accuracy": 91.0, "judge": "moderation",
                        "task": "sst2"},
                "ref_teacher": {"harmful_score": hs, "finetune_accuracy": fa},
                "no_task": {"harmful_score": 10.0}},
    "refusal_cosine": {"harmful": rng.normal(0.4, 0.1, 50), "harmless": rng.normal(0.0, 0.1, 50),
                       "sst2": list(rng.normal(0.05, 0.1, 20))},
    "config": {"seed": 0, "harmful_ratio": 0.1},
  }


def test_write_report_files(tmp_path):
  written = write_report(_results(), tmp_path)
  for key in ("eval_json", "report_md", "hs_fa_png", "refusal_cosine_png"):
    assert written[key].is_file(), key
  for png in ("hs_fa.png", "refusal_cosine.png"):
    assert (tmp_path / png).read_bytes()[:8] == PNG

  data = json.loads((tmp_path / "eval.json").read_text())
  ref = data["methods"]["ref_teacher"]
  assert ref["harmful_score"]["harmful_score"] == 50.0
  assert ref["harmful_score"]["judge"] == "refusal_keywords"
  assert ref["finetune_accuracy"]["accuracy"] == 50.0
  assert "records" not in ref["harmful_score"] and "records" not in ref["finetune_accuracy"]
  assert data["config"] == {"seed": 0, "harmful_ratio": 0.1}
  assert len(data["refusal_cosine"]["harmful"]) == 50

  records = tmp_path / ref["harmful_score"]["records_file"]
  lines = [json.loads(line) for line in records.read_text().splitlines()]
  assert [r["id"] for r in lines] == ["toy:0", "toy:1"] and lines[1]["response"] == SECRET
  assert (tmp_path / ref["finetune_accuracy"]["records_file"]).is_file()

  md = (tmp_path / "report.md").read_text()
  assert ("| method | HS (%) [95% CI] | judge | prompts | FA (%) [95% CI] | task |") in md
  assert "| sft | 62.5 | moderation | – | 91.0 | sst2 |" in md  # no counts: no intervals
  # 1 of 2 harmful: Wilson [9.5, 90.5]; 1 of 2 correct likewise
  assert "| ref_teacher | 50.0 [9.5, 90.5] | refusal_keywords | 2 | 50.0 [9.5, 90.5] | sst2 |" in md
  assert "| no_task | 10.0 | – | – | – | – |" in md
  assert "| – | harmful | 50 |" in md and "![HS and FA per method](hs_fa.png)" in md
  for text in (md, (tmp_path / "eval.json").read_text()):
    assert SECRET not in text


def test_nested_cosines_make_one_plot_per_group(tmp_path):
  results = {"methods": {"a": {"harmful_score": 1.0, "finetune_accuracy": 2.0}},
             "refusal_cosine": {"teacher": {"harmful": [0.5, 0.6], "harmless": [0.0, 0.1]},
                                "student/sft": {"harmful": [0.1, 0.2], "gsm8k": [0.0, -0.1]}}}
  written = write_report(results, tmp_path)
  assert (tmp_path / "refusal_cosine_teacher.png").is_file()
  assert (tmp_path / "refusal_cosine_student_sft.png").is_file()
  assert "refusal_cosine_student_sft_png" in written


def test_bad_results_raise(tmp_path):
  with pytest.raises(ValueError, match="results\\['methods'\\]"):
    write_report({"refusal_cosine": {}}, tmp_path)
  with pytest.raises(ValueError, match="'a'.*expected a dict"):
    method_table({"methods": {"a": 3.0}})
  with pytest.raises(ValueError, match="data set 'harmful' are empty"):
    render_markdown({"methods": {"a": {}}, "refusal_cosine": {"harmful": []}}, {})
