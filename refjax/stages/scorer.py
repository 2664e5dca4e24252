"""The filter's scorer on a prepared teacher (`filter.scorer`): the stage, the generalisation
report and `python -m refjax.filter` all score through it, so their decisions agree.

    cosine      cos(f_l(x), R_l) with the teacher's refusal feature (the paper's filter)
    logistic    an L2 logistic probe on f_l(x), fitted by the filter stage on the alignment
                prompts (balanced per source and class) -> filter/logistic_probe.npz
    max_cosine  max over one direction per alignment source -> filter/directions.npz
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from refjax.data.batches import harmful_labels
from refjax.data.prompts import template_markers
from refjax.data.teacher_mix import round_robin
from refjax.files import read_npz, write_npz
from refjax.method.features import extract_features
from refjax.method.filtering import score_prompts
from refjax.method.scorers import (balanced_weights, fit_logistic, logistic_scores, max_cosine,
                                   multi_directions, probe_arrays, probe_from_arrays)
from refjax.models.decoder import keep_layers
from refjax.stages.context import Run
from refjax.stages.decisions import write_decisions
from refjax.stages.workdir import load_refusal_feature

log = logging.getLogger(__name__)
DESCRIPTION = {"cosine": "teacher: cos(f_l(x), R_l)",
               "logistic": "teacher: logistic probe on f_l(x)",
               "max_cosine": "teacher: max_s cos(f_l(x), R_s)"}


class Scorer:
  """A prepared teacher as a filter: its model, prompt format, refusal feature and the fitted
  scorer (`fit`, or read from the workdir on first use), scoring any examples as the stage does."""

  def __init__(self, r: Run):
    self.r, fc = r, r.cfg.filter
    self.art = load_refusal_feature(r.require(r.wd.refusal, "refusal"))
    teacher, _, self.fmt = r.load(r.require(r.wd.teacher_model, "teacher"))
    self.kind = fc.scorer
    self.layer = self.art.layer if int(fc.layer) < 0 else int(fc.layer)
    # The blocks above the scorer's layer cannot change f_l(x): they are cut (layer 15 of
    # SmolLM2's 30 halves the cost). One block more than l is kept, since a cut model's last
    # hidden state is normed and f_l is block l's output as it is.
    self.teacher = keep_layers(teacher, min(self.layer + 1, teacher.cfg.num_layers))
    self._fitted: Any = None

  def features(self, examples: Sequence[Any]) -> np.ndarray:
    """Teacher features [N, D] at the scorer's layer, last prompt token, in example order."""
    batches, _ = self.r.prompt_batches(examples, self.fmt, int(self.r.cfg.filter.batch_size),
                                       labelled=False)
    return extract_features(self.teacher, batches, layers=(self.layer,), progress=False)[0]

  def fit(self) -> dict[str, Any]:
    """Fits a logistic / max_cosine scorer on the alignment prompts (round-robin over sources,
    n_fit/2 per class) and saves it into filter/; the cosine scorer has nothing to fit."""
    fc, wd = self.r.cfg.filter, self.r.wd
    if self.kind == "cosine":
      return {}
    align = self.r.sets.alignment()
    fit = [dataclasses.replace(e, response="") for label in ("harmful", "harmless")
           for e in round_robin([x for x in align if x.label == label], int(fc.n_fit) // 2)]
    y, sources = harmful_labels(fit), [e.source for e in fit]
    x = self.features(fit)
    if self.kind == "logistic":
      self._fitted = fit_logistic(x, y, l2=float(fc.logistic_l2),
                                  sample_weight=balanced_weights(y, sources))
      write_npz(wd.logistic_probe, **probe_arrays(self._fitted), layer=np.int32(self.layer))
    else:
      names = sorted({s for s, yy in zip(sources, y) if yy})
      groups = [x[[i for i, s in enumerate(sources) if s == n and y[i]]] for n in names]
      self._fitted = multi_directions(groups, x[y == 0])
      write_npz(wd.filter_directions, directions=self._fitted, layer=np.int32(self.layer))
    log.info("%s filter scorer: layer %d, fitted on %d prompts (%d harmful)", self.kind,
             self.layer, len(fit), int(y.sum()))
    return {"n_fit": len(fit), "n_fit_harmful": int(y.sum())}

  def _load(self) -> Any:
    if self._fitted is None:
      wd = self.r.wd
      if self.kind == "logistic":
        self._fitted = probe_from_arrays(read_npz(self.r.require(wd.logistic_probe, "filter")))
      else:
        self._fitted = read_npz(self.r.require(wd.filter_directions, "filter"))["directions"]
    return self._fitted

  def __call__(self, examples: Sequence[Any]) -> np.ndarray:
    if self.kind == "cosine":
      return score_prompts(self.teacher, examples, self.fmt, self.layer, self.art.feature,
                           batch_size=self.r.cfg.filter.batch_size,
                           max_len=self.r.cfg.prompt.max_prompt_len, progress=False,
                           share_prefix=bool(self.r.cfg.prompt.share_prefix))
    fitted, x = self._load(), self.features(examples)
    return logistic_scores(fitted, x) if self.kind == "logistic" else max_cosine(x, fitted)

  def write(self, report_path, summary_path, examples, scores, keep, threshold, calibration=None):
    """The decision report and summary for `examples` (bound to the text scored)."""
    fmt = self.fmt
    return write_decisions(
        report_path, summary_path, examples, scores, keep, threshold, layer=self.layer,
        calibration=calibration, scorer=DESCRIPTION[self.kind],
        text_sha256=[fmt.scored_digest(e.instruction, e.input, e.response) for e in examples],
        markers=[template_markers(e.instruction, e.input) for e in examples])


__all__ = ["Scorer", "DESCRIPTION"]
