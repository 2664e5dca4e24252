"""The stage table: which stage reads what (config fields, data, models, upstream stages) and
writes what, and whether a config needs it.

    teacher   start model, alignment + probe sets  -> refusal_base/, teacher/
    refusal   teacher/model, refusal_base/          -> refusal/
    filter    teacher/model, refusal/, user data     -> filter/ (+ the scorer's fit)
    generalisation  teacher/, refusal/, filter/, protocol sources -> refusal/generalisation.json
    judge     judge backbone, judge pairs' data      -> judge/ (pointer to the cached QA judge)
    screen    judge/, user data                      -> screen/ (the judge's drops: judge_filter)
    distill   teacher/model, alignment set           -> distill/ (the teacher's top-k targets)
    finetune  base model, filter/ or screen/, distill/ -> methods/<method>/  (per method)
    evaluate  methods/<method>/model (judge/)        -> methods/<method>/eval.json (per method),
                                                        eval.json, report.md
    generate  (on demand) base model                 -> generations.json

A stage the config does not need (`judge` when neither the HS judge nor a method uses it, `screen`
without judge_filter) is skipped with a log line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from refjax.method.student import METHODS, parse_methods
from refjax.stages import (distill, evaluate, finetune, generalisation, generate, refusal, screen,
                           teacher)
from refjax.stages import filter as filter_stage
from refjax.stages import judge as judge_stage
from refjax.stages.context import Run
from refjax.stages.fingerprint import Unit, digest
from refjax.stages.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its function, what it reads and writes, and whether it runs once per method.

  fn(run) -> summary, or for per-method stages fn(run, method) -> that method's summary (each
  method's marker is written as soon as it finishes) and finish(run) -> the stage's summary.
  config: config keys it reads. data(run, method) -> {name: content digest}. upstream(cfg, method)
  -> units it reads. needs(cfg, wd, method) -> (path, producing stage) pairs that must exist.
  outputs(wd, method) -> paths it writes (removed when the unit is stale). artifacts(wd, method)
  -> the files a finished unit must have (missing or torn = not done). wanted(cfg): whether this
  config needs the stage at all.
  """

  name: str
  fn: Callable[..., dict]
  config: tuple[str, ...]
  data: Callable[[Run, str | None], dict[str, str]]
  upstream: Callable[[Any, str | None], list[Unit]]
  needs: Callable[[Any, Workdir, str | None], list[tuple[Path, str]]]
  outputs: Callable[[Workdir, str | None], list[Path]]
  artifacts: Callable[[Workdir, str | None], list[Path]]
  per_method: bool = False
  finish: Callable[[Run], dict] | None = None
  finish_outputs: Callable[[Workdir], list[Path]] = lambda wd: []  # what `finish` writes
  wanted: Callable[[Any], bool] = lambda cfg: True

  def methods(self, cfg) -> list[str | None]:
    if not self.per_method:
      return [None]
    return (["base"] if self.name == "evaluate" and cfg.eval.include_base else []) + (
        parse_methods(cfg.method))


# ---------------------------------------------------------------------------------------------
# The table


def _alignment_needed(cfg, method: str | None) -> bool:
  m = METHODS[method]
  return m.uses_alignment_rows or m.pre_align


def _filters(cfg) -> set[str | None]:
  return {METHODS[m].filter for m in parse_methods(cfg.method)}


def _judge_wanted(cfg) -> bool:
  """The QA judge is built when it judges HS or screens data for a method."""
  return cfg.eval.judge == "qa_probe" or "judge" in _filters(cfg)


def _judge_upstream(cfg) -> list[Unit]:
  return [("judge", None)] if cfg.eval.judge == "qa_probe" else []


def _teacher_data(r: Run, method) -> dict[str, str]:
  return {"start_model": r.digests.model(r.start_model or r.cfg.model.name),
          "alignment": r.digests.examples("alignment"), "probe": r.digests.examples("probe"),
          "validation": r.digests.examples("validation")}


def _refusal_data(r: Run, method) -> dict[str, str]:
  return {"start_model": r.digests.model(r.start_model or r.cfg.model.name),
          **{k: r.digests.examples(k) for k in ("probe", "validation", "ood")},
          "task_test": r.digests.examples("task_test", r.cfg.refusal.n_val)}


