"""Per-layer AUROC of the plain difference-of-means refusal feature on a real model.

Fits R_l on harmful_train vs a slice of harmless_train (chat template, last prompt token), then
scores a labelled dev pool: harmful_val + the processed_* harmful sets minus anything in
harmful_train (after normalisation), deduplicated, vs a harmless_val slice. Prints counts and
figures only, never prompt text.

  PYTHONPATH=. python benchmarks/refusal_auroc.py [--model smollm2-135m-instruct] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
from refjax.data import batches as batch_lib
from refjax.data.prompts import PromptConfig, PromptFormat
from refjax.data.sources import load_source
from refjax.method import features
from refjax.method import refusal


DEV_HARMFUL = ("harmful_val", "advbench", "malicious_instruct", "tdc2023", "harmbench")


def normalise(text: str) -> str:
  """ASSETS.md's normalisation: lowercase, collapse whitespace, strip, strip trailing .?!"""
  return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".?!")


def dev_pool(fit_harmful, n_harmless: int, skip_harmless: set[str]):
  """Harmful dev prompts not in the fit set (deduplicated) and a harmless_val slice."""
  seen = {normalise(e.instruction) for e in fit_harmful}
  harmful = []
  for name in DEV_HARMFUL:
    for e in load_source(name):
      key = normalise(e.instruction)
      if key not in seen:
        seen.add(key)
        harmful.append(e)
  harmless = [e for e in load_source("harmless_val")
              if normalise(e.instruction) not in skip_harmless]
  return harmful, harmless[:n_harmless]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m-instruct",
                 help="registry name, HF dir or hub id (refjax.models.weights.load_hf_dir)")
  p.add_argument("--n_fit_harmless", type=int, default=257, help="harmless_train prompts for R_l")
  p.add_argument("--n_dev_harmless", type=int, default=500, help="harmless_val prompts in the pool")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_len", type=int, default=256, help="prompt tokens (cut from the left)")
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  args = p.parse_args(argv)

  from transformers import AutoTokenizer

  from refjax.models.hub import resolve as resolve_hf_dir
  from refjax.models.weights import load_hf_dir

  model_dir = resolve_hf_dir(args.model)
  model, cfg = load_hf_dir(model_dir)
  fmt = PromptFormat(AutoTokenizer.from_pretrained(str(model_dir)), PromptConfig(template="chat"))

  fit_h = load_source("harmful_train")
  fit_n = load_source("harmless_train", limit=args.n_fit_harmless)
  dev_h, dev_n = dev_pool(fit_h, args.n_dev_harmless, {normalise(e.instruction) for e in fit_n})
  # One forward pass per prompt: every layer's feature, then all statistics in numpy.
  examples = fit_h + fit_n + dev_h + dev_n
  t0 = time.perf_counter()
  batches = batch_lib.prompt_batches(examples, fmt, batch_size=args.batch_size, max_len=args.max_len)
  feats = features.extract_features(model, batches)  # [L+1, N, D]
  secs = time.perf_counter() - t0

  a, b = len(fit_h), len(fit_h) + len(fit_n)
  sums = refusal.class_sums(feats[:, :b], np.ones(b), np.arange(b) < a)
  feature = np.asarray(refusal.refusal_feature(sums))  # [L+1, D]
  dev = feats[:, b:]
  dev_labels = np.r_[np.ones(len(dev_h), int), np.zeros(len(dev_n), int)]
  dev_scores = np.asarray(refusal.cosine_scores(dev, feature))  # [L+1, N_dev]
  auroc_dev = refusal.auroc(dev_scores[1:], dev_labels)  # layer 0 has no signal (same last token)
  # harmful_val's prompts alone vs the same harmless slice, as in ENV.md.
  is_val = np.array([e.source == "harmful_val" for e in dev_h])
  n_val = int(is_val.sum())
  val_idx = np.r_[np.flatnonzero(is_val), len(dev_h) + np.arange(len(dev_n))]
  auroc_val = refusal.auroc(dev_scores[1:, val_idx], dev_labels[val_idx])
  per_dev = [None] + [float(x) for x in auroc_dev]
  per_val = [None] + [float(x) for x in auroc_val]
  layer = refusal.choose_layer([np.nan] + list(auroc_dev), (1, len(auroc_dev)))
  result = {
      "model": str(model_dir), "model_hash": features.model_hash(model),
      "position": refusal.POSITION_RULE, "template": "chat",
      "n_fit": {"harmful": len(fit_h), "harmless": len(fit_n)},
      "n_dev": {"harmful": len(dev_h), "harmless": len(dev_n), "harmful_val": n_val},
      "layer_auroc_dev": per_dev, "layer_auroc_harmful_val": per_val,
      "selected_layer_dev": layer, "auroc_dev_at_selected": per_dev[layer],
      "auroc_harmful_val_at_selected": per_val[layer],
      "best_layer_harmful_val": int(1 + np.argmax(auroc_val)),
      "prompts_per_second": len(examples) / secs,
  }
  print(f"fit: {len(fit_h)} harmful / {len(fit_n)} harmless; dev pool: {len(dev_h)} harmful "
        f"(of which harmful_val {n_val}) / {len(dev_n)} harmless; "
        f"{len(examples) / secs:.1f} prompts/s")
  print("layer  AUROC(dev pool)  AUROC(harmful_val vs harmless)")
  for l in range(1, cfg.num_layers + 1):
    mark = "  <- selected" if l == layer else ""
    print(f"{l:5d}  {per_dev[l]:.4f}           {per_val[l]:.4f}{mark}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
