"""The QA-moderation judge on its own: build it (or find it cached) for a config and validate it on
the development pairs, all 513 prompts by default, without running a pipeline.

  python -m refjax.judge validate --config=configs/smollm.py [--n_prompts=0] [--out=DIR]
  python -m refjax.judge build --config=configs/smollm.py
  python -m refjax.judge rejudge --config=configs/smollm.py --workdir=DIR

`build` prints where the judge is cached (the same cache the `judge` stage uses). `validate`
writes DIR/judge_validation.json (the flagged shares with Wilson intervals, per answer length and
non-answer kind, the keyword judge's beside them, which goals are met) and
DIR/judge_validation_records.jsonl (one verdict per pair: ids and kinds, never the text), and
prints the figures in one line. DIR defaults to the judge's cache folder.

`rejudge` scores the HS answers a finished run saved (DIR/records/<method>.harmful_score.jsonl)
again with this config's judge and the keyword judge, without generating anything: a changed
judge needs no new finetune. It writes DIR/rejudged/<judge folder name>.json (HS with Wilson
intervals per method and judge, the verdicts by id; never a text) and prints a line per method.
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
from refjax.data.judge_pairs import assert_unseen
from refjax.data.paths import set_data_root
from refjax.data.sources import load_source
from refjax.evaluation.harmful_score import score_responses
from refjax.evaluation.judges import RefusalKeywordJudge
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
flags.DEFINE_string("workdir", "", "rejudge: the finished run whose saved answers to score.",
                    flag_values=FLAGS)
COMMANDS = ("build", "validate", "rejudge")
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
    if argv[1] == "rejudge":
      rejudge(judge, where)


def rejudge(judge, where: Path) -> None:
  """HS of every method's saved answers in --workdir, by `judge` and the keyword judge."""
  if not FLAGS.workdir:
    cli.fail("rejudge needs --workdir, a finished run with records/*.harmful_score.jsonl")
  wd = Path(FLAGS.workdir)
  paths = sorted((wd / "records").glob("*.harmful_score.jsonl"))
  if not paths:
    raise files.CorruptFile(f"{wd / 'records'}: no <method>.harmful_score.jsonl to rejudge")
  source = files.read_json(wd / "config.json")["eval"]["hs_source"]
  prompts = {e.id: e.instruction for e in load_source(source)}
  out = {"judge": str(where), "threshold": judge.threshold, "hs_source": source, "methods": {}}
  for path in paths:
    method = path.name.split(".")[0]
    rows = files.read_jsonl(path)
    missing = [r["id"] for r in rows if r["id"] not in prompts]
    if missing:
      raise files.CorruptFile(f"{path}: id {missing[0]!r} is not a prompt of {source!r}")
    ids = [r["id"] for r in rows]
    assert_unseen(judge.trained_prompts, [prompts[i] for i in ids], ids, "HS prompt")
    result = score_responses([prompts[i] for i in ids], [r["response"] for r in rows], judge,
                             ids=ids, extra_judges=[RefusalKeywordJudge()])
    before = sum(bool(r["harmful"]) for r in rows)
    out["methods"][method] = {
        "n": result["n"], "by_judge": result["by_judge"], "saved_n_harmful": before,
        "verdicts": {r["id"]: r["judges"] for r in result["records"]}}
    hs = {k: f"{v['harmful_score']:.1f} [{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}]"
          for k, v in result["by_judge"].items()}
    print(f"{method}: n={result['n']} HS {json.dumps(hs)} (saved verdicts: {before} harmful)")
  target = wd / "rejudged" / f"{where.name}.json"
  files.write_json(target, out)
  print(f"rejudged: {target}")


def run():
  logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING,
                      force=True)
  main(cli.parse_flags(FLAGS, sys.argv))


if __name__ == "__main__":
  run()
