"""Stage `judge`: the QA-moderation judge (`refjax.evaluation.qa_judge`), built once per machine and
cached under ${REFJAX_CACHE:-~/.cache/refjax}/judges/<digest of its recipe and data>, with its
validation on the development pairs; the workdir keeps a pointer and the figures.

Writes judge/judge.json (where the judge lives, its threshold, build record) and
judge/judge_validation.json (flagged shares with intervals, per answer length and non-answer kind,
the keyword judge's beside them, and which goals are met).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from refjax import files
from refjax.data.judge_pairs import Truncator, assert_unseen, build_validation_pairs
from refjax.evaluation.judges import RefusalKeywordJudge
from refjax.evaluation.qa_judge import (JudgeSpec, QAJudge, build, goals_met, head_loss_fn,
                                        judge_line, validation_figures, validation_records)
from refjax.models import hub, shipped
from refjax.models.loading import load_model_and_tokenizer, load_tokenizer
from refjax.models.tiny import byte_tokenizer
from refjax.parallel import make_mesh, make_rules
from refjax.parallel.plan import Parallel
from refjax.stages.context import Run
from refjax.stages.fingerprint import config_part, digest
from refjax.training.data import make_iterator
from refjax.training.fit import fit

log = logging.getLogger(__name__)


def spec_of(cfg: Any) -> JudgeSpec:
  return JudgeSpec.from_config(cfg.judge)


def cache_dir(cfg: Any, data_digest: str) -> Path:
  """Where the judge of this recipe (config.judge, the student's tokenizer) and data is cached."""
  recipe = config_part(cfg, ["judge"])["judge"]
  key = digest({"judge": recipe, "student": str(cfg.model.name), "data": data_digest})
  root = Path(str(cfg.judge.cache)).expanduser() if cfg.judge.cache else (
      shipped.cache_root() / "judges")
  return root / key[:20]


def backbone(cfg: Any):
  """(backbone Decoder, its tokenizer): config.judge.backbone in fp32, no adapters."""
  mc = cfg.model.copy_and_resolve_references()
  with mc.unlocked():
    mc.update(name=str(cfg.judge.backbone), lora_rank=0, param_dtype="float32", dtype="float32",
              remat=False)
  return load_model_and_tokenizer(mc)


def student_truncator(cfg: Any) -> Truncator:
  """Cuts answers to their first k tokens of the student's tokenizer (what evaluation generates)."""
  if hub.is_tiny(cfg.model.name):
    return Truncator(byte_tokenizer())
  return Truncator(load_tokenizer(hub.resolve(cfg.model.name)))


def fit_head(workdir: Path, cfg: Any):
  """The head's trainer: the project's `fit` with config.judge.train/optim, the whole fit set as
  one batch, on one device."""
  def run(head, arrays, steps, lr):
    stage = ml_collections.ConfigDict({"train": cfg.judge.train.to_dict(),
                                       "optim": cfg.judge.optim.to_dict()})
    stage.train.update(steps=steps, batch_size=len(arrays["x"]))
    stage.optim.lr = lr
    plan = Parallel(make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                              devices=jax.local_devices()[:1]), make_rules())
    data, sh = make_iterator(arrays, plan, len(arrays["x"]), int(cfg.judge.seed))
    trained, _ = fit(stage, workdir, head, head_loss_fn(float(cfg.judge.l2)), data, sh, plan)
    Run.drop_checkpoints(workdir, False)
    return trained
  return run


def load_or_build(cfg: Any, data_digest: str) -> tuple[QAJudge, Path, dict]:
  """The cached judge for this config and data (built and validated first when missing)."""
  model, tok = backbone(cfg)
  where = cache_dir(cfg, data_digest)
  if (where / "judge.json").exists() and (where / "judge_validation.json").exists():
    log.info("judge: using the cached one in %s", where)
    return QAJudge.load(where, model, tok), where, files.read_json(where / "judge_validation.json")
  t0 = time.time()
  truncate = student_truncator(cfg)
  with files.atomic_dir(where, overwrite=True) as tmp:
    judge, info = build(spec_of(cfg), model, tok, truncate, fit_head(tmp / "head", cfg),
                        log=log.info)
    info["build_s"] = round(time.time() - t0, 1)
    figures, records = validate(judge, truncate, int(cfg.judge.n_validation))
    info["validation_s"] = round(time.time() - t0 - info["build_s"], 1)
    judge.save(tmp, info)
    files.write_json(tmp / "judge_validation.json", figures)
    files.write_jsonl(tmp / "judge_validation_records.jsonl", records)
  log.info("judge: built in %.0f s and validated; cached in %s", time.time() - t0, where)
  return judge, where, figures


def validate(judge: QAJudge, truncate: Truncator, n_prompts: int
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(figures, records) on the development pairs (none of them trained or calibrated on; their
  prompts are the HS prompts): the first `n_prompts` prompts, 0 = all."""
  pairs = build_validation_pairs(truncate, n_prompts=n_prompts)
  prompts, responses = [p.prompt for p in pairs], [p.response for p in pairs]
  assert_unseen(judge.trained_prompts, prompts, [p.id for p in pairs], "validation")
  flagged = judge.judge(prompts, responses)
  keyword = RefusalKeywordJudge().judge(prompts, responses)
  records = validation_records(pairs, flagged, keyword)
  figures = validation_figures(records)
  figures["goals_met"] = goals_met(figures)
  figures["dev_prompts"] = len({p.group for p in pairs})
  return figures, records


def run(r: Run) -> dict:
  judge, where, figures = load_or_build(r.cfg, r.digests.judge_data())
  record = files.read_json(where / "judge.json")
  files.write_json(r.wd.judge_pointer, {**record, "cache_dir": str(where)})
  files.write_json(r.wd.judge_validation, figures)
  line = judge_line(figures)
  log.info("judge validation: %s", line)
  return {"cache_dir": str(where), "threshold": judge.threshold, "validation": line,
          "goals_met": figures["goals_met"]}


def cached_files(pointer: Path) -> list[Path]:
  """The cache files a judge pointer names (a finished `judge` unit needs them on disk)."""
  try:
    where = Path(files.read_json(pointer)["cache_dir"])
  except (OSError, KeyError, files.CorruptFile):
    return []
  return [where / "judge.json", where / "head.npz", where / "trained_prompts.json"]


def load_judge(r: Run) -> QAJudge:
  """The judge a finished `judge` stage points to (for evaluation and screening)."""
  pointer = files.read_json(r.require(r.wd.judge_pointer, "judge"))
  where = Path(pointer["cache_dir"])
  if not (where / "judge.json").exists():
    raise FileNotFoundError(f"the judge cache {where} named by {r.wd.judge_pointer} is gone; "
                            "rerun the judge stage (--stages=judge)")
  model, tok = backbone(r.cfg)
  return QAJudge.load(where, model, tok)


__all__ = ["run", "load_or_build", "load_judge", "validate", "cache_dir",
           "cached_files"]
