"""Ref-Teacher preparation: alignment cross-entropy plus a cosine regulariser toward R_l.

loss = CE(alignment responses) + reg_weight * reg(cos(f_l(x), R_l), y), y = +1 harmful / -1
harmless. R_l is a frozen step input (`extras["refusal_feature"]`); a hook recomputes it from a
fixed probe set with the current parameters every `refusal_update_every` steps (the paper's
dynamic update) and logs the probe cosines and the validation AUROC.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from refjax.method.features import Probe, probe
from refjax.method.losses import (TINY, cosine_regulariser, mean_cross_entropy, nll_from_logits,
                                  safe_mean, shifted_targets, sum_at_targets, target_weights)
from refjax.method.refusal import cosine_scores
from refjax.training.loop import HookResult, StepHook

FEATURE = "refusal_feature"  # the step input the loss reads and the hook replaces


def teacher_loss_fn(layer: int, reg_weight: float, reg_form: str = "one_minus_cos",
                    margin: float = 0.5, logit_slots: int | None = None):
  """loss_fn(model, batch, rng, extras) for the shared train step; extras[FEATURE] is R_l [D].

  Batch: tokens, attention_mask, loss_mask, weights, last_prompt_index [B], labels_sign [B]
  (+1 harmful, -1 harmless, 0 = no regulariser for this row). The features come from the same
  forward pass as the logits (hidden state after block `layer` at the last prompt token).
  `logit_slots`: the LM head runs only at the response positions, gathered into that many slots
  (`losses.sum_at_targets`; a step with more targets takes every position); None = everywhere.
  Both give the same loss.
  """

  def cross_entropy(model, out, batch):
    if logit_slots is None:
      return mean_cross_entropy(out.logits, batch["tokens"], batch["loss_mask"],
                                batch["weights"])[0]
    w = target_weights(batch["loss_mask"], batch["weights"])
    targets = shifted_targets(batch["tokens"]).reshape(-1)
    total, _ = sum_at_targets(out.final, w,
                              lambda h, i: nll_from_logits(model.logits(h), targets[i]),
                              logit_slots)
    return total / jnp.maximum(jnp.sum(w), TINY)

  def loss_fn(model, batch, rng, extras):
    del rng
    feature = extras[FEATURE]
    out = model(batch["tokens"], batch["attention_mask"],
                hidden_positions=batch["last_prompt_index"], return_logits=logit_slots is None)
    ce = cross_entropy(model, out, batch)
    feats = out.hidden[layer].astype(jnp.float32)
    sign = batch["labels_sign"]
    w = batch["weights"].astype(jnp.float32) * (sign != 0)
    reg = cosine_regulariser(feats, feature, sign, w, form=reg_form, margin=margin)
    cos = cosine_scores(feats, jax.lax.stop_gradient(feature))
    aux = {"ce": ce, "reg": reg, "reg/cos_harmful": safe_mean(cos, w * (sign > 0)),
           "reg/cos_harmless": safe_mean(cos, w * (sign < 0))}
    return ce + reg_weight * reg, aux

  return loss_fn


def update_record(step: int, p: Probe, layer: int) -> dict:
  """What one refusal update logs: the probe prompts' mean cosine per class, the validation AUROC
  and the norm of R_l, at `layer`."""
  scores = p.probe_scores[layer]
  return {"step": step,
          "probe_cos_harmful": float(scores[p.probe_labels == 1].mean()),
          "probe_cos_harmless": float(scores[p.probe_labels == 0].mean()),
          "val_auroc": float(p.layer_auroc[layer]),
          "feature_norm": float(np.linalg.norm(p.feature[layer]))}


def refusal_update_hook(graphdef: nnx.GraphDef, layer: int, probe_batches: Sequence[dict],
                        val_batches: Sequence[dict], val_labels: np.ndarray, every: int,
                        on_update: Callable[[dict], None] | None = None,
                        start: Probe | None = None) -> StepHook:
  """Every `every` steps: R_l from the probe set with the current parameters (no gradient).

  Logs the probe-set harmful/harmless cosine means and the AUROC of R_l on the validation prompts;
  hands each update's record to `on_update` (the stage keeps the history across resumes).
  `start`: the stage's own probe of the start model, which is step 0's (not computed twice).
  """

  def fn(step: int, state, extras) -> HookResult:
    if step == 0 and start is not None:
      p = start
    else:
      # All layers, then row `layer`: the same jitted functions and shapes as the stage's own
      # probe, so the hook compiles nothing new (each compile of a full forward pass costs
      # XLA:CPU hundreds of MB that the allocator keeps; research-filter saw the teacher process
      # grow to 12-15 GB RSS).
      p = probe(nnx.merge(graphdef, state.params, state.frozen), probe_batches, val_batches,
                val_labels, progress=False)
    rec = update_record(step, p, layer)
    if on_update is not None:
      on_update(rec)
    return HookResult(extras={FEATURE: jnp.asarray(p.feature[layer])},
                      metrics={k: v for k, v in rec.items() if k != "step"})

  return StepHook(every=every, fn=fn, name="refusal")


def feature_placeholder(model: Any) -> jax.Array:
  """Zeros [D]: the step input's shape before the first (step-0) refusal update fills it."""
  return jnp.zeros((model.cfg.hidden_size,), jnp.float32)


__all__ = ["teacher_loss_fn", "update_record", "refusal_update_hook", "feature_placeholder",
           "FEATURE"]
