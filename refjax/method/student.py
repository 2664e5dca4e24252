"""Student finetuning: the table of methods, and the one loss every method trains with.

loss = CE(user rows) + kd * T² KL(teacher ‖ student)(alignment response tokens)
       + align_ce * CE(alignment rows)
Each method is one `Method` entry: what it does to the data (filter the user data, align first)
and the weights of its loss terms. A batch holds user rows and, under `align_*` keys, alignment
rows (each group its own length; packed rows carry segment ids). The teacher's distribution is
read from cached top-k targets in the batch, or from the frozen teacher itself, a named step input
(`extras["teacher"]`: sharded, never donated, no optimizer state, under stop_gradient) run on the
alignment rows only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from refjax.method.losses import (TINY, kd_exact_kl, kd_loss, kd_topk_kl, kd_topk_loss,
                                   mean_cross_entropy, nll_from_logits, shifted_targets,
                                   sum_at_targets, target_weights)

TEACHER = "teacher"  # the step input holding the frozen teacher's state

Weight = float | str  # a constant, or the name of a `config.finetune` field holding it


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the comparison: its data handling and the weights of its loss terms."""

  name: str
  about: str  # one line for reports and the README
  # Whose decisions drop user examples (weight 0): None, "teacher" (the refusal-feature filter,
  # stage `filter`) or "judge" (the QA-moderation judge's screen of each pair, stage `screen`).
  filter: str | None = None
  pre_align: bool = False  # CE-align the base model on the alignment data first (sa_ft)
  kd: Weight = 0.0  # weight of the distillation KL on the alignment rows
  align_ce: Weight = 0.0  # weight of CE on the alignment rows

  def weights(self, finetune: Mapping[str, Any]) -> dict[str, float]:
    """{"kd": ..., "align_ce": ...} with config-field names resolved against `config.finetune`."""
    return {k: float(finetune[w] if isinstance(w, str) else w)
            for k, w in (("kd", self.kd), ("align_ce", self.align_ce))}

  @property
  def distill(self) -> bool:
    return self.kd != 0.0

  @property
  def uses_alignment_rows(self) -> bool:
    return self.distill or self.align_ce != 0.0


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("reft", "Ref-Teacher: filtered user data + KD from the teacher", filter="teacher",
           kd="kd_weight", align_ce="align_ce_weight"),
    Method("sft", "base model on the raw user data (no defence)"),
    Method("sa_ft", "align on the alignment data, then finetune on raw user data",
           pre_align=True),
    Method("joint", "user + alignment data, CE", align_ce=1.0),
    Method("judge_filter", "moderation-filter baseline: the QA judge screens the user's pairs, "
           "then SFT", filter="judge"),
    Method("filter_only", "ablation: filtered user data, no KD", filter="teacher"),
    Method("distill_only", "ablation: raw user data + KD", kd="kd_weight",
           align_ce="align_ce_weight"),
)}


