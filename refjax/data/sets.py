"""The example sets one run uses, built from its config sections, each once per run.

    alignment      harmful prompt -> refusal + harmless prompt -> helpful answer (the teacher's)
    probe          labelled prompts R_l is computed from (`refusal.probe_*`)
    validation     labelled prompts for the layer choice and the AUROC log (`refusal.val_*`)
    ood            an out-of-distribution check reported beside it (`refusal.ood_*`)
    calibration    labelled prompts for the filter threshold, disjoint from validation
    user           the customer's data: task examples with a share of harmful QA pairs

A set name in the config is a `refjax.data.sources` name, or `alignment` (the alignment set's own
prompts), or `alignment_holdout` (harmful prompts of the alignment source the alignment set does
not use: the same distribution as the harmful user data, never trained on), or `mix_calib` (the
calibration rows of every `data.alignment_mix` source but the held-out one; issue 15).

With `data.alignment_mix` the alignment set is the filter levers' mix (`refjax.data.teacher_mix`)
from the protocol's pools (`refjax.data.pools`, built once per data root and seed).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from refjax.data import paths
from refjax.data.batches import HARMFUL, HARMLESS
from refjax.data.filter_sources import Prompt
from refjax.data.mixture import (AlignmentReport, _shuffle, build_alignment_set,
                                 make_user_mixture)
from refjax.data.pools import Pools, build_pools
from refjax.data.records import DataError, Example
from refjax.data.sources import TASKS, load_source
from refjax.data.teacher_mix import mix_calibration, mix_names, round_robin, teacher_mix

ALIGNMENT, ALIGNMENT_HOLDOUT, MIX_CALIB = "alignment", "alignment_holdout", "mix_calib"
LABELLED_SETS = (ALIGNMENT, ALIGNMENT_HOLDOUT, MIX_CALIB)  # set names besides the sources


@functools.lru_cache(maxsize=2)
def protocol_pools(root: str, seed: int) -> Pools:
  """The protocol's pools of the data under `root` (about 10 s; once per process)."""
  return build_pools(root, seed=seed)


class ExampleSets:
  """The sets of one run's config (`data`, `refusal`, `filter` sections and `seed`).
  `is_refusal` is the alignment set's refusal check (used when `data.refusal_check`)."""

  def __init__(self, cfg: Any, is_refusal: Callable[[str], bool] | None = None):
    self.cfg, self.is_refusal = cfg, is_refusal

  def pools(self) -> Pools:
    return protocol_pools(str(paths.data_dir()), int(self.cfg.seed))

  @functools.cached_property
  def _alignment(self) -> tuple[list[Example], AlignmentReport, list[Example]]:
    dc = self.cfg.data
    if dc.alignment_mix:
      return self._mixed_alignment()
    refusals = load_source(dc.alignment_harmful)
    helpful = load_source(dc.alignment_harmless)
    examples, report = build_alignment_set(
        refusals, helpful, n_harmful=dc.n_alignment_harmful, n_harmless=dc.n_alignment_harmless,
        seed=self.cfg.seed, is_refusal=self.is_refusal if dc.refusal_check else None)
    return examples, report, refusals

  def _mixed_alignment(self) -> tuple[list[Example], AlignmentReport, list[Example]]:
    """The teacher's data from several harmful sources (balanced), extra harmless sources and
    wrapped copies (data.alignment_mix & co); the held-out source never enters."""
    dc = self.cfg.data
    helpful = [Prompt(id=e.id, instruction=e.instruction, input=e.input or "", label=HARMLESS,
                      source=dc.alignment_harmless, response=e.response)
               for e in load_source(dc.alignment_harmless)[:int(dc.n_alignment_harmless)]]
    rows = teacher_mix(
        self.pools(), harmful_sources=mix_names(dc.alignment_mix),
        n_harmful=int(dc.n_alignment_harmful), harmless_rows=helpful,
        harmless_sources=[s for s in mix_names(dc.harmless_mix) if s != dc.holdout_source],
        n_per_harmless_source=int(dc.n_harmless_mix), wrap_per_family=int(dc.wrap_per_family),
        refusal_targets=dc.refusal_targets, is_refusal=self.is_refusal,
        holdout=dc.holdout_source, seed=int(self.cfg.seed))
    examples = _shuffle([p.to_example() for p in rows], int(self.cfg.seed))
    n_h = sum(e.label == HARMFUL for e in examples)
    report = AlignmentReport(n_harmful=n_h, n_harmless=len(examples) - n_h,
                             refusal_check=dc.refusal_targets == "source", refusals_checked=0,
                             non_refusals_dropped=0)
    return examples, report, []

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
        part = [e for e in self.alignment() if e.label == label]
        part = round_robin(part, n) if self.cfg.data.alignment_mix else part[:n]
      elif name == MIX_CALIB:
        if label != HARMFUL:
          raise DataError(f"{MIX_CALIB!r} provides harmful prompts only")
        dc = self.cfg.data
        rows = mix_calibration(self.pools(), mix_names(dc.alignment_mix), dc.holdout_source)
        part = round_robin([p.to_example() for p in rows], n)
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
    """The filter threshold's labelled prompts, disjoint from the validation rows (with
    filter.calibration_harmful="mix_calib", every calibration row of the mix's sources: the layer
    choice may use the same rows, both being fits on seen sources)."""
    rc, fc = self.cfg.refusal, self.cfg.filter
    harmful = fc.calibration_harmful or rc.val_harmful
    offset = 0 if harmful == MIX_CALIB else int(rc.n_val)
    return self.labelled(harmful, fc.calibration_harmless, int(fc.n_calibration), offset=offset)

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


__all__ = ["ExampleSets", "ALIGNMENT", "ALIGNMENT_HOLDOUT", "MIX_CALIB", "LABELLED_SETS",
           "protocol_pools"]
