"""Stage `refusal`: the teacher's refusal feature (all layers), its AUROC and separation before and
after teacher training, in and out of distribution, and cosine scores per prompt set for plots.

Reads refusal_base/ and teacher/model; writes refusal/ (feature, auroc.json, cosine_sets.npz).
"""

from __future__ import annotations

import logging

from refjax.files import write_json, write_npz
from refjax.method.features import model_hash, probe_feature, score_batches
from refjax.method.refusal import auroc, separation
from refjax.stages.context import Run
from refjax.stages.workdir import load_refusal_feature, save_refusal_feature

log = logging.getLogger(__name__)


def run(r: Run) -> dict:
  cfg, wd = r.cfg, r.wd
  base_art = load_refusal_feature(r.require(wd.refusal_base, "teacher"))
  layer = base_art.layer
  teacher, _, fmt = r.load(r.require(wd.teacher_model, "teacher"))
  bs = cfg.refusal.batch_size
  probe_b, _ = r.prompt_batches(r.sets.probe(), fmt, bs)
  val = r.sets.validation()
  val_b, val_labels = r.prompt_batches(val, fmt, bs)
  feature, sums, layer_auroc, val_scores = probe_feature(teacher, probe_b, val_b, val_labels)
  save_refusal_feature(wd.refusal, feature, layer, {
      "model_hash": model_hash(teacher), "n_harmful": int(sums.n_harmful),
      "n_harmless": int(sums.n_harmless), "layer_auroc": layer_auroc,
      "model": str(wd.teacher_model)})
  before = base_art.meta["layer_auroc"][layer]
  base, _, _ = r.load(r.start_model)  # the model the base feature was computed on
  models = (("teacher", teacher, feature), ("base", base, base_art.feature))

  def scores(model, feat, batches):  # all layers, then row `layer`: reuses probe_feature's compile
    return score_batches(model, batches, feat, progress=False)[layer]

  ood = r.sets.ood()
  ood_b, ood_labels = r.prompt_batches(ood, fmt, bs)
  ood_scores = {tag: scores(m, f, ood_b) for tag, m, f in models}
  ood_auroc = {tag: float(auroc(s, ood_labels)) for tag, s in ood_scores.items()}
  summary = {"layer": layer, "auroc_base": before, "auroc_teacher": layer_auroc[layer],
             "separation_base": base_art.meta.get("layer_separation", [None] * (layer + 1))[layer],
             "separation_teacher": float(separation(val_scores, val_labels)[layer]),
             "ood_auroc_base": ood_auroc["base"], "ood_auroc_teacher": ood_auroc["teacher"],
             "ood_sets": [cfg.refusal.ood_harmful, cfg.refusal.ood_harmless],
             "layer_auroc_base": base_art.meta["layer_auroc"], "layer_auroc_teacher": layer_auroc}
  write_json(wd.auroc, summary)

  # Cosine scores per prompt set under the teacher and the base model (paper figs. A3/A4): the
  # validation and OOD prompts' are the scores above, split by label (each prompt is run once).
  val_by = {"teacher": val_scores[layer], "base": scores(base, base_art.feature, val_b)}
  task_b = r.prompt_batches(r.sets.task_test(cfg.refusal.n_val), fmt, bs, labelled=False)[0]
  cos = {}
  for tag, m, f in models:
    cos.update({f"{tag}/harmful": val_by[tag][val_labels == 1],
                f"{tag}/harmless": val_by[tag][val_labels == 0],
                f"{tag}/{cfg.data.task}": scores(m, f, task_b),
                f"{tag}/harmful ({cfg.refusal.ood_harmful})": ood_scores[tag][ood_labels == 1]})
  write_npz(wd.cosine_sets, **cos)
  log.info("refusal AUROC at layer %d: base %.4f -> teacher %.4f", layer, before,
           layer_auroc[layer])
  return {"layer": layer, "auroc_base": before, "auroc_teacher": layer_auroc[layer]}