def parse_methods(text: str) -> list[str]:
  """`config.method`: one method or several, comma-separated (they share teacher and filter).
  Raises naming an unknown method, or an empty list."""
  names = [m.strip() for m in str(text).split(",") if m.strip()]
  if not names:
    raise ValueError(f"{text!r} names no method; expected one or more of {tuple(METHODS)}")
  for m in names:
    if m not in METHODS:
      raise ValueError(f"{m!r} is not one of {tuple(METHODS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"{text!r} names a method twice")
  return names


ALIGN = "align_"  # key prefix of the alignment rows in a student batch
TARGETS = ("topk_ids", "topk_logp", "tail_logp")  # cached teacher targets (`topk_targets`)


def _forward(model, batch, prefix: str = "", logits: bool = True):
  packed = {k: batch[prefix + k] for k in ("segment_ids", "positions") if prefix + k in batch}
  return model(batch[prefix + "tokens"], batch[prefix + "attention_mask"], return_logits=logits,
               **packed)


def student_loss_fn(*, kd: float, align_ce: float, kd_temperature: float, kd_direction: str,
                    teacher_graphdef: nnx.GraphDef | None = None,
                    logit_slots: Mapping[str, int] | None = None):
  """loss_fn(model, batch, rng, extras) for the shared train step.

  batch: the user rows under the plain keys (tokens, attention_mask, loss_mask, weights, and for
  packed rows segment_ids, positions; loss_mask may carry per-example weights) and, for methods
  that use them, the alignment rows under `align_*` keys. KD reads the teacher's cached targets
  (`align_topk_ids`, `align_topk_logp`, `align_tail_logp`) when the batch has them, else runs the
  teacher (`extras[TEACHER]`, built from `teacher_graphdef`) on the alignment rows.
  `logit_slots` ({"": user rows, ALIGN: alignment rows}): the LM head runs only at the positions
  a loss reads, gathered into that many slots per group (`losses.sum_at_targets`; a batch with more
  targets takes every position); None = logits everywhere. Both give the same loss.
  """
  def loss_fn(model, batch, rng, extras):
    del rng
    if logit_slots is not None:
      return _sparse(model, batch, extras)
    out = _forward(model, batch)
    ce_user, user_targets = mean_cross_entropy(out.logits, batch["tokens"], batch["loss_mask"],
                                               batch["weights"])
    aux = {"ce/user": ce_user, "user_targets": user_targets}
    loss = ce_user
    if not (kd or align_ce):
      return loss, aux
    a = _alignment_rows(batch)
    out_a = _forward(model, a)
    w = target_weights(a["loss_mask"], a["weights"])  # the logits at t predict token t+1
    if kd:
      if _cached(a):
        kd_term = kd_topk_loss(out_a.logits, a["topk_ids"], a["topk_logp"], a["tail_logp"], w,
                               temperature=kd_temperature, direction=kd_direction)
      else:
        t_logits = _forward(_teacher(extras), a).logits
        kd_term = kd_loss(out_a.logits, t_logits, w, temperature=kd_temperature,
                          direction=kd_direction)
      loss = loss + kd * kd_term
      aux["kd"] = kd_term
    if align_ce:
      ce_align, _ = mean_cross_entropy(out_a.logits, a["tokens"], a["loss_mask"], a["weights"])
      loss = loss + align_ce * ce_align
      aux["ce/align"] = ce_align
    return loss, aux

  def _alignment_rows(batch):
    if ALIGN + "tokens" not in batch:
      raise ValueError(f"kd={kd}, align_ce={align_ce} need alignment rows ({ALIGN}* keys)")
    return {k[len(ALIGN):]: v for k, v in batch.items() if k.startswith(ALIGN)}

  def _cached(a):
    return all(k in a for k in TARGETS)

  def _teacher(extras):
    if teacher_graphdef is None:
      raise ValueError("kd > 0 needs cached teacher targets in the batch or a teacher "
                       "(teacher_graphdef)")
    return nnx.merge(teacher_graphdef, extras[TEACHER])

  def _sparse(model, batch, extras):
    """The same loss with logits only at target positions."""
    out = _forward(model, batch, logits=False)
    w = target_weights(batch["loss_mask"], batch["weights"])
    targets = shifted_targets(batch["tokens"]).reshape(-1)
    total, every = sum_at_targets(
        out.final, w, lambda h, i: nll_from_logits(model.logits(h), targets[i]),
        logit_slots[""])
    user_targets = jnp.sum(w)
    ce_user = total / jnp.maximum(user_targets, TINY)
    aux = {"ce/user": ce_user, "user_targets": user_targets, "logits_everywhere/user": every}
    loss = ce_user
    if not (kd or align_ce):
      return loss, aux
    a = _alignment_rows(batch)
    out_a = _forward(model, a, logits=False)
    w = target_weights(a["loss_mask"], a["weights"])
    targets = shifted_targets(a["tokens"]).reshape(-1)
    flat = {k: a[k].reshape(-1, *a[k].shape[2:]) for k in TARGETS if k in a}
    t_final = None
    if kd and not _cached(a):
      teacher = _teacher(extras)
      t_final = _forward(teacher, a, logits=False).final
      t_final = jax.lax.stop_gradient(t_final).reshape(-1, t_final.shape[-1])

    def per_position(h, i):
      logits = model.logits(h)
      terms = []
      if kd:
        if t_final is None:
          terms.append(kd_topk_kl(logits, flat["topk_ids"][i], flat["topk_logp"][i],
                                  flat["tail_logp"][i], temperature=kd_temperature,
                                  direction=kd_direction))
        else:
          terms.append(kd_exact_kl(logits, teacher.logits(t_final[i]),
                                   temperature=kd_temperature, direction=kd_direction))
      if align_ce:
        terms.append(nll_from_logits(logits, targets[i]))
      return jnp.stack(terms, axis=-1)

    sums, every = sum_at_targets(out_a.final, w, per_position, logit_slots[ALIGN])
    means = sums / jnp.maximum(jnp.sum(w), TINY)
    aux["logits_everywhere/align"] = every
    if kd:
      aux["kd"] = kd_temperature ** 2 * means[0]
      loss = loss + kd * aux["kd"]
    if align_ce:
      aux["ce/align"] = means[-1]
      loss = loss + align_ce * aux["ce/align"]
    return loss, aux

  return loss_fn


__all__ = ["Method", "METHODS", "parse_methods", "student_loss_fn", "TEACHER", "ALIGN",
           "TARGETS"]
