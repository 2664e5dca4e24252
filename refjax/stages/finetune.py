"""Stage `finetune` (per method): the base model finetuned for one method of `config.method`; the
methods share the teacher and the filter's decisions.

Reads the user data, filter/filter_report.jsonl or screen/screen_report.jsonl (filtering methods),
distill/ or teacher/model (distilling methods) and the alignment set; writes
methods/<method>/model/ and finetune.json.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flax import nnx

from refjax.data.packing import Packed, pack
from refjax.files import read_jsonl, write_json
from refjax.method.losses import causal_lm_loss, logit_slots, target_counts
from refjax.method.student import ALIGN, METHODS, TEACHER, student_loss_fn
from refjax.models.loading import param_shardings
from refjax.stages.alignment_rows import (align_rows_per_step, drawn_alignment, encode_alignment,
                                          epoch_steps, shared_prefix)
from refjax.stages.context import Run
from refjax.stages.distill import dense_targets
from refjax.training.data import make_grouped_iterator, make_iterator
from refjax.training.fit import fit

log = logging.getLogger(__name__)


DECISIONS = {"teacher": ("filter_report", "filter"), "judge": ("screen_report", "screen")}


def keep_weights(r: Run, user, fmt, by: str = "teacher") -> np.ndarray:
  """1/0 per user example from the recorded decisions of `by` (the teacher's filter or the judge's
  screen; 0 = dropped). A decision binds to the exact text scored: a row whose text has no
  decision (changed under its id, or never seen) is refused, never trained under an old one."""
  attr, stage = DECISIONS[by]
  path = r.require(getattr(r.wd, attr), stage)
  decided = {(row["id"], row["text_sha256"]): bool(row["kept"]) for row in read_jsonl(path)
             if "text_sha256" in row}
  keys = [(e.id, fmt.scored_digest(e.instruction, e.input, e.response)) for e in user]
  missing = [k[0] for k in keys if k not in decided]
  if missing:
    raise ValueError(f"{path} has no decision for the current text of {len(missing)} user "
                     f"examples (e.g. id {missing[0]!r}): the user data changed since the "
                     f"{stage} stage ran; rerun it (--force={stage})")
  return np.array([decided[k] for k in keys], np.float32)


def finetune(r: Run, name: str) -> dict:
  cfg, wd = r.cfg, r.wd
  method, fc = METHODS[name], cfg.finetune
  out = wd.method(name)
  model, tok, fmt = r.load(lora_rank=None if fc.lora_rank < 0 else fc.lora_rank)
  user = r.sets.user()
  weights = (keep_weights(r, user, fmt, method.filter) if method.filter
             else np.ones(len(user), np.float32))
  max_len, rows_len, seed = int(fc.max_len), int(fc.pack_len), int(fc.train.seed)
  enc_user = [fmt.encode(e.instruction, e.input, e.response, max_len=max_len) for e in user]
  packed_user = pack(enc_user, weights, rows_len, fmt.pad_id, seed=seed,
                     shared_prefix=shared_prefix(fc, enc_user))
  batch = int(fc.train.batch_size)
  stats = {"user": _stats(packed_user, enc_user, max_len)}

  if method.pre_align:  # sa_ft: plain CE alignment of the base model first, one group of rows
    enc_a = encode_alignment(r, fmt)
    packed_a = pack(enc_a, np.ones(len(enc_a)), rows_len, fmt.pad_id, seed=seed,
                    shared_prefix=shared_prefix(fc, enc_a))
    stats["align"] = _stats(packed_a, enc_a, max_len)
    phase = _with_steps(fc, epoch_steps(fc, packed_a.rows, batch))
    data, sh = make_iterator(_rows(packed_a), r.plan, batch, seed)
    model, _ = fit(phase, out / "align", model, causal_lm_loss, data, sh, r.plan)
    r.drop_checkpoints(out / "align", fc.train.keep_checkpoints)

  terms = method.weights(fc)
  groups = {"": (_rows(packed_user), batch)}
  if method.uses_alignment_rows:
    align_rows = align_rows_per_step(fc)
    groups[""] = (_rows(packed_user), batch - align_rows)
    index, enc_a, drawn = drawn_alignment(r, fmt)  # the examples `distill` made targets for
    extra = None
    if terms["kd"] and int(fc.kd_topk) > 0:  # the teacher's cached targets ride on the tokens
      extra = dense_targets(r, enc_a, [r.sets.alignment()[i].id for i in index])
    packed_a = pack(enc_a, np.ones(len(enc_a)), rows_len, fmt.pad_id, seed=seed, extra=extra,
                    shared_prefix=drawn["shared_prefix"])
    stats["align"] = {**_stats(packed_a, enc_a, max_len), "examples_of": drawn["of"]}
    groups[ALIGN] = (_rows(packed_a), align_rows)
  extras, extra_sh, teacher_graphdef = {}, {}, None
  if terms["kd"] and int(fc.kd_topk) == 0:  # exact KD: the frozen teacher runs in the step
    teacher, _, _ = r.load(r.require(wd.teacher_model, "teacher"))
    teacher_graphdef, t_state = nnx.split(teacher)
    extras[TEACHER], extra_sh[TEACHER] = t_state, param_shardings(r.plan, teacher.cfg)
  steps = epoch_steps(fc, packed_user.rows, groups[""][1])
  data, sh = make_grouped_iterator(groups, r.plan, seed)
  slots = None
  if float(fc.target_logits) < 1:
    slots = {k: logit_slots(target_counts(rows), n, rows["tokens"].shape[1],
                            float(fc.target_logits)) for k, (rows, n) in groups.items()}
    log.info("finetune[%s]: logits at target positions only, slots per step %s", name,
             {k or "user": f"{v} of {groups[k][1] * groups[k][0]['tokens'].shape[1]}"
              for k, v in slots.items()})
  loss_fn = student_loss_fn(kd=terms["kd"], align_ce=terms["align_ce"],
                            kd_temperature=float(fc.kd_temperature),
                            kd_direction=fc.kd_direction, teacher_graphdef=teacher_graphdef,
                            logit_slots=slots)
  trained, result = fit(_with_steps(fc, steps), out, model, loss_fn, data, sh, r.plan,
                        extras=extras, extra_shardings=extra_sh)
  r.export(trained, tok, wd.method_model(name))
  summary = {"method": name, "steps": result.step, "final_loss": result.metrics.get("loss"),
             "lora_rank": int(model.cfg.lora_rank), "user_examples": len(user),
             "user_examples_kept": int((weights > 0).sum()),
             "epochs": steps * groups[""][1] / max(packed_user.rows, 1),
             "rows_per_step": {k or "user": v[1] for k, v in groups.items()},
             "kd": ("cached top-%d targets" % int(fc.kd_topk) if int(fc.kd_topk) else
                    "exact (teacher in the step)") if terms["kd"] else None,
             "weights": terms, "packing": stats,
             "logit_slots": {k or "user": v for k, v in slots.items()} if slots
             else "every position"}
  write_json(wd.method_summary(name), summary)
  r.drop_checkpoints(out, fc.train.keep_checkpoints)  # last: a kill here loses nothing
  return summary


def _rows(packed: Packed) -> dict[str, np.ndarray]:
  """Packed rows as training arrays (each row weight 1: example weights ride on loss_mask)."""
  return {**packed.arrays, "weights": np.ones(packed.rows, np.float32)}


def _with_steps(fc, steps: int):
  out = fc.copy_and_resolve_references()
  with out.unlocked():
    out.train.steps = int(steps)
  return out


def _stats(packed: Packed, enc, max_len: int) -> dict[str, Any]:
  """What packing did: rows, padding before (one example per max_len row) and after."""
  real = sum(len(e.ids) for e in enc)
  return {"examples": len(enc), "packed_examples": packed.examples, "rows": packed.rows,
          "truncated": int(sum(e.truncated for e in enc)), "max_len": max_len,
          "padding_unpacked": round(1 - real / (len(enc) * max_len), 4) if enc else None,
          "padding_packed": round(packed.padding, 4), "shared_prefix": packed.shared_prefix,
          "tokens": int(packed.real_tokens)}
