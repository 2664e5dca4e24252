"""Stage `teacher`: the start model's refusal feature and layer choice, then Ref-Teacher training.

Reads the start model and the alignment/probe sets; writes refusal_base/, teacher/model/,
teacher/refusal_updates.json and teacher/alignment_set.json.
"""

from __future__ import annotations

import dataclasses
import logging

from refjax.files import read_jsonl, write_json, write_jsonl
from refjax.method.features import model_hash, probe
from refjax.method.losses import logit_slots, target_counts
from refjax.method.refusal import choose_layer, layer_window, separation
from refjax.method.teacher import (FEATURE, feature_placeholder, refusal_update_hook,
                                   teacher_loss_fn)
from refjax.stages.context import Run
from refjax.stages.workdir import save_refusal_feature
from refjax.training.data import make_iterator
from refjax.training.fit import fit, train_graphdef

log = logging.getLogger(__name__)


def run(r: Run) -> dict:
  cfg, wd = r.cfg, r.wd
  model, tok, fmt = r.load(r.start_model)
  probe_b, _ = r.prompt_batches(r.sets.probe(), fmt, cfg.refusal.batch_size)
  val_b, val_labels = r.prompt_batches(r.sets.validation(), fmt, cfg.refusal.batch_size)

  start = probe(model, probe_b, val_b, val_labels)
  feature, sums, layer_auroc, val_scores = (start.feature, start.sums, start.layer_auroc,
                                            start.val_scores)
  layer_sep = separation(val_scores, val_labels)
  window = layer_window(tuple(cfg.refusal.layer_range), len(layer_auroc))
  layer = (int(cfg.refusal.layer) if cfg.refusal.layer >= 0
           else choose_layer(layer_auroc, window, layer_sep))
  if not 0 < layer < len(layer_auroc):
    raise ValueError(f"config.refusal.layer={layer}; expected 1..{len(layer_auroc) - 1}")
  save_refusal_feature(wd.refusal_base, feature, layer, {
      "model_hash": model_hash(model), "n_harmful": int(sums.n_harmful),
      "n_harmless": int(sums.n_harmless), "layer_auroc": layer_auroc, "layer_range": window,
      "model": r.start_model or cfg.model.name,
      "probe": [cfg.refusal.probe_harmful, cfg.refusal.probe_harmless],
      "validation": [cfg.refusal.val_harmful, cfg.refusal.val_harmless],
      "layer_separation": layer_sep})
  log.info("base refusal feature: layer %d, AUROC %.4f", layer, layer_auroc[layer])

  tc = cfg.teacher
  examples = r.sets.alignment()
  arrays = r.training_arrays(examples, fmt)
  data, batch_sh = make_iterator(arrays, r.plan, int(tc.train.batch_size), int(tc.train.seed))
  history = wd.teacher / "refusal_updates.jsonl"

  def keep(rec: dict) -> None:  # a resumed run replaces the records past its checkpoint
    rows = read_jsonl(history, torn_tail_ok=True) if history.exists() else []
    write_jsonl(history, [row for row in rows if row["step"] < rec["step"]] + [rec])

  hook = refusal_update_hook(train_graphdef(model), layer, probe_b, val_b, val_labels,
                             int(tc.refusal_update_every), keep, start=start)
  slots = None
  if float(tc.target_logits) < 1:
    slots = logit_slots(target_counts(arrays), int(tc.train.batch_size),
                        arrays["tokens"].shape[1], float(tc.target_logits))
    log.info("teacher: logits at response positions only, %d slots per step of %d", slots,
             int(tc.train.batch_size) * arrays["tokens"].shape[1])
  loss_fn = teacher_loss_fn(layer, float(tc.reg_weight), tc.reg_form, float(tc.reg_margin),
                            logit_slots=slots)
  trained, result = fit(tc, wd.teacher, model, loss_fn, data, batch_sh, r.plan,
                        extras={FEATURE: feature_placeholder(model)},
                        extra_shardings={FEATURE: r.plan.replicated},
                        checkpoint_extras=(FEATURE,), hooks=(hook,))
  r.export(trained, tok, wd.teacher_model)
  r.drop_checkpoints(wd.teacher, tc.train.keep_checkpoints)
  updates = read_jsonl(history)
  write_json(wd.refusal_updates, updates)
  write_json(wd.alignment_set, {"report": dataclasses.asdict(r.sets.alignment_report()),
                                "ids": [e.id for e in examples]})
  return {"layer": layer, "base_auroc": layer_auroc[layer], "steps": result.step,
          "logit_slots": slots if slots is not None else "every position",
          "final_loss": result.metrics.get("loss"), "refusal_updates": len(updates),
          "n_alignment": len(examples)}
