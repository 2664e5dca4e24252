"""The stage table and the loop that runs it: which stage reads what and writes what, the done
markers, and the check that every input exists (or is made earlier in the run) before any work.

    teacher   start model, alignment + probe sets  -> refusal_base/, teacher/
    refusal   teacher/model, refusal_base/          -> refusal/
    filter    teacher/model, refusal/, user data     -> filter/
    finetune  base model, filter/, teacher/model     -> methods/<method>/model  (per method)
    evaluate  methods/<method>/model                 -> methods/<method>/eval.json, eval.json,
                                                        report.md                (per method)
    generate  (on demand) base model                 -> generations.json
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from refjax.data.paths import set_data_root
from refjax.files import jsonable, read_json, write_json
from refjax.method.student import METHODS, parse_methods
from refjax.stages import evaluate, finetune, generate, refusal, teacher
from refjax.stages import filter as filter_stage
from refjax.stages.context import Run
from refjax.stages.workdir import Workdir

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its function, the inputs it reads (as (workdir path, producing stage) pairs, which
  may depend on the config's methods) and whether it runs once per method."""

  name: str
  fn: Callable[[Run], dict]
  inputs: Callable[[Any, Workdir], list[tuple[Path, str]]]
  per_method: bool = False


def _finetune_inputs(cfg, wd: Workdir) -> list[tuple[Path, str]]:
  methods = [METHODS[m] for m in parse_methods(cfg.method)]
  out = []
  if any(m.filter for m in methods):
    out.append((wd.filter_report, "filter"))
  if any(m.distill for m in methods):
    out.append((wd.teacher_model / "config.json", "teacher"))
  return out


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("teacher", teacher.run, lambda cfg, wd: []),
    Stage("refusal", refusal.run, lambda cfg, wd: [
        (wd.refusal_base / "refusal_feature.json", "teacher"),
        (wd.teacher_model / "config.json", "teacher")]),
    Stage("filter", filter_stage.run, lambda cfg, wd: [
        (wd.refusal / "refusal_feature.json", "refusal"),
        (wd.teacher_model / "config.json", "teacher")]),
    Stage("finetune", finetune.run, _finetune_inputs, per_method=True),
    Stage("evaluate", evaluate.run, lambda cfg, wd: [
        (wd.method_model(m) / "config.json", "finetune") for m in parse_methods(cfg.method)],
        per_method=True),
    Stage("generate", generate.run, lambda cfg, wd: []),
)}


def done_marker(wd: Workdir, stage: str, cfg) -> dict | None:
  """The stage's marker if it covers this config's methods (adding a method reruns the
  per-method stages, which skip the methods already finished)."""
  path = wd.marker(stage)
  if not path.exists():
    return None
  done = read_json(path)
  if STAGES[stage].per_method and not set(parse_methods(cfg.method)) <= set(
      done.get("methods", [])):
    return None
  return done


def check_inputs(cfg, wd: Workdir, stages: Sequence[str]) -> None:
  """Fails before any work when a stage's input is neither on disk nor made by an earlier stage."""
  for i, name in enumerate(stages):
    for path, producer in STAGES[name].inputs(cfg, wd):
      if producer in stages[:i] or path.exists():
        continue
      raise FileNotFoundError(f"stage `{name}` needs {path}, which is missing: run the "
                              f"`{producer}` stage first (--stages={producer},{name})")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def run(cfg, workdir: str | Path, stages: Sequence[str] | None = None,
        force: Sequence[str] = ()) -> dict:
  """Runs each asked-for stage not already done, in order; the config must be validated
  (`refjax.config.validate`). Writes the resolved config, a marker per finished stage."""
  wd = Workdir(workdir)
  stages = list(stages or cfg.stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
  set_data_root(cfg.data.root)
  force = set(stages) if "all" in force else set(force)
  pending = [s for s in stages if s in force or done_marker(wd, s, cfg) is None]
  check_inputs(cfg, wd, pending)
  if jax.process_index() == 0:
    write_json(wd.config_json, jsonable(cfg))
  r = Run(cfg, wd)
  methods = parse_methods(cfg.method)
  results = {}
  for name in stages:
    done = done_marker(wd, name, cfg)
    if done is not None and name not in force:
      log.info("stage %s: already done (%s); skipping", name, wd.marker(name))
      results[name] = done
      continue
    log.info("stage %s: start", name)
    t0 = time.time()
    summary = STAGES[name].fn(r) or {}
    summary["methods"] = methods
    summary["seconds"] = round(time.time() - t0, 2)
    _barrier(f"stage-{name}")  # every process sees the stage's files before the next reads them
    if jax.process_index() == 0:
      write_json(wd.marker(name), summary)
    log.info("stage %s: done in %.1fs", name, summary["seconds"])
    results[name] = summary
  return results


__all__ = ["Stage", "STAGES", "run", "check_inputs", "done_marker"]
