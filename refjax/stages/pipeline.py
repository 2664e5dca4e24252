"""The loop that runs the stage table (`refjax.stages.table`): fingerprints, done markers, and the
checks before any work.

A unit of work is a stage, or a stage for one method. Each unit's fingerprint digests what it
reads; its marker records the fingerprint. A rerun skips a unit only when the marker's
fingerprint equals the current one; otherwise the unit reruns, and so does everything downstream
(whose fingerprints include it), each logging which inputs changed. `--force=STAGE` reruns that
stage and everything downstream, `--force=all` everything. Stale artifacts are removed before the
resolved config is written, so `config.json` always describes what is on disk.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from refjax.data.paths import set_data_root
from refjax.files import jsonable, write_json
from refjax.runtime import release_free_memory
from refjax.stages.context import Run
from refjax.stages.cost import metered
from refjax.stages.fingerprint import Plan, Unit, digest, key as _key, read_or_none
from refjax.stages.lock import workdir_lock
from refjax.stages.table import STAGES
from refjax.stages.workdir import Workdir

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Running


def check_inputs(plan: Plan, requested: Sequence[str], pending: Sequence[Unit],
                 doomed: set[Path]) -> None:
  """Fails before any work when a pending unit's input is neither on disk (and current) nor made
  by an earlier stage of this run."""
  cfg, wd = plan.r.cfg, plan.r.wd
  for unit in pending:
    earlier = requested[:requested.index(unit[0])]
    for path, producer in STAGES[unit[0]].needs(cfg, wd, unit[1]):
      if producer in earlier:
        continue
      if not path.exists() or any(path == d or d in path.parents for d in doomed):
        state = "stale (its inputs changed)" if path.exists() else "missing"
        raise FileNotFoundError(f"stage `{unit[0]}` needs {path}, which is {state}: run the "
                                f"`{producer}` stage first (--stages={producer},{unit[0]})")


def _remove(paths: Sequence[Path]) -> None:
  for p in paths:
    if p.is_dir():
      shutil.rmtree(p)
    elif p.exists():
      p.unlink()


def run(cfg, workdir: str | Path, stages: Sequence[str] | None = None,
        force: Sequence[str] = ()) -> dict:
  """Runs every asked-for unit whose fingerprint has no matching marker, in order; the config
  must be validated (`refjax.config.validate`). Returns {stage: summary}."""
  wd = Workdir(workdir)
  requested = list(stages or cfg.stages)
  for names, what in ((requested, "stage(s)"), ([f for f in force if f != "all"], "--force")):
    unknown = [s for s in names if s not in STAGES]
    if unknown:
      raise ValueError(f"unknown {what} {unknown}; expected some of {list(STAGES)}")
  unwanted = [s for s in requested if not STAGES[s].wanted(cfg)]
  if unwanted:
    log.info("stage(s) %s: not needed by this config (methods %s, eval.judge=%s); skipping",
             unwanted, cfg.method, cfg.eval.judge)
    requested = [s for s in requested if s not in unwanted]
  set_data_root(cfg.data.root)
  r = Run(cfg, wd)
  plan = Plan(r, STAGES, set(STAGES) if "all" in force else set(force))

  on_disk = lambda u: plan.marker(u) is not None or wd.running(*u).exists()  # noqa: E731
  units = {s: plan.units(s) for s in STAGES
           if s in requested or any(on_disk(u) for u in plan.units(s))}
  stale = [u for us in units.values() for u in us if on_disk(u) and not plan.valid(u)
           and not _resumable(plan, u)]
  pending = [u for s in requested for u in units[s] if not plan.valid(u)]
  doomed = {p for u in stale for p in STAGES[u[0]].outputs(wd, u[1])}
  check_inputs(plan, requested, pending, doomed)
  summary_of = {s: _stage_summary(plan, s) for s in requested}
  todo = [s for s in requested if any(u[0] == s for u in pending) or summary_of[s] is None]
  if not (todo or stale) and _config_unchanged(wd, cfg):
    log.info("every stage asked for is done and current; nothing to do")
    return {s: summary_of[s] for s in requested}

  with workdir_lock(wd.root) if jax.process_index() == 0 else _nothing():
    for u in stale:
      log.info("%s: %s; removing its artifacts %s", _key(u), plan.why(u),
               [str(p) for p in STAGES[u[0]].outputs(wd, u[1]) if p.exists()])
      if jax.process_index() == 0:
        _remove([*STAGES[u[0]].outputs(wd, u[1]), wd.marker(*u), wd.running(*u)])
    for s in {u[0] for u in stale} & {s for s in STAGES if STAGES[s].per_method}:
      if jax.process_index() == 0:  # the stage's own record and report cover every method
        _remove([wd.marker(s), *STAGES[s].finish_outputs(wd)])
    _barrier("invalidate")
    if jax.process_index() == 0:
      write_json(wd.config_json, jsonable(cfg))
    results = {}
    for name in requested:
      if name not in todo:
        log.info("stage %s: done and current (%s); skipping", name, wd.marker(name))
        results[name] = summary_of[name]
        continue
      results[name] = _run_stage(plan, name, [u for u in pending if u[0] == name])
  return results


def _run_stage(plan: Plan, name: str, pending: list[Unit]) -> dict:
  r, stage = plan.r, STAGES[name]
  log.info("stage %s: start", name)
  t0 = time.time()
  out = {}
  for u in pending:
    fp, inputs = plan.fingerprint(u)
    log.info("%s: %s", _key(u), plan.why(u) if plan.marker(u) or r.wd.running(*u).exists()
             else "not done yet")
    _write_all([(r.wd.running(*u), {"fingerprint": fp, "inputs": inputs})])
    release_free_memory()  # the unit's peak is its own, not the previous units' freed blocks
    with metered() as cost:
      out[u[1]] = (stage.fn(r, u[1]) if stage.per_method else stage.fn(r)) or {}
    _barrier(f"stage-{_key(u)}")  # every process sees the unit's files before the next reads them
    _write_all([(r.wd.marker(*u), {"stage": name, "method": u[1], "fingerprint": fp,
                                   "inputs": inputs, "summary": out[u[1]], "cost": cost,
                                   "seconds": cost["seconds"]})])
    _remove([r.wd.running(*u)] if jax.process_index() == 0 else [])
  if not stage.per_method:
    summary = out[None]
  else:
    summary = {m: out.get(m, (plan.marker((name, m)) or {}).get("summary", {}))
               for m in stage.methods(r.cfg)}
    if stage.finish is not None:
      summary = {"methods": summary, **(stage.finish(r) or {})}
    _barrier(f"stage-{name}")
    _write_all([(r.wd.marker(name), {"stage": name, "fingerprint": _stage_fp(plan, name),
                                     "summary": summary,
                                     "seconds": round(time.time() - t0, 2)})])
  log.info("stage %s: done in %.1fs", name, time.time() - t0)
  return summary


def _stage_fp(plan: Plan, name: str) -> str:
  """A per-method stage's own fingerprint: its units' (the report covers exactly these)."""
  return digest({_key(u): plan.fingerprint(u)[0] for u in plan.units(name)})


def _stage_summary(plan: Plan, name: str) -> dict | None:
  """The finished stage's summary, or None when it is not done for this config."""
  if STAGES[name].per_method:
    m = plan.marker((name, None))
    ok = m is not None and m.get("fingerprint") == _stage_fp(plan, name) and all(
        plan.valid(u) for u in plan.units(name))
  else:
    m = plan.marker((name, None))
    ok = plan.valid((name, None))
  return m.get("summary", {}) if ok else None


def _resumable(plan: Plan, unit: Unit) -> bool:
  """An interrupted unit (running record, no marker) with the same fingerprint resumes from its
  checkpoints instead of being removed."""
  if plan.marker(unit) is not None or plan.forced(unit):
    return False
  rec = read_or_none(plan.r.wd.running(*unit))
  return rec is not None and rec.get("fingerprint") == plan.fingerprint(unit)[0]


def _config_unchanged(wd: Workdir, cfg) -> bool:
  return read_or_none(wd.config_json) == jsonable(cfg)


def _write_all(items: Sequence[tuple[Path, Any]]) -> None:
  if jax.process_index() == 0:
    for path, obj in items:
      write_json(path, obj)


class _nothing:  # noqa: N801 - a null context manager for the processes that do not lock
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


__all__ = ["run", "check_inputs"]