def _filter_data(r: Run, method) -> dict[str, str]:
  out = {"user": r.digests.examples("user")}
  if r.cfg.filter.scorer != "cosine":  # fitted on the alignment prompts
    out["alignment"] = r.digests.examples("alignment")
  if r.cfg.filter.threshold != r.cfg.filter.threshold:  # NaN: calibrated
    out["calibration"] = r.digests.examples("calibration")
  return out


def _generalisation_data(r: Run, method) -> dict[str, str]:
  return {"sources": r.digests.filter_sources(),
          **{k: r.digests.examples(k) for k in ("alignment", "probe", "validation",
                                                "calibration")}}


# The config keys that change the teacher's data (issue 15's levers).
MIX_KEYS = tuple(f"data.{k}" for k in ("alignment_mix", "harmless_mix", "n_harmless_mix",
                                       "holdout_source", "wrap_per_family", "refusal_targets"))


# The config keys that decide which alignment examples the finetune draws (alignment_rows).
DRAW_KEYS = tuple(f"finetune.{k}" for k in ("epochs", "align_ratio", "pack_len", "share_prefix",
                                            "train.steps", "train.batch_size", "train.seed"))


def _finetune_data(r: Run, method) -> dict[str, str]:
  out = {"base_model": r.digests.model(r.cfg.model.name), "user": r.digests.examples("user"),
         "method": digest(dataclasses.asdict(METHODS[method]))}
  if _alignment_needed(r.cfg, method):
    out["alignment"] = r.digests.examples("alignment")
  return out


def _finetune_upstream(cfg, method) -> list[Unit]:
  m = METHODS[method]
  kd = m.weights(cfg.finetune)["kd"]
  source = "distill" if int(cfg.finetune.kd_topk) > 0 else "teacher"
  decisions = {"teacher": "filter", "judge": "screen"}
  return ([(decisions[m.filter], None)] if m.filter else []) + ([(source, None)] if kd else [])


_PRODUCT = {"filter": lambda wd: wd.filter_report, "distill": lambda wd: wd.distill_targets,
            "teacher": lambda wd: wd.teacher_model / "config.json",
            "screen": lambda wd: wd.screen_report, "judge": lambda wd: wd.judge_pointer}


