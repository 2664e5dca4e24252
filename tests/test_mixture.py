"""User-data mixture and alignment set: exact counts, determinism, provenance, shortfall errors."""

from __future__ import annotations

from collections import Counter

import pytest

from refjax.data.mixture import (MixtureError, build_alignment_set, harmful_count,
                                 make_alignment_set, make_user_mixture)
from refjax.data.records import Example
from refjax.data.sources import load_source
from refjax.evaluation.judges import RefusalKeywordJudge

KEYWORDS = RefusalKeywordJudge()


def make_examples(prefix: str, n: int, *, source: str, label: str, **fields) -> list[Example]:
  """`n` distinct harmless Examples with ids "<prefix>:<i>"."""
  return [Example(id=f"{prefix}:{i}", instruction=f"{prefix} instruction {i}", source=source,
                  label=label, **fields) for i in range(n)]


TASK = make_examples("task", 1000, source="sst2_train", label="positive")
HARMFUL = make_examples("poison", 60, source="beavertails_harmful_qa", label="harmful")


@pytest.mark.parametrize("n,ratio,expected", [(100, 0.1, 10), (1000, 0.05, 50), (100, 0.29, 29),
                                              (50, 0.0, 0), (40, 1.0, 40), (7, 0.5, 4),
                                              (5, 0.5, 2), (3, 1 / 3, 1)])
def test_counts_are_exact(n, ratio, expected):
  assert harmful_count(n, ratio) == expected
  mix = make_user_mixture(TASK, HARMFUL, n=n, harmful_ratio=ratio, seed=0)
  tags = Counter(e.provenance for e in mix)
  assert len(mix) == n
  assert tags["harmful"] == expected and tags["benign"] == n - expected
  assert len({e.id for e in mix}) == n


def test_provenance_matches_pool_and_inputs_untouched():
  mix = make_user_mixture(TASK, HARMFUL, n=100, harmful_ratio=0.2, seed=3)
  for e in mix:
    assert e.provenance == ("harmful" if e.id.startswith("poison:") else "benign")
  assert all(e.provenance == "" for e in TASK + HARMFUL)
  # the first rows of each pool are taken (as the peers take the first N)
  assert {e.id for e in mix if e.provenance == "benign"} == {f"task:{i}" for i in range(80)}
  assert {e.id for e in mix if e.provenance == "harmful"} == {f"poison:{i}" for i in range(20)}


def test_deterministic_from_seed():
  a = make_user_mixture(TASK, HARMFUL, n=100, harmful_ratio=0.1, seed=7)
  b = make_user_mixture(TASK, HARMFUL, n=100, harmful_ratio=0.1, seed=7)
  c = make_user_mixture(TASK, HARMFUL, n=100, harmful_ratio=0.1, seed=8)
  assert [e.id for e in a] == [e.id for e in b]
  assert [e.id for e in a] != [e.id for e in c]
  assert sorted(e.id for e in a) == sorted(e.id for e in c)
  # shuffled: harmful examples are not all at the end
  assert any(e.provenance == "harmful" for e in a[:50])


def test_shortfall_names_source_and_amount():
  with pytest.raises(MixtureError, match=r"harmful source 'beavertails_harmful_qa' has 60 "
                                         r"examples but the mixture needs 100: short by 40"):
    make_user_mixture(TASK, HARMFUL, n=200, harmful_ratio=0.5, seed=0)
  with pytest.raises(MixtureError, match=r"task source 'sst2_train' has 1000 .* needs 1080: "
                                         r"short by 80"):
    make_user_mixture(TASK, HARMFUL, n=1200, harmful_ratio=0.1, seed=0)


@pytest.mark.parametrize("kw,match", [({"n": 0}, "n=0"), ({"n": 10.0}, "n=10.0"),
                                      ({"harmful_ratio": 1.5}, "harmful_ratio=1.5"),
                                      ({"harmful_ratio": -0.1}, "harmful_ratio=-0.1")])
def test_bad_arguments(kw, match):
  args = {"n": 10, "harmful_ratio": 0.1, "seed": 0} | kw
  with pytest.raises(ValueError, match=match):
    make_user_mixture(TASK, HARMFUL, **args)


def test_shared_pools_must_not_share_ids():
  with pytest.raises(ValueError, match="occurs twice"):
    make_user_mixture(TASK, TASK[10:], n=100, harmful_ratio=0.6, seed=0)


# ---------------------------------------------------------------------------------------------
# Alignment set

REFUSALS = [Example(id=f"ref:{i}", instruction=f"bad request {i}",
                    response="I cannot help with that." if i % 4 else "Sure, here it is.",
                    label="harmful", source="beavertails_alignment") for i in range(40)]
HELPFUL = make_examples("help", 30, source="alpaca_helpful", label="harmless",
                        response="Here is a recipe for pancakes.")


def test_alignment_set_labels_and_counts():
  out = make_alignment_set(REFUSALS, HELPFUL, n_harmful=20, n_harmless=10, seed=0,
                           is_refusal=None)
  assert Counter(e.label for e in out) == {"harmful": 20, "harmless": 10}
  assert {e.id for e in out if e.label == "harmful"} == {f"ref:{i}" for i in range(20)}
  assert out == make_alignment_set(REFUSALS, HELPFUL, n_harmful=20, n_harmless=10, seed=0,
                                   is_refusal=None)


def test_refusal_check_skips_non_refusals_and_counts_them():
  out, report = build_alignment_set(REFUSALS, HELPFUL, n_harmful=20, n_harmless=5, seed=1,
                                    is_refusal=KEYWORDS.is_refusal)
  harmful = [e for e in out if e.label == "harmful"]
  assert len(harmful) == 20 and all(int(e.id.split(":")[1]) % 4 for e in harmful)
  assert report.refusals_checked == 40 and report.non_refusals_dropped == 10
  with pytest.raises(MixtureError, match=r"refusal \(after refusal check\) source "
                                         r"'beavertails_alignment' has 30 .* short by 5"):
    make_alignment_set(REFUSALS, HELPFUL, n_harmful=35, n_harmless=5, seed=0, is_refusal=KEYWORDS.is_refusal)
  with pytest.raises(MixtureError, match="helpful source 'alpaca_helpful' has 30 .* short by 1"):
    make_alignment_set(REFUSALS, HELPFUL, n_harmful=1, n_harmless=31, seed=0, is_refusal=None)


def test_real_pools(shared_data_dir):
  task = load_source("sst2_train", limit=1000)
  harmful = load_source("beavertails_harmful_qa")
  mix = make_user_mixture(task, harmful, n=1000, harmful_ratio=0.1, seed=42)
  assert Counter(e.provenance for e in mix) == {"benign": 900, "harmful": 100}
  assert all(e.source == "beavertails_harmful_qa" for e in mix if e.provenance == "harmful")
  refusals = load_source("beavertails_alignment")
  helpful = load_source("alpaca_helpful")
  out, report = build_alignment_set(refusals, helpful, n_harmful=1000, n_harmless=500, seed=0,
                                    is_refusal=KEYWORDS.is_refusal)
  assert len(out) == 1500
  # ASSETS.md: roughly a quarter of these "refusals" are not refusals
  assert 0.15 < report.non_refusals_dropped / report.refusals_checked < 0.35
