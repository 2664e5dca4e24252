"""The filter on its own: a prepared teacher (the workdir of a run that finished its `filter`
stage) screens any user data set, and writes the kept set and the per-example decisions, so the
boundary can be run and audited without the finetuning stages.

  python -m refjax.filter --teacher WORKDIR --data FILE.jsonl --out DIR [--threshold T]

FILE.jsonl holds Alpaca triplets ({"instruction", "input", "response"}) or {"prompt", "response"}
rows. DIR gets kept.jsonl (the kept rows, as given), filter_report.jsonl (id, score, decision,
sha256 of the text scored; never the text) and filter_summary.json. The threshold is the run's
calibrated one unless --threshold is given; the scorer is the run's `filter.scorer` (cosine with
R_l, or the probe the stage fitted: filter/logistic_probe.npz), so the decisions equal the
stage's for the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from refjax.config_json import from_dict
from refjax.data.paths import set_data_root
from refjax.data.records import DataError, FieldMap, iter_file_records, read_examples
from refjax.files import read_json, write_jsonl
from refjax.method.filtering import apply_filter
from refjax.stages.context import Run
from refjax.stages.scorer import Scorer
from refjax.stages.workdir import Workdir

TRIPLET = FieldMap(instruction="instruction", input="input", response="response")
PROMPT = FieldMap(instruction="prompt", response="response")


def fields_of(path: Path) -> FieldMap:
  """The field mapping of a user file, from its first row's keys."""
  for where, record in iter_file_records(path):
    if "instruction" in record:
      return TRIPLET if "input" in record else FieldMap(instruction="instruction",
                                                          response="response")
    if "prompt" in record:
      return PROMPT
    raise DataError(f"{where}: expected 'instruction' (+ 'input', 'response') or 'prompt' "
                    f"(+ 'response') fields; the row has {sorted(record)}")
  raise DataError(f"{path}: no rows")


def screen(teacher: Path, data: Path, out: Path, threshold: float | None = None) -> dict:
  """Scores every row of `data` with the teacher of workdir `teacher`; writes `out`."""
  wd = Workdir(teacher)
  cfg = from_dict(read_json(wd.config_json))
  set_data_root(cfg.data.root)
  if threshold is None:
    threshold = float(read_json(wd.filter_summary)["threshold"])
  examples, _ = read_examples(data, fields_of(data), source=data.stem, id_prefix=data.stem)
  score = Scorer(Run(cfg, wd))
  scores = score(examples)
  keep = apply_filter(examples, scores, threshold)
  out.mkdir(parents=True, exist_ok=True)
  summary = score.write(out / "filter_report.jsonl", out / "filter_summary.json", examples,
                        scores, keep, threshold)
  rows = [record for _, record in iter_file_records(data)]
  write_jsonl(out / "kept.jsonl", [row for row, k in zip(rows, keep) if k])
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m refjax.filter", description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, type=Path, help="workdir of a run with a filter")
  p.add_argument("--data", required=True, type=Path, help="user data (.jsonl/.json/.csv/.parquet)")
  p.add_argument("--out", required=True, type=Path, help="folder for the kept set and the report")
  p.add_argument("--threshold", type=float, default=None, help="default: the run's calibrated one")
  args = p.parse_args(argv)
  try:
    s = screen(args.teacher, args.data, args.out, args.threshold)
  except (DataError, FileNotFoundError, ValueError) as e:
    print(f"refjax.filter: error: {e}", file=sys.stderr)
    return 1
  print(f"{s['n_kept']} of {s['n_examples']} kept, {s['n_dropped']} dropped (threshold "
        f"{s['threshold']:.4f}); {args.out}/kept.jsonl, {args.out}/filter_report.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
