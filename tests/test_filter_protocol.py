"""The filter-generalisation protocol (issue 15): pools, folds, wrappers, the mixed teacher data,
the scorers and metrics, the config levers, and the generalisation report of the tiny run.

Assertions are on ids, counts and rates; no prompt text is printed or used in a test name.
"""

import json

import numpy as np
import pytest

from refjax import config as config_lib
from refjax.data.dedup import DupIndex
from refjax.data.filter_sources import (FILTER_SOURCES, HARMFUL_EVAL_ONLY, HARMFUL_TRAINABLE,
                                        ROLES, Prompt, names)
from refjax.data.folds import assert_fold, make_fold
from refjax.data.pools import build_pools
from refjax.data.sets import ExampleSets, protocol_pools
from refjax.data.teacher_mix import round_robin, teacher_mix
from refjax.data.wrappers import (EVAL_VARIANTS, TRAIN_VARIANTS, WRAPPER_FAMILIES, WRAPPERS, wrap,
                                  wrap_set)
from refjax.method.filtering import calibrate, calibrate_fpr, rate_at
from refjax.method.generalisation import GOALS, generalisation
from refjax.method.refusal import auroc
from refjax.method.scorers import (balanced_weights, cosine, dom_direction, fit_logistic,
                                   logistic_scores, max_cosine, multi_directions)
from refjax.stages.fingerprint import config_part
from refjax.stages.table import STAGES

MIX = ",".join(HARMFUL_TRAINABLE)


@pytest.fixture(scope="module")
def pools(shared_data_dir):
  return protocol_pools(str(shared_data_dir), 0)


def test_every_source_has_a_role_and_the_poison_pool_is_never_loaded(pools):
  assert {s.role for s in FILTER_SOURCES.values()} <= set(ROLES)
  assert names("never") == ("beavertails_user_poison",)
  assert "beavertails_user_poison" not in pools.parts


def test_every_fold_is_disjoint_and_blind_to_its_source(pools):
  for held in [None, *HARMFUL_TRAINABLE]:
    fold = make_fold(pools, held)
    assert_fold(fold)
    train = {p.id for d in (fold.train_harmful, fold.train_harmless) for r in d.values() for p in r}
    calib = {p.id for d in (fold.calib_harmful, fold.calib_harmless) for r in d.values() for p in r}
    if held:
      assert not any(i.startswith(held + ":") for i in train | calib)
      assert fold.eval_harmful[held]
    for s in HARMFUL_EVAL_ONLY:
      assert not any(i.startswith(s + ":") for i in train | calib)


def test_pools_drop_cross_source_and_user_data_duplicates(pools, shared_data_dir):
  idx = DupIndex(p.instruction for s in HARMFUL_EVAL_ONLY for p in pools.rows(s, "test"))
  for s in HARMFUL_TRAINABLE:
    for part in ("train", "calib", "test"):
      assert not any(idx.hit(p.instruction) for p in pools.rows(s, part))
  # AG News train rows that can be user data for task ag_news (research found 62) are dropped
  assert pools.dropped_duplicates["ag_news_train/user_data"] >= 50
  from refjax.data.pools import _ag_news_user_rows
  user = DupIndex(_ag_news_user_rows(shared_data_dir))
  assert not any(user.hit(p.input) for part in ("train", "calib")
                 for p in pools.rows("ag_news_train", part))


def test_pools_are_deterministic(shared_data_dir, pools):
  again = build_pools(shared_data_dir, seed=0)
  assert [p.id for p in again.rows("advbench", "train")] == [
      p.id for p in pools.rows("advbench", "train")]


def test_wrappers_deterministic_and_train_eval_variants_disjoint():
  ps = [Prompt(id=f"x:{i}", instruction=f"do thing {i}") for i in range(20)]
  w1 = wrap_set(ps, variants=EVAL_VARIANTS, per_family=4)
  w2 = wrap_set(ps, variants=EVAL_VARIANTS, per_family=4)
  assert [(w.id, w.instruction, w.input) for w in w1] == [(w.id, w.instruction, w.input)
                                                          for w in w2]
  assert len(w1) == 4 * len(WRAPPER_FAMILIES)
  assert {w.wrapper.split("/")[0] for w in w1} == set(WRAPPER_FAMILIES)
  assert {int(w.wrapper.split("/")[1]) for w in w1} == set(EVAL_VARIANTS)
  assert not set(TRAIN_VARIANTS) & set(EVAL_VARIANTS)
  for fam in WRAPPER_FAMILIES:
    assert len(WRAPPERS[fam]) == len(TRAIN_VARIANTS) + len(EVAL_VARIANTS)
    texts = {WRAPPERS[fam][v]("REQ") for v in range(4)}
    assert len(texts) == 4 and all("REQ" in a + b for a, b in texts)
  hidden = wrap(ps[0], "task_hidden", 0)
  assert "do thing 0" in hidden.input and hidden.wrapper == "task_hidden/0"


