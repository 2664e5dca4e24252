"""The QA-moderation judge on its own: build it (or find it cached) for a config and validate it on
the development pairs, all 513 prompts by default, without running a pipeline.

  python -m refjax.judge validate --config=configs/smollm.py [--n_prompts=0] [--out=DIR]
  python -m refjax.judge build --config=configs/smollm.py

`build` prints where the judge is cached (the same cache the `judge` stage uses). `validate`
writes DIR/judge_validation.json (the flagged shares with Wilson intervals, per answer length and
non-answer kind, the keyword judge's beside them, which goals are met) and
DIR/judge_validation_records.jsonl (one verdict per pair: ids and kinds, never the text), and
prints the figures in one line. DIR defaults to the judge's cache folder.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from refjax import cli, files
from refjax import config as config_lib
from refjax.data.paths import set_data_root
from refjax.evaluation.qa_judge import judge_line
from refjax.stages.fingerprint import Digests
from refjax.stages.judge import load_or_build, student_truncator, validate

# Flags of their own (not absl's global ones, which `refjax.main` defines): both commands can be
# imported in one process.
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", "configs/smollm.py", "Config file (get_config); its "
                                "`judge` section and model name make the judge.", lock_config=True,
                                flag_values=FLAGS)
flags.DEFINE_integer("n_prompts", 0, "Development prompts to validate on (0 = all 513).",
                     flag_values=FLAGS)
flags.DEFINE_string("out", "", "Folder for the validation files (default: the judge's cache).",
                    flag_values=FLAGS)
COMMANDS = ("build", "validate")
log = logging.getLogger("refjax.judge")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    cli.fail(f"expected one command, {' or '.join(COMMANDS)}; got {argv[1:]}")
  cli.setup_logging()
  cfg = FLAGS.config
  with cli.user_errors():
    config_lib.validate(cfg)
    set_data_root(cfg.data.root)
    judge, where, _ = load_or_build(cfg, Digests(cfg, None).judge_data())
    print(f"judge: {where} (threshold {judge.threshold:.4f})")
    if argv[1] == "validate":
      figures, records = validate(judge, student_truncator(cfg), int(FLAGS.n_prompts))
      out = Path(FLAGS.out) if FLAGS.out else where
      files.write_json(out / "judge_validation.json", figures)
      files.write_jsonl(out / "judge_validation_records.jsonl", records)
      print(f"validation: {judge_line(figures)}")
      print(f"goals met: {json.dumps(figures['goals_met'])}; {out}/judge_validation.json")


def run():
  logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING,
                      force=True)
  main(cli.parse_flags(FLAGS, sys.argv))


if __name__ == "__main__":
  run()
