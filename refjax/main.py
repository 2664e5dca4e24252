"""Entry point: `python -m refjax.main --config=configs/smollm.py --workdir=DIR [--stages=...]`.

Writes the resolved config first, then runs the stages asked for in order; each stage reads the
previous stages' artifacts from the workdir and marks itself done, so a rerun skips finished
stages (unless `--force`) and resumes an interrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from refjax import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/smollm.py", "Config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdirs/default", "Directory for every artifact of this run.")
flags.DEFINE_list("stages", None, "Stages to run, in order (default: the config's stages).")
flags.DEFINE_list("force", [], "Stages to rerun even if finished ('all' for every stage).")

log = logging.getLogger("refjax")


def _stage_fns():
  from refjax import stages
  return stages.STAGE_FNS


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _done(workdir: str, stage: str, cfg) -> dict | None:
  """The stage's done-marker if it covers this config's methods (adding a method reruns the
  per-method stages, which skip the methods already finished)."""
  marker = os.path.join(workdir, "stages", f"{stage}.done.json")
  if not os.path.exists(marker):
    return None
  with open(marker) as f:
    done = json.load(f)
  if stage in ("finetune", "evaluate") and not set(config_lib.methods(cfg)) <= set(
      done.get("methods", [])):
    return None
  return done


def run_pipeline(cfg, workdir: str, stages: list[str] | None = None, force=()) -> dict:
  """Validates, writes the resolved config, then runs each stage not already done."""
  fns = _stage_fns()
  stages = list(stages or cfg.stages)
  unknown = [s for s in stages if s not in fns]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(fns)}")
  config_lib.validate(cfg)
  from refjax.data.paths import set_data_root
  set_data_root(cfg.data.root)
  from refjax.stages import check_inputs
  force = set(stages) if "all" in force else set(force)
  pending = [s for s in stages if s in force or _done(workdir, s, cfg) is None]
  check_inputs(cfg, workdir, pending)
  config_lib.write_resolved(cfg, workdir)
  results = {}
  for name in stages:
    marker = os.path.join(workdir, "stages", f"{name}.done.json")
    done = _done(workdir, name, cfg)
    if done is not None and name not in force:
      log.info("stage %s: already done (%s); skipping", name, marker)
      results[name] = done
      continue
    log.info("stage %s: start", name)
    t0 = time.time()
    summary = fns[name](cfg, workdir) or {}
    summary["methods"] = config_lib.methods(cfg)
    summary["seconds"] = round(time.time() - t0, 2)
    _barrier(f"stage-{name}")  # every process sees the stage's files before the next reads them
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(marker), exist_ok=True)
      with open(marker, "w") as f:
        json.dump(summary, f, indent=2)
    log.info("stage %s: done in %.1fs", name, summary["seconds"])
    results[name] = summary
  return results


def setup_logging() -> None:
  """refjax's own progress at INFO; the libraries' chatter (Orbax logs every file) at WARNING."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("refjax").setLevel(logging.INFO)
  logging.getLogger("jax").setLevel(logging.WARNING)


def main(argv):
  del argv
  from refjax.runtime import reexec_with_malloc_tuning
  reexec_with_malloc_tuning()  # before any JAX computation; returns at once in the re-run
  setup_logging()
  from refjax.parallel.distributed import initialize
  initialize(FLAGS.config.distributed)  # before any JAX computation; a no-op on one process
  run_pipeline(FLAGS.config, FLAGS.workdir, FLAGS.stages, FLAGS.force)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