def test_teacher_mix_is_balanced_blind_and_wrapped_as_configured(pools):
  helpful = [Prompt(id=f"h:{i}", instruction=f"q{i}", label="harmless", response="a")
             for i in range(40)]
  rows = teacher_mix(pools, harmful_sources=HARMFUL_TRAINABLE, n_harmful=200,
                     harmless_rows=helpful, harmless_sources=["sst2_train", "edgy_benign"],
                     n_per_harmless_source=10, wrap_per_family=2, holdout="advbench")
  srcs = [p.source for p in rows if p.label == "harmful" and not p.wrapper]
  assert "advbench" not in srcs and all(srcs.count(s) == 50 for s in set(srcs))
  assert all(p.response for p in rows if p.label == "harmful")
  wrapped = [p for p in rows if p.wrapper]
  assert len(wrapped) == 2 * 2 * len(WRAPPER_FAMILIES)  # harmful + harmless per family
  assert {int(p.wrapper.split("/")[1]) for p in wrapped} <= set(TRAIN_VARIANTS)
  assert not any(p.id.split("~")[0].split("#")[0].startswith("advbench:") for p in rows)
  assert sum(p.source == "edgy_benign" and not p.response for p in rows) == 10


def _mix_config(holdout="advbench"):
  from configs import tiny
  cfg = tiny.get_config()
  cfg.data.update(alignment_mix=MIX, harmless_mix="sst2_train,edgy_benign", n_harmless_mix=4,
                  wrap_per_family=2, holdout_source=holdout, n_alignment_harmful=40)
  cfg.refusal.val_harmful = "mix_calib"
  cfg.filter.calibration_harmful = "mix_calib"
  config_lib.validate(cfg)
  return cfg


def test_run_sets_never_see_the_held_out_source(shared_data_dir):
  sets = ExampleSets(_mix_config(), is_refusal=lambda text: True)
  align, probe, val, calib = sets.alignment(), sets.probe(), sets.validation(), sets.calibration()
  for rows in (align, probe, val, calib):
    assert not any(e.id.startswith("advbench:") or e.source == "advbench" for e in rows)
  assert {e.source for e in probe if e.label == "harmful"} >= {"beavertails", "tdc2023"}
  assert not {e.id for e in calib if e.label == "harmful"} & {e.id for e in align}
  sizes = {s: sum(e.source == s and "~" not in e.id for e in align) for s in HARMFUL_TRAINABLE}
  assert sizes["advbench"] == 0 and len({v for k, v in sizes.items() if v}) == 1
  assert sum("~" in e.id for e in align) == 2 * 2 * len(WRAPPER_FAMILIES)


def test_rows_without_a_response_train_the_regulariser_only(shared_data_dir):
  from refjax.data.records import Example
  from refjax.stages.context import Run
  from refjax.stages.workdir import Workdir
  r = Run(_mix_config(), Workdir("unused"))
  _, _, fmt = r.load()
  rows = [Example(id="a", instruction="q", response="an answer", label="harmless"),
          Example(id="b", instruction="q2", response="", label="harmless")]
  a = r.training_arrays(rows, fmt)
  assert a["loss_mask"][0].sum() > 0 and a["loss_mask"][1].sum() == 0
  assert list(a["labels_sign"]) == [-1, -1]


def test_round_robin_balances_sources():
  rows = [Prompt(id=f"{s}:{i}", instruction="", source=s) for s in "ab" for i in range(10)]
  assert [p.source for p in round_robin(rows, 4)] == ["a", "b", "a", "b"]


