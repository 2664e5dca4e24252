"""The user's finetuning data (task examples with a fraction of harmful ones) and the teacher's
alignment set (harmful prompt -> refusal, harmless prompt -> helpful answer).

Both take the first examples of each pool (the peers take the first N rows) and shuffle the union
with a seed, so a (pools, n, ratio, seed) tuple always gives the same list.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from refjax.data.records import DataError, Example

log = logging.getLogger(__name__)

BENIGN, HARMFUL = "benign", "harmful"


class MixtureError(DataError):
  """A pool cannot fill its share: the message names the source and the shortfall."""


def _source_name(pool: Sequence[Example], role: str) -> str:
  names = sorted({e.source for e in pool if e.source})
  return ", ".join(names) if names else f"<unnamed {role} pool>"


def _take(pool: Sequence[Example], k: int, role: str) -> list[Example]:
  if len(pool) < k:
    raise MixtureError(f"{role} source {_source_name(pool, role)!r} has {len(pool)} examples but "
                       f"the mixture needs {k}: short by {k - len(pool)}")
  return list(pool[:k])


def _shuffle(examples: list[Example], seed: int) -> list[Example]:
  order = np.random.default_rng(seed).permutation(len(examples))
  shuffled = [examples[i] for i in order]
  ids = [e.id for e in shuffled]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise DataError(f"id {dup!r} occurs twice in the mixture; pools must not share examples")
  return shuffled


def harmful_count(n: int, harmful_ratio: float) -> int:
  """round(n * harmful_ratio), Python rounding (half to even). The peers' int() truncates."""
  return int(round(n * harmful_ratio))


def make_user_mixture(task: Sequence[Example], harmful: Sequence[Example], *, n: int,
                      harmful_ratio: float, seed: int) -> list[Example]:
  """`n` examples: exactly round(n*p) harmful, the rest benign task ones, tagged and shuffled.

  `provenance` is "benign" or "harmful"; the filter must not read it (the report does).
  """
  if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
    raise ValueError(f"n={n!r}; expected a positive integer")
  if not 0.0 <= harmful_ratio <= 1.0:
    raise ValueError(f"harmful_ratio={harmful_ratio!r}; expected a fraction in [0, 1]")
  n_harmful = harmful_count(n, harmful_ratio)
  benign = [dataclasses.replace(e, provenance=BENIGN) for e in _take(task, n - n_harmful, "task")]
  bad = [dataclasses.replace(e, provenance=HARMFUL) for e in _take(harmful, n_harmful, "harmful")]
  mixture = _shuffle(benign + bad, seed)
  log.info("user mixture: %d examples, %d harmful (ratio %.4f), %d benign, seed %d", n, n_harmful,
           harmful_ratio, n - n_harmful, seed)
  return mixture


@dataclasses.dataclass(frozen=True)
class AlignmentReport:
  """Counts behind an alignment set; `non_refusals_dropped` counts refusal-pool rows (of the
  whole pool) that the keyword judge did not see as refusals."""

  n_harmful: int
  n_harmless: int
  refusal_check: bool
  refusals_checked: int
  non_refusals_dropped: int


def build_alignment_set(refusals: Sequence[Example], helpful: Sequence[Example], *,
                        n_harmful: int, n_harmless: int, seed: int,
                        is_refusal: Callable[[str], bool] | None = None
                        ) -> tuple[list[Example], AlignmentReport]:
  """The alignment set and its counts; see `make_alignment_set`."""
  refusal_check = is_refusal is not None
  for name, value in (("n_harmful", n_harmful), ("n_harmless", n_harmless)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{name}={value!r}; expected a non-negative integer")
  pool = list(refusals)
  checked = dropped = 0
  if refusal_check:
    keep = [e for e in pool if is_refusal(e.response)]
    checked, dropped = len(pool), len(pool) - len(keep)
    pool = keep
  harmful = [dataclasses.replace(e, label="harmful")
             for e in _take(pool, n_harmful, "refusal" + (" (after refusal check)"
                                                          if refusal_check else ""))]
  harmless = [dataclasses.replace(e, label="harmless")
              for e in _take(helpful, n_harmless, "helpful")]
  report = AlignmentReport(n_harmful=n_harmful, n_harmless=n_harmless,
                           refusal_check=refusal_check, refusals_checked=checked,
                           non_refusals_dropped=dropped)
  return _shuffle(harmful + harmless, seed), report


def make_alignment_set(refusals: Sequence[Example], helpful: Sequence[Example], *,
                       n_harmful: int, n_harmless: int, seed: int,
                       is_refusal: Callable[[str], bool] | None = None) -> list[Example]:
  """Harmful prompt -> refusal (label "harmful") plus harmless -> helpful (label "harmless").

  With `is_refusal` (the refusal check: `RefusalKeywordJudge.is_refusal` in the pipeline; ~23%
  of the BeaverTails refusals fail it, ASSETS.md), refusal-pool rows it rejects are skipped, and
  the count is logged. Takes the first qualifying rows of each pool, then shuffles with `seed`.
  """
  examples, report = build_alignment_set(refusals, helpful, n_harmful=n_harmful,
                                         n_harmless=n_harmless, seed=seed, is_refusal=is_refusal)
  log.info("alignment set: %d harmful->refusal + %d harmless->helpful; refusal check %s "
           "(%d checked, %d non-refusals skipped)", report.n_harmful, report.n_harmless,
           "on" if report.refusal_check else "off", report.refusals_checked,
           report.non_refusals_dropped)
  return examples
