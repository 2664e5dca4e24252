"""Stage `finetune` (per method): the base model finetuned for one method of `config.method`; the
methods share the teacher and the filter's decisions.

Reads the user data, filter/filter_report.jsonl (filtering methods), teacher/model (distilling
methods) and the alignment set; writes methods/<method>/model/ and finetune.json.
"""

from __future__ import annotations

import logging

import numpy as np
from flax import nnx

from refjax.files import read_jsonl, write_json
from refjax.method.losses import causal_lm_loss
from refjax.method.student import METHODS, TEACHER, student_loss_fn
from refjax.models.loading import param_shardings
from refjax.stages.context import Run
from refjax.training.data import make_iterator
from refjax.training.fit import fit

log = logging.getLogger(__name__)


def keep_weights(r: Run, user, fmt) -> np.ndarray:
  """1/0 per user example from the filter's recorded decisions (0 = dropped). A decision binds to
  the exact text scored: a row whose text has no decision (changed under its id, or never seen)
  is refused, never trained under an old decision."""
  path = r.require(r.wd.filter_report, "filter")
  decided = {(row["id"], row["text_sha256"]): bool(row["kept"]) for row in read_jsonl(path)
             if "text_sha256" in row}
  keys = [(e.id, fmt.scored_digest(e.instruction, e.input, e.response)) for e in user]
  missing = [k[0] for k in keys if k not in decided]
  if missing:
    raise ValueError(f"{path} has no decision for the current text of {len(missing)} user "
                     f"examples (e.g. id {missing[0]!r}): the user data changed since the filter "
                     "ran; rerun it (--force=filter)")
  return np.array([decided[k] for k in keys], np.float32)


def finetune(r: Run, name: str) -> dict:
  cfg, wd = r.cfg, r.wd
  method, fc = METHODS[name], cfg.finetune
  out = wd.method(name)
  model, tok, fmt = r.load()
  user = r.sets.user()
  arrays = r.training_arrays(user, fmt)
  kept = len(user)
  if method.filter:  # dropped examples stay in the data with weight 0: shapes never change
    arrays["weights"] = keep_weights(r, user, fmt)
    kept = int(arrays["weights"].sum())
  batch, seed = int(fc.train.batch_size), int(fc.train.seed)

  if method.pre_align:  # sa_ft: plain CE alignment of the base model first
    data, sh = make_iterator(r.training_arrays(r.sets.alignment(), fmt), r.plan, batch, seed)
    model, _ = fit(fc, out / "align", model, causal_lm_loss, data, sh, r.plan)
    r.drop_checkpoints(out / "align", fc.train.keep_checkpoints)

  weights = method.weights(fc)
  align, align_rows = None, 0
  if method.uses_alignment_rows:
    align = r.training_arrays(r.sets.alignment(), fmt)
    align_rows = max(1, int(round(float(fc.align_ratio) * batch)))
  extras, extra_sh, teacher_graphdef = {}, {}, None
  if weights["kd"]:
    teacher, _, _ = r.load(r.require(wd.teacher_model, "teacher"))
    teacher_graphdef, t_state = nnx.split(teacher)
    extras[TEACHER], extra_sh[TEACHER] = t_state, param_shardings(r.plan, teacher.cfg)
  data, sh = make_iterator(arrays, r.plan, batch, seed, align, align_rows)
  loss_fn = student_loss_fn(align_rows, kd=weights["kd"], align_ce=weights["align_ce"],
                            kd_temperature=float(fc.kd_temperature),
                            kd_direction=fc.kd_direction, teacher_graphdef=teacher_graphdef)
  trained, result = fit(fc, out, model, loss_fn, data, sh, r.plan, extras=extras,
                        extra_shardings=extra_sh)
  r.export(trained, tok, wd.method_model(name))
  summary = {"method": name, "steps": result.step, "final_loss": result.metrics.get("loss"),
             "user_examples": len(user), "user_examples_kept": kept, "align_rows": align_rows,
             "weights": weights}
  write_json(wd.method_summary(name), summary)
  r.drop_checkpoints(out, fc.train.keep_checkpoints)  # last: a kill here loses nothing
  return summary
