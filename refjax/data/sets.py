"""The example sets one run uses, built from its config sections, each once per run.

    alignment      harmful prompt -> refusal + harmless prompt -> helpful answer (the teacher's)
    probe          labelled prompts R_l is computed from (`refusal.probe_*`)
    validation     labelled prompts for the layer choice and the AUROC log (`refusal.val_*`)
    ood            an out-of-distribution check reported beside it (`refusal.ood_*`)
    calibration    labelled prompts for the filter threshold, disjoint from validation
    user           the customer's data: task examples with a share of harmful QA pairs

A set name in the config is a `refjax.data.sources` name, or `alignment` (the alignment set's own
prompts), or `alignment_holdout` (harmful prompts of the alignment source the alignment set does
not use: the same distribution as the harmful user data, never trained on).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from refjax.data.batches import HARMFUL, HARMLESS
from refjax.data.mixture import AlignmentReport, build_alignment_set, make_user_mixture
from refjax.data.records import DataError, Example
from refjax.data.sources import TASKS, load_source

ALIGNMENT, ALIGNMENT_HOLDOUT = "alignment", "alignment_holdout"


class ExampleSets:
  """The sets of one run's config (`data`, `refusal`, `filter` sections and `seed`).
  `is_refusal` is the alignment set's refusal check (used when `data.refusal_check`)."""

  def __init__(self, cfg: Any, is_refusal: Callable[[str], bool] | None = None):
    self.cfg, self.is_refusal = cfg, is_refusal

  @functools.cached_property
  def _alignment(self) -> tuple[list[Example], AlignmentReport, list[Example]]:
    dc = self.cfg.data
    refusals = load_source(dc.alignment_harmful)
    helpful = load_source(dc.alignment_harmless)
    examples, report = build_alignment_set(
        refusals, helpful, n_harmful=dc.n_alignment_harmful, n_harmless=dc.n_alignment_harmless,
        seed=self.cfg.seed, is_refusal=self.is_refusal if dc.refusal_check else None)
    return examples, report, refusals

  def alignment(self) -> list[Example]:
    """The teacher's alignment set (also the distillation data of the student)."""
    return self._alignment[0]

  def alignment_report(self) -> AlignmentReport:
    return self._alignment[1]

  def holdout_harmful(self, offset: int, n: int) -> list[Example]:
    """Harmful prompts of the alignment source the alignment set does not use, rows
    [offset, offset + n) of what is left."""
    examples, _, refusals = self._alignment
    used = {e.id for e in examples}
    pool = [e for e in refusals if e.id not in used][offset:offset + n]
    if len(pool) < n:
      raise DataError(f"{self.cfg.data.alignment_harmful} has only {len(pool)} unused harmful "
                      f"prompts after row {offset} (need {n}); lower refusal.n_val / "
                      "filter.n_calibration or data.n_alignment_harmful")
    return [dataclasses.replace(e, response="", label=HARMFUL) for e in pool]

  def labelled(self, harmful: str, harmless: str, n: int, *, offset: int = 0) -> list[Example]:
    """n harmful + n harmless prompts (responses dropped) from the named sets."""
    out = []
    for name, label in ((harmful, HARMFUL), (harmless, HARMLESS)):
      if name == ALIGNMENT:
        part = [e for e in self.alignment() if e.label == label][:n]
      elif name == ALIGNMENT_HOLDOUT:
        if label != HARMFUL:
          raise DataError(f"{ALIGNMENT_HOLDOUT!r} provides harmful prompts only")
        part = self.holdout_harmful(offset, n)
      else:
        part = load_source(name, limit=offset + n)[offset:]
      if not part:
        raise DataError(f"no {label} prompts from {name!r}")
      out += [dataclasses.replace(e, response="", label=label) for e in part]
    return out

  def probe(self) -> list[Example]:
    rc = self.cfg.refusal
    return self.labelled(rc.probe_harmful, rc.probe_harmless, rc.n_probe)

  def validation(self) -> list[Example]:
    rc = self.cfg.refusal
    return self.labelled(rc.val_harmful, rc.val_harmless, rc.n_val)

  def ood(self) -> list[Example]:
    rc = self.cfg.refusal
    return self.labelled(rc.ood_harmful, rc.ood_harmless, rc.n_val)

  def calibration(self) -> list[Example]:
    """The filter threshold's labelled prompts, disjoint from the validation rows."""
    rc = self.cfg.refusal
    return self.labelled(rc.val_harmful, self.cfg.filter.calibration_harmless,
                         int(self.cfg.filter.n_calibration), offset=int(rc.n_val))

  @functools.cached_property
  def _user(self) -> list[Example]:
    dc = self.cfg.data
    n_harmful = int(round(dc.user_n * dc.harmful_ratio))
    task = load_source(TASKS[dc.task].train, limit=dc.user_n)
    harmful = load_source(dc.harmful_source, limit=max(n_harmful, 1))
    return make_user_mixture(task, harmful, n=dc.user_n, harmful_ratio=dc.harmful_ratio,
                             seed=self.cfg.seed)

  def user(self) -> list[Example]:
    """The user's finetuning data (provenance-tagged; the filter never reads the tag)."""
    return self._user

  def task_test(self, n: int) -> list[Example]:
    """The first n test examples of the user's task (FA, and the cosine box plots)."""
    return load_source(TASKS[self.cfg.data.task].test, limit=n)


__all__ = ["ExampleSets", "ALIGNMENT", "ALIGNMENT_HOLDOUT"]
