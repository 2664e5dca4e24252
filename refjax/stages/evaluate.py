"""Stage `evaluate` (per method, and "base"): harmful score (HS) and finetuning accuracy (FA) of one
model; then the report over all of them.

Reads methods/<method>/model (and refusal/, filter/ for the report); writes
methods/<method>/eval.json, eval.json, report.md, the plots and records/.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from refjax.data.sources import load_source
from refjax.evaluation.generation import Generator, SamplingConfig
from refjax.evaluation.harmful_score import harmful_score
from refjax.data.judge_pairs import assert_unseen
from refjax.evaluation.judges import Judge, RefusalKeywordJudge
from refjax.evaluation.judging import make_judge
from refjax.evaluation.report import write_report
from refjax.evaluation.task_accuracy import task_accuracy
from refjax.files import read_json, read_npz, write_json
from refjax.method.student import parse_methods
from refjax.stages.context import Run
from refjax.stages.judge import load_judge

log = logging.getLogger(__name__)


def evaluate(r: Run, name: str) -> dict:
  """One model's HS and FA ("base" = config.model untouched), written to its eval.json."""
  path = None if name == "base" else str(r.require(r.wd.method_model(name), "finetune"))
  res = evaluate_model(r, path, hs_judge(r))
  write_json(r.wd.method_eval(name), res, sort_keys=False)
  return {"hs": res["harmful_score"]["harmful_score"],
          "fa": res["finetune_accuracy"]["accuracy"], "judge": res["judge"]}


def report(r: Run) -> dict:
  """eval.json, report.md and the plots, from every evaluated model and the run's other records."""
  wd = r.wd
  names = (["base"] if r.cfg.eval.include_base else []) + parse_methods(r.cfg.method)
  results: dict[str, Any] = {"methods": {n: read_json(wd.method_eval(n)) for n in names}}
  if wd.cosine_sets.exists():
    groups: dict[str, dict[str, list]] = {}
    for key, values in read_npz(wd.cosine_sets).items():
      tag, set_name = key.split("/", 1)
      groups.setdefault(tag, {})[set_name] = values.tolist()
    results["refusal_cosine"] = groups
  for key, path in (("refusal", wd.auroc), ("filter", wd.filter_summary),
                    ("generalisation", wd.generalisation),
                    ("screen", wd.screen_summary), ("judge_validation", wd.judge_validation)):
    if path.exists():
      results[key] = read_json(path)
  order = {s: i for i, s in enumerate(r.cfg.stages)}
  results["cost"] = sorted(wd.costs(), key=lambda c: (order.get(c["stage"], len(order)),
                                                      c.get("method") or ""))
  paths = write_report(results, wd.root)
  table = {m: {"hs": e.get("harmful_score", {}).get("harmful_score"),
               "fa": e.get("finetune_accuracy", {}).get("accuracy")}
           for m, e in results["methods"].items()}
  log.info("results: %s", json.dumps(table))
  return {"report": str(paths.get("report_md", "")), "table": table}


def hs_judge(r: Run) -> Judge:
  """The judge config.eval names, loaded once per run (the trained QA judge from stage `judge`)."""
  return r.shared("hs_judge", lambda: make_judge(
      r.cfg.eval, lambda path: r.load(path),
      load_qa=lambda: r.shared("qa_judge", lambda: load_judge(r))))


def evaluate_model(r: Run, path: str | None, judge: Judge) -> dict:
  """HS on the harmful test prompts and FA on the task's test split for one model."""
  ec = r.cfg.eval
  model, _, fmt = r.load(path)
  gen = Generator(model, fmt, batch_size=ec.batch_size, max_prompt_len=r.cfg.prompt.max_prompt_len,
                  share_prefix=bool(r.cfg.prompt.share_prefix))
  hs_ex = load_source(ec.hs_source, limit=ec.hs_n)
  if getattr(judge, "trained_prompts", None) is not None:  # a trained judge never saw them
    assert_unseen(judge.trained_prompts, [e.instruction for e in hs_ex], [e.id for e in hs_ex],
                  f"HS prompt ({ec.hs_source})")
  hs_sampling = SamplingConfig(max_new_tokens=ec.max_new_tokens)
  extra = [] if judge.name == RefusalKeywordJudge.name else [RefusalKeywordJudge()]
  hs = harmful_score([e.instruction for e in hs_ex],
                     lambda ps: gen.generate_text(ps, hs_sampling, progress=True), judge,
                     ids=[e.id for e in hs_ex], extra_judges=extra)
  fa_ex = r.sets.task_test(ec.fa_n)
  answers = gen.generate_text([e.instruction for e in fa_ex],
                              SamplingConfig(max_new_tokens=ec.fa_max_new_tokens),
                              inputs=[e.input for e in fa_ex], progress=True)
  fa = task_accuracy(r.cfg.data.task, fa_ex, answers)
  return {"model": path or r.cfg.model.name, "harmful_score": hs, "finetune_accuracy": fa,
          "judge": judge.name, "task": r.cfg.data.task}