def test_config_levers_are_validated_by_name():
  for key, value in (("filter.scorer", "svm"), ("data.alignment_mix", "beavertails,nope"),
                     ("data.holdout_source", "harmbench_val"), ("filter.calibration_rule", "x"),
                     ("data.refusal_targets", "x"), ("refusal.val_harmful", "nope")):
    cfg = config_lib.base_config()
    section, field = key.split(".")
    cfg[section][field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
      config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.filter.calibration_harmful = "mix_calib"
  with pytest.raises(config_lib.ConfigError, match="config.data.alignment_mix"):
    config_lib.validate(cfg)


def test_a_changed_lever_changes_its_stage_fingerprint():
  a = _mix_config()
  for stage, key, value in (("teacher", "data.wrap_per_family", 3),
                            ("filter", "filter.scorer", "cosine"),
                            ("filter", "filter.logistic_l2", 1.0),
                            ("generalisation", "generalisation.n_source", 7)):
    b = a.copy_and_resolve_references()
    section, field = key.rsplit(".", 1)
    b[section][field] = value
    assert config_part(a, STAGES[stage].config) != config_part(b, STAGES[stage].config), key


def test_metrics():
  s = {"a": np.linspace(0, 1, 100), "b": np.linspace(0.5, 1, 100)}
  assert rate_at(s["a"], calibrate(s, 0.95, "per_source")) >= 0.95
  assert rate_at(s["b"], calibrate(s, 0.95, "per_source")) >= 0.95
  assert calibrate(s, 0.95, "pooled") >= calibrate(s, 0.95, "per_source")
  x = np.arange(100, dtype=float)
  thr = calibrate_fpr(x, 0.05)
  assert rate_at(x, thr) <= 0.05 and rate_at(x, thr - 1) > 0.05


def test_scorers_separate_a_toy_set():
  rng = np.random.default_rng(0)
  d, mu = 16, rng.normal(size=16)
  harm = [rng.normal(size=(50, d)) + 3 * mu, rng.normal(size=(30, d)) + 3 * mu]
  safe = rng.normal(size=(80, d))
  r = dom_direction(harm, safe)
  assert cosine(harm[0], r).mean() > cosine(safe, r).mean()
  dirs = multi_directions(harm, safe)
  assert dirs.shape == (2, d) and max_cosine(safe, dirs).shape == (80,)
  x, y = np.concatenate(harm + [safe]), np.r_[np.ones(80), np.zeros(80)]
  w = balanced_weights(y.astype(int), ["a"] * 50 + ["b"] * 30 + ["n"] * 80)
  np.testing.assert_allclose([w[:50].sum(), w[50:80].sum(), w[80:].sum()], [0.5, 0.5, 1.0])
  probe = fit_logistic(x, y, l2=0.01, sample_weight=w)
  assert auroc(logistic_scores(probe, x), y) > 0.99


def test_generalisation_summary_and_goals():
  g = generalisation(0.5, {"s1": np.array([0.9, 0.8]), "s2": np.array([0.4, 0.6])},
                     {"generic": np.array([0.1, 0.2, 0.6]), "task": np.array([0.0, 0.1])},
                     {"roleplay": np.array([0.7, 0.3])}, reference="generic",
                     task_benign="task", in_distribution=("bt", np.array([0.9])))
  assert g["sources"]["s1"] == {"n": 2, "auroc": pytest.approx(1.0), "recall": 1.0}
  assert g["summary"]["recall_min"] == 0.5 and g["benign_fpr"]["task"]["fpr"] == 0.0
  assert set(g["goals"]) == set(GOALS)
  assert g["goals"]["fpr_task_benign"]["met"] and not g["goals"]["recall_at_threshold"]["met"]


def test_tiny_run_writes_the_generalisation_report(tiny_workdir):
  from refjax.files import read_json
  from refjax.stages.workdir import Workdir
  wd = Workdir(tiny_workdir[0])
  g = read_json(wd.generalisation)
  assert {"threshold", "sources", "wrapped_recall", "benign_fpr", "in_distribution", "summary",
          "goals", "scorer", "layer", "seen_sources"} <= set(g)
  assert g["threshold"] == read_json(wd.filter_summary)["threshold"]
  assert g["seen_sources"] == ["beavertails"]  # the paper's alignment data (configs/tiny.py)
  assert set(g["sources"]) == (set(HARMFUL_EVAL_ONLY) | set(HARMFUL_TRAINABLE)) - {
      "beavertails_eval", "beavertails"}
  assert set(g["wrapped_recall"]) == set(WRAPPER_FAMILIES)
  assert {"alpaca_test", "sst2_test", "ag_news_test", "gsm8k_test"} <= set(g["benign_fpr"])
  assert g["scorer"] == "logistic" and wd.logistic_probe.is_file()
  assert "## Filter generalisation" in wd.report_md.read_text()
  assert json.dumps(g).isascii()


def test_dup_index_equals_the_brute_force_rules(pools):
  from refjax.data.dedup import near_duplicate, norm_text
  items = [p.instruction for s in ("advbench", "tdc2023") for part in ("train", "calib", "test")
           for p in pools.rows(s, part)]
  queries = [p.instruction for s in ("derta", "harmbench_val") for p in pools.rows(s, "test")]
  queries += [q[5:-5] for q in items[:40]] + ["x " + q + " y" for q in items[40:80]]
  idx = DupIndex(items)
  normed = [norm_text(i) for i in items]
  brute = [any(near_duplicate(norm_text(q), i) for i in normed) for q in queries]
  assert [idx.hit(q) for q in queries] == brute and sum(brute) >= 80