def _evaluate_data(r: Run, method) -> dict[str, str]:
  out = {"hs_prompts": r.digests.source(r.cfg.eval.hs_source, r.cfg.eval.hs_n),
         "task_test": r.digests.examples("task_test", r.cfg.eval.fa_n),
         "judge": r.digests.judge()}
  if method == "base":
    out["model"] = r.digests.model(r.cfg.model.name)
  return out


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("teacher", teacher.run,
          config=("seed", "model", "prompt", "teacher", "refusal.layer", "refusal.layer_range",
                  "refusal.probe_harmful", "refusal.probe_harmless", "refusal.n_probe",
                  "refusal.val_harmful", "refusal.val_harmless", "refusal.n_val",
                  "refusal.batch_size", "data.alignment_harmful", "data.alignment_harmless",
                  "data.n_alignment_harmful", "data.n_alignment_harmless", "data.refusal_check",
                  *MIX_KEYS),
          data=_teacher_data, upstream=lambda cfg, m: [], needs=lambda cfg, wd, m: [],
          outputs=lambda wd, m: [wd.refusal_base, wd.teacher],
          artifacts=lambda wd, m: [wd.refusal_base / "refusal_feature.json",
                                   wd.teacher_model / "config.json", wd.refusal_updates]),
    Stage("refusal", refusal.run,
          config=("seed", "model", "prompt", "teacher.init", "refusal", "data.task", *MIX_KEYS),
          data=_refusal_data, upstream=lambda cfg, m: [("teacher", None)],
          needs=lambda cfg, wd, m: [(wd.refusal_base / "refusal_feature.json", "teacher"),
                                    (wd.teacher_model / "config.json", "teacher")],
          outputs=lambda wd, m: [wd.refusal],
          artifacts=lambda wd, m: [wd.refusal / "refusal_feature.json", wd.auroc,
                                   wd.cosine_sets]),
    Stage("filter", filter_stage.run,
          config=("seed", "model", "prompt", "filter", "refusal.val_harmful", "refusal.n_val",
                  *MIX_KEYS),
          data=_filter_data, upstream=lambda cfg, m: [("teacher", None), ("refusal", None)],
          needs=lambda cfg, wd, m: [(wd.refusal / "refusal_feature.json", "refusal"),
                                    (wd.teacher_model / "config.json", "teacher")],
          outputs=lambda wd, m: [wd.filter],
          artifacts=lambda wd, m: [wd.filter_report, wd.filter_summary]),
    Stage("generalisation", generalisation.run,
          config=("seed", "model", "prompt", "filter", "generalisation", "refusal", "data.task",
                  *MIX_KEYS),
          data=_generalisation_data,
          upstream=lambda cfg, m: [("teacher", None), ("refusal", None), ("filter", None)],
          needs=lambda cfg, wd, m: [(wd.filter_summary, "filter"),
                                    (wd.refusal / "refusal_feature.json", "refusal")],
          outputs=lambda wd, m: [wd.generalisation], artifacts=lambda wd, m: [wd.generalisation],
          wanted=lambda cfg: "teacher" in _filters(cfg)),
    Stage("judge", judge_stage.run, config=("model.name", "judge"),
          data=lambda r, m: {"pairs": r.digests.judge_data(),
                             "backbone": r.digests.model(r.cfg.judge.backbone)},
          upstream=lambda cfg, m: [], needs=lambda cfg, wd, m: [],
          outputs=lambda wd, m: [wd.judge],
          artifacts=lambda wd, m: [wd.judge_pointer, wd.judge_validation,
                                   *judge_stage.cached_files(wd.judge_pointer)],
          wanted=_judge_wanted),
    Stage("screen", screen.run, config=("model.name", "prompt"),
          data=lambda r, m: {"user": r.digests.examples("user")},
          upstream=lambda cfg, m: [("judge", None)],
          needs=lambda cfg, wd, m: [(wd.judge_pointer, "judge")],
          outputs=lambda wd, m: [wd.screen],
          artifacts=lambda wd, m: [wd.screen_report, wd.screen_summary],
          wanted=lambda cfg: "judge" in _filters(cfg)),
    Stage("distill", distill.run,
          config=("seed", "model", "prompt", "finetune.kd_topk", "finetune.kd_temperature",
                  "finetune.max_len", "finetune.kd_weight", "method", *DRAW_KEYS),
          data=lambda r, m: {"alignment": r.digests.examples("alignment"),
                             "user": r.digests.examples("user")},  # how many rows are drawn
          upstream=lambda cfg, m: [("teacher", None)],
          needs=lambda cfg, wd, m: [(wd.teacher_model / "config.json", "teacher")],
          outputs=lambda wd, m: [wd.distill], artifacts=lambda wd, m: [wd.distill_targets]),
    Stage("finetune", finetune.finetune, config=("seed", "model", "prompt", "finetune"),
          data=_finetune_data, upstream=_finetune_upstream,
          needs=lambda cfg, wd, m: [(_PRODUCT[u[0]](wd), u[0]) for u in _finetune_upstream(cfg, m)],
          outputs=lambda wd, m: [wd.method(m)],
          artifacts=lambda wd, m: [wd.method_model(m) / "config.json", wd.method_summary(m)],
          per_method=True),
    Stage("evaluate", evaluate.evaluate, config=("seed", "model", "prompt", "eval", "data.task"),
          data=_evaluate_data,
          upstream=lambda cfg, m: _judge_upstream(cfg) + (
              [] if m == "base" else [("finetune", m)]),
          needs=lambda cfg, wd, m: [(_PRODUCT[u[0]](wd), u[0]) for u in _judge_upstream(cfg)] + (
              [] if m == "base" else [(wd.method_model(m) / "config.json", "finetune")]),
          outputs=lambda wd, m: [wd.method_eval(m), *wd.records.glob(f"{m}.*")],
          artifacts=lambda wd, m: [wd.method_eval(m)],
          per_method=True, finish=evaluate.report,
          finish_outputs=lambda wd: [wd.eval_json, wd.report_md, wd.records,
                                     *wd.root.glob("*.png")]),
    Stage("generate", generate.run, config=("seed", "model", "prompt", "generate"),
          data=lambda r, m: {"model": r.digests.model(r.cfg.model.name)},
          upstream=lambda cfg, m: [], needs=lambda cfg, wd, m: [],
          outputs=lambda wd, m: [wd.generations], artifacts=lambda wd, m: [wd.generations]),
)}


__all__ = ["Stage", "STAGES"]
