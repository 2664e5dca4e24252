"""Entry point: `python -m refjax.main --config=configs/smollm.py --workdir=DIR [--stages=...]`.

Validates the config, writes it resolved into the workdir, then runs the stages asked for in
order (`refjax.stages.pipeline`); each stage reads the previous stages' artifacts and marks
itself done, so a rerun skips finished stages (unless `--force`) and resumes an interrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from refjax import cli
from refjax import config as config_lib
from refjax.parallel.distributed import initialize
from refjax.runtime import reexec_with_malloc_tuning
from refjax.stages import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/smollm.py", "Config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", "workdirs/default", "Directory for every artifact of this run.")
flags.DEFINE_list("stages", None, "Stages to run, in order (default: the config's stages).")
flags.DEFINE_list("force", [], "Stages to rerun even if finished ('all' for every stage).")


def run_pipeline(cfg, workdir: str | Path, stages: Sequence[str] | None = None,
                 force: Sequence[str] = ()) -> dict:
  """Validates `cfg` (naming the first bad key), then runs the pipeline."""
  config_lib.validate(cfg)
  return pipeline.run(cfg, workdir, stages, force)


def main(argv):
  del argv
  # Faster steps (refjax/runtime.py; REFJAX_NO_MALLOC_TUNING=1 opts out): before any JAX
  # computation; returns at once in the re-run. The pipeline trims the heap between units.
  reexec_with_malloc_tuning()
  cli.setup_logging()
  initialize(FLAGS.config.distributed)  # before any JAX computation; a no-op on one process
  with cli.user_errors():
    run_pipeline(FLAGS.config, FLAGS.workdir, FLAGS.stages, FLAGS.force)


def parse_flags(argv: list[str]) -> list[str]:
  return cli.parse_flags(FLAGS, argv)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
