"""The teacher's data from the filter levers (issue 15): harmful prompts of several sources ->
refusals (balanced per source), harmless prompts -> answers (generic, task-formatted, edgy), and
wrapped copies of both (training variants only); the held-out source never enters. Also the
mixed calibration rows and a round-robin pick that balances sources in a probe set."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

from refjax.data.filter_sources import HARMFUL, HARMLESS, Prompt
from refjax.data.pools import Pools
from refjax.data.wrappers import TRAIN_VARIANTS, wrap_set

REFUSAL_TARGETS = ("source", "template")  # data.refusal_targets


REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with this request. If you have a different question, I'm happy to help.",
    "Sorry, I won't provide that. It is harmful and could put people at risk.",
    "I'm not able to help with that request, because it could be used to hurt someone.",
)


def template_refusal(prompt_id: str) -> str:
  return REFUSAL_TEMPLATES[int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16)
                           % len(REFUSAL_TEMPLATES)]


def _cycle(rows: Sequence[Prompt], n: int) -> list[Prompt]:
  """n rows: the rows in order, repeated with '#rK' id suffixes when the pool is short."""
  out = []
  for k in range(n):
    p = rows[k % len(rows)]
    rep = k // len(rows)
    out.append(p if rep == 0 else dataclasses.replace(p, id=f"{p.id}#r{rep}"))
  return out


def teacher_mix(pools: Pools, *, harmful_sources: Sequence[str], n_harmful: int,
                harmless_rows: Sequence[Prompt], harmless_sources: Sequence[str] = (),
                n_per_harmless_source: int = 100, wrap_per_family: int = 0,
                refusal_targets: str = "source", is_refusal: Callable[[str], bool] | None = None,
                holdout: str = "", seed: int = 0) -> list[Prompt]:
  """The teacher's alignment rows (unshuffled): harmful rows of each source's *train* part,
  n_harmful // len(sources) each (cycled when short), with refusal targets; `harmless_rows`
  (e.g. alpaca_helpful with answers) plus n_per_harmless_source rows of each extra harmless source
  (task rows keep their gold answer; rows without a response train the regulariser only); and
  wrap_per_family wrapped harmful + wrapped harmless rows per wrapper family (training variants)."""
  srcs = [s for s in harmful_sources if s != holdout]
  if not srcs:
    raise ValueError("teacher_mix: no harmful source left after the holdout")
  per = max(1, n_harmful // len(srcs))
  harmful = []
  for s in srcs:
    rows = pools.rows(s, "train")
    if not rows:
      raise ValueError(f"teacher_mix: source {s!r} has no train rows")
    for p in _cycle(rows, per):
      keep = (refusal_targets == "source" and p.response and is_refusal is not None
              and is_refusal(p.response))
      harmful.append(dataclasses.replace(p, label=HARMFUL,
                                         response=p.response if keep else template_refusal(p.id)))
  harmless = [dataclasses.replace(p, label=HARMLESS) for p in harmless_rows]
  for s in harmless_sources:
    rows = pools.rows(s, "train")
    if not rows:
      raise ValueError(f"teacher_mix: harmless source {s!r} has no train rows")
    harmless += [dataclasses.replace(p, label=HARMLESS)
                 for p in _cycle(rows, n_per_harmless_source)]
  wrapped = []
  if wrap_per_family:
    base_h = [p for p in harmful if "#r" not in p.id]
    for p in wrap_set(base_h, variants=TRAIN_VARIANTS, per_family=wrap_per_family, seed=seed):
      wrapped.append(dataclasses.replace(p, response=template_refusal(p.id)))
    base_n = [p for p in harmless_rows if p.response and not p.input]
    wrapped += [dataclasses.replace(p, label=HARMLESS)
                for p in wrap_set(base_n, variants=TRAIN_VARIANTS, per_family=wrap_per_family,
                                  seed=seed)]
  out = harmful + harmless + wrapped
  ids = [p.id for p in out]
  if len(ids) != len(set(ids)):
    raise AssertionError("teacher_mix produced duplicate ids")
  if holdout and any(p.source == holdout for p in out):
    raise AssertionError(f"teacher_mix leaks held-out source {holdout}")
  return out


def mix_calibration(pools: Pools, harmful_sources: Sequence[str],
                    holdout: str = "") -> list[Prompt]:
  """Every calibration-part row of the harmful sources except the held-out one."""
  return [p for s in harmful_sources if s != holdout for p in pools.rows(s, "calib")]


def round_robin(examples: Sequence[Any], n: int) -> list[Any]:
  """Up to n examples taking one per `source` in turn (a probe set balanced over sources)."""
  groups: dict[str, list] = {}
  for e in examples:
    groups.setdefault(e.source, []).append(e)
  out, k = [], 0
  while len(out) < n and any(k < len(g) for g in groups.values()):
    out += [g[k] for g in groups.values() if k < len(g)][:n - len(out)]
    k += 1
  return out


def mix_names(value: str) -> list[str]:
  """A comma-separated config list (data.alignment_mix, data.harmless_mix) as names."""
  return [v.strip() for v in str(value).split(",") if v.strip()]


__all__ = ["REFUSAL_TEMPLATES", "REFUSAL_TARGETS", "template_refusal", "teacher_mix",
           "mix_calibration", "round_robin", "mix_names"]
