"""Student finetuning: the table of methods, and the one loss every method trains with.

loss = CE(user rows) + kd * T² KL(teacher ‖ student)(alignment response tokens)
       + align_ce * CE(alignment rows)
Each method is one `Method` entry: what it does to the data (filter the user data, align first)
and the weights of its loss terms. The last `align_rows` rows of every batch are alignment rows;
filtered user examples arrive with weight 0, so shapes never change. The frozen teacher is a
named step input (`extras["teacher"]`: sharded, never donated, no optimizer state, under
stop_gradient); the teacher runs on the alignment rows only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from refjax.method.losses import kd_loss, mean_cross_entropy, target_weights

TEACHER = "teacher"  # the step input holding the frozen teacher's state

Weight = float | str  # a constant, or the name of a `config.finetune` field holding it


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the comparison: its data handling and the weights of its loss terms."""

  name: str
  about: str  # one line for reports and the README
  filter: bool = False  # train on the teacher-filtered user data (drops get weight 0)
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
    Method("reft", "Ref-Teacher: filtered user data + KD from the teacher", filter=True,
           kd="kd_weight", align_ce="align_ce_weight"),
    Method("sft", "base model on the raw user data (no defence)"),
    Method("sa_ft", "align on the alignment data, then finetune on raw user data",
           pre_align=True),
    Method("joint", "user + alignment data, CE", align_ce=1.0),
    Method("filter_only", "ablation: filtered user data, no KD", filter=True),
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


def student_loss_fn(align_rows: int, *, kd: float, align_ce: float, kd_temperature: float,
                    kd_direction: str, teacher_graphdef: nnx.GraphDef | None = None):
  """loss_fn(model, batch, rng, extras) for the shared train step.

  The last `align_rows` rows (static) are alignment rows. With align_rows = 0 it is plain CE on
  the (filter-weighted) user rows. kd > 0 needs `teacher_graphdef` and `extras[TEACHER]`.
  """
  if kd and teacher_graphdef is None:
    raise ValueError("kd > 0 needs a teacher (teacher_graphdef)")
  if (kd or align_ce) and not align_rows:
    raise ValueError(f"kd={kd}, align_ce={align_ce} need alignment rows; got align_rows=0")

  def loss_fn(model, batch, rng, extras):
    del rng
    tokens, mask, lm, w = (batch["tokens"], batch["attention_mask"], batch["loss_mask"],
                           batch["weights"])
    out = model(tokens, mask)
    b = tokens.shape[0]
    user = slice(0, b - align_rows)
    ce_user, user_targets = mean_cross_entropy(out.logits[user], tokens[user], lm[user], w[user])
    aux = {"ce_user": ce_user, "user_targets": user_targets}
    loss = ce_user
    if align_rows:
      al = slice(b - align_rows, b)
      if kd:
        teacher = nnx.merge(teacher_graphdef, extras[TEACHER])
        t_logits = teacher(tokens[al], mask[al]).logits
        # Alignment response tokens are the targets: the logits one position earlier predict them.
        kd_term = kd_loss(out.logits[al], t_logits, target_weights(lm[al], w[al]),
                          temperature=kd_temperature, direction=kd_direction)
        loss = loss + kd * kd_term
        aux["kd"] = kd_term
      if align_ce:
        ce_align, _ = mean_cross_entropy(out.logits[al], tokens[al], lm[al], w[al])
        loss = loss + align_ce * ce_align
        aux["ce_align"] = ce_align
    return loss, aux

  return loss_fn


__all__ = ["Method", "METHODS", "parse_methods", "student_loss_fn", "TEACHER"]
