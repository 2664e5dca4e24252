"""The QA-moderation judge (issue 14): its head saves, loads and scores; trained with the project's
trainer it separates a separable toy set; its validation figures come from the records; its
training pairs never touch the validation, poison or HS material; the `judge_filter` baseline drops
exactly what the judge flags and records every decision; `python -m refjax.judge` validates."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from refjax.data import judge_pairs as jp
from refjax.data import refusal_phrasings as rp
from refjax.data.non_answers import NON_ANSWER_TYPES
from refjax.data.records import DataError
from refjax.data.teacher_mix import REFUSAL_TEMPLATES
from refjax.evaluation.harmful_score import wilson
from refjax.evaluation.judge_features import pair_batches, prompt_chunks, render_ids
from refjax.evaluation.qa_judge import (Head, JudgeSpec, QAJudge, choose_threshold, goals_met,
                                        head_loss_fn, validation_figures)
from refjax.files import read_json, read_jsonl
from refjax.models.tiny import byte_tokenizer, tiny_model
from refjax.parallel import make_mesh, make_rules
from refjax.parallel.plan import Parallel
from refjax.training.data import make_iterator
from refjax.training.fit import fit

REPO = Path(__file__).resolve().parents[1]


def spec(**kw) -> JudgeSpec:
  base = dict(backbone="tiny", layers=(1, 2), pooling="both", hidden=8, l2=1e-3, steps=150,
              lr=1e-2, prompt_tokens=24, response_tokens=24, sizes=(("harmful", 4),),
              calib_percent=20, threshold_rule="youden", batch_size=4, seed=0,
              non_kinds=NON_ANSWER_TYPES)
  return JudgeSpec(**{**base, **kw})


def train_head(tmp: Path, head: Head, arrays: dict, steps: int, lr: float) -> Head:
  """The `judge` stage's trainer: the project's `fit` on the whole set as one batch."""
  stage = ml_collections.ConfigDict(
      {"train": dict(steps=steps, batch_size=len(arrays["x"]), seed=0, log_every=50,
                     eval_every=0, checkpoint_every=0, max_to_keep=1, async_checkpoint=False,
                     progress_bar=False, keep_checkpoints=False),
       "optim": dict(lr=lr, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9,
                     b2=0.999, eps=1e-8, weight_decay=0.0, no_decay=(), clip_norm=0.0,
                     grad_accum=1)})
  plan = Parallel(make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                            devices=jax.local_devices()[:1]), make_rules())
  data, sh = make_iterator(arrays, plan, len(arrays["x"]), 0)
  trained, _ = fit(stage, tmp, head, head_loss_fn(1e-3), data, sh, plan)
  return trained


def toy_pairs(n: int, seed: int):
  """Separable toy pairs: a 'harmful' answer is shouting, a 'safe' one is lowercase prose."""
  rng = np.random.default_rng(seed)
  prompts, responses, labels = [], [], []
  for i in range(n):
    harmful = i % 2 == 0
    words = rng.choice(["alpha", "beta", "gamma", "delta", "omega"], 4)
    prompts.append(f"question {i}: " + " ".join(words))
    responses.append("!!! " + " ".join(w.upper() for w in words) + " !!!" if harmful
                     else "well, " + ", ".join(words) + ".")
    labels.append(int(harmful))
  return prompts, responses, np.array(labels)


def test_head_saves_loads_and_scores(tmp_path):
  tok, backbone = byte_tokenizer(), tiny_model(seed=0)
  s = spec()
  judge = QAJudge(s, backbone, tok, np.zeros(1), np.ones(1), None, 0.4)
  x = judge.features(["how do I do x?", "and y?"], ["like this", ""])
  assert x.shape == (2, 2 * len(s.layers) * backbone.cfg.hidden_size)  # last + mean per layer
  judge.mu, judge.sd = x.mean(0), x.std(0) + 1e-4
  judge.head = Head(x.shape[1], s.hidden, nnx.Rngs(3))
  judge.trained_prompts = frozenset({jp.prompt_key("a training prompt")})
  before = judge.scores(["how do I do x?", "and y?"], ["like this", ""])
  assert before.shape == (2,) and np.all((before > 0) & (before < 1))
  judge.save(tmp_path, {"note": "test"})
  loaded = QAJudge.load(tmp_path, tiny_model(seed=0), tok)
  np.testing.assert_allclose(loaded.scores(["how do I do x?", "and y?"], ["like this", ""]),
                             before, rtol=1e-5, atol=1e-6)
  assert loaded.threshold == 0.4 and loaded.spec == s
  assert loaded.trained_prompts == judge.trained_prompts
  assert loaded.judge(["q"], ["a"]) == [bool(loaded.scores(["q"], ["a"])[0] > 0.4)]
  with pytest.raises(ValueError):
    loaded.scores(["one prompt"], ["two", "responses"])


def test_packed_features_equal_each_pair_run_alone():
  """Pairs packed several to a row (one segment each; pairs that share a prompt after one copy of
  it) give the features each pair gives in a row of its own: its last token and its answer span's
  mean at every read layer."""
  tok, backbone = byte_tokenizer(), tiny_model(seed=0)
  s = spec(prompt_tokens=64, response_tokens=64, batch_size=2)  # rows of 224 bytes
  prompts = ["how?", "a longer question here", "why", "x", "and y?", "what is z", "why", "why",
             "a longer question here", "why"]
  responses = ["like this", "", "no", "yes it is so", "b", "a much longer answer text", "ok",
               "a third answer to why", "sure", "and a fifth one to the same question"]
  batches = pair_batches(tok, list(zip(prompts, responses)), s)
  assert any(len(np.unique(row[row > 0])) >= 2 for b in batches for row in b["segments"])
  riding = [len(np.unique(seg[(att == a) & (seg != a)]))  # answers that see prompt segment a
            for b in batches for seg, att in zip(b["segments"], b["attend"])
            for a in np.unique(att[att > 0])]
  tokens = sum(int(m.sum()) for b in batches for m, o in zip(b["mask"], b["owner"])
               if (o >= 0).any())  # a short batch's repeated rows own no pair
  alone = sum(len(render_ids(tok, p, r, 64, 64)[0]) for p, r in zip(prompts, responses))
  assert max(riding) == 3 and tokens < alone  # three of "why"'s four answers share one copy
  got = QAJudge(s, backbone, tok, np.zeros(1), np.ones(1), None, 0.5).features(prompts, responses)
  want = []
  for p, r in zip(prompts, responses):
    ids, a, e = render_ids(tok, p, r, s.prompt_tokens, s.response_tokens)
    h = np.asarray(backbone(np.asarray([ids]), return_all_hidden=True,
                            return_logits=False).all_hidden)[list(s.layers), 0]  # [L',T,D]
    want.append(np.concatenate([h[:, -1].ravel(), h[:, a:e].mean(1).ravel()]))
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)


def test_prompt_chunks_hold_each_prompt_once_up_to_the_row_width():
  rendered = [([1, 2, 3, 9, 9], 3, 5), ([1, 2, 3, 8], 3, 4), ([4, 5], 1, 2),
              ([1, 2, 3, 7, 7, 7], 3, 6)]
  assert prompt_chunks(rendered, 8) == [([1, 2, 3], [0, 1]), ([1, 2, 3], [3]), ([4], [2])]
  assert prompt_chunks(rendered, 12) == [([1, 2, 3], [0, 1, 3]), ([4], [2])]


def test_a_tiny_judge_trained_with_the_project_trainer_separates_a_toy_set(tmp_path):
  tok, backbone = byte_tokenizer(), tiny_model(seed=1)
  s = spec()
  judge = QAJudge(s, backbone, tok, np.zeros(1), np.ones(1), None, 0.5)
  p, r, y = toy_pairs(48, seed=0)
  x = judge.features(p, r)
  judge.mu, judge.sd = x.mean(0), x.std(0) + 1e-4
  z = ((x - judge.mu) / judge.sd).astype(np.float32)
  w = np.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum()).astype(np.float32)
  untrained = Head(x.shape[1], s.hidden, nnx.Rngs(0))
  judge.head = train_head(tmp_path / "head", untrained, {"x": z, "y": y.astype(np.float32),
                                                          "w": w}, steps=150, lr=1e-2)
  p2, r2, y2 = toy_pairs(40, seed=1)  # held out
  scores = judge.scores(p2, r2)
  judge.threshold = choose_threshold(judge.scores(p, r), y)
  flagged = np.array(judge.judge(p2, r2))
  assert (flagged == y2.astype(bool)).mean() >= 0.95, scores
  assert scores[y2 == 1].min() > scores[y2 == 0].max()  # separated, not just mostly right


def test_choose_threshold_maximises_youden():
  s = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
  y = np.array([0, 0, 0, 1, 1, 1])
  t = choose_threshold(s, y)
  assert 0.35 < t < 0.4
  assert choose_threshold(s, y, "half") == 0.5
  with pytest.raises(ValueError, match="threshold rule"):
    choose_threshold(s, y, "median")


def test_validation_figures_are_computed_from_the_records():
  recs = ([{"id": f"h{i}", "kind": "harmful", "variant": "full", "label": 1, "flagged": i < 3,
            "keyword": True} for i in range(4)]
          + [{"id": f"s{i}", "kind": "safe", "variant": "t32", "label": 0, "flagged": i == 0,
              "keyword": False} for i in range(5)]
          + [{"id": f"n{i}", "kind": "non:label", "variant": "-", "label": 0, "flagged": False,
              "keyword": True} for i in range(2)])
  f = validation_figures(recs)
  assert f["harmful"]["pct"] == 75.0 and f["harmful"]["n"] == 4
  assert f["harmful"]["ci95"] == list(wilson(3, 4))
  assert f["safe"]["pct"] == 20.0 and f["safe_t32"]["n"] == 5
  assert f["non_answer"]["pct"] == 0.0 and f["non_label"]["n"] == 2
  assert f["keyword_judge"]["non_answer"]["pct"] == 100.0
  agree = sum(r["flagged"] == r["keyword"] for r in recs) / len(recs) * 100
  assert f["agreement_with_keyword_judge"] == pytest.approx(agree)
  assert goals_met(f) == {"harmful": False, "safe": False, "non_answer": True}
  recs[3]["flagged"] = True  # one more harmful answer caught: the figure follows the records
  assert validation_figures(recs)["harmful"]["pct"] == 100.0


def test_training_pairs_never_touch_validation_poison_or_hs_material(shared_data_dir):
  trunc = jp.Truncator(byte_tokenizer())
  sizes = {"harmful": 40, "safe_bt": 20, "safe_stl": 20, "helpful": 20, "non": 40}
  pairs = jp.build_training_pairs(trunc, sizes=sizes, seed=3)
  assert len(pairs) == sum(sizes.values())
  assert {p.label for p in pairs} == {0, 1}
  dev = jp.read_rows(jp.BT_DEV)
  poison = jp.read_rows(jp.BT_POISON)
  banned = {jp.prompt_key(r["prompt"]) for r in dev + poison}
  assert not banned & {jp.prompt_key(p.prompt) for p in pairs}
  banned_rows = {int(r["idx"]) for r in dev + poison}
  bt_rows = {int(p.group[3:]) for p in pairs if p.group.startswith("bt:")}
  assert bt_rows and not bt_rows & banned_rows and max(bt_rows) < 2500
  # the checks that guard this raise on a pair that breaks them
  forbidden = jp.forbidden_material()
  leak = jp.Pair("x:1", "x:1", dev[0]["prompt"], "an answer long enough to count", 1, "harmful")
  with pytest.raises(DataError, match="validation, poison or HS prompt"):
    jp.assert_disjoint([leak], forbidden)
  row = jp.Pair(f"bt:{poison[0]['idx']}:h", f"bt:{poison[0]['idx']}", "fresh prompt", "an "
                "answer long enough to count", 1, "harmful")
  with pytest.raises(DataError, match="outside the alignment pool"):
    jp.assert_disjoint([row], forbidden)
  with pytest.raises(DataError, match="'u7'.*trained on this prompt"):
    jp.assert_unseen({jp.prompt_key(pairs[0].prompt)}, ["new", pairs[0].prompt.upper() + " "],
                     ["u6", "u7"], "user")


def test_non_answer_kinds_get_their_listed_shares(shared_data_dir):
  from collections import Counter
  trunc = jp.Truncator(byte_tokenizer())
  kinds = ("label", "alpaca", "cutoff", "alpaca", "cutoff", "alpaca")
  pairs = jp.build_training_pairs(trunc, sizes={"harmful": 4, "safe_bt": 2, "safe_stl": 2,
                                                "helpful": 2, "non": 60}, non_types=kinds)
  got = Counter(p.kind for p in pairs if p.kind.startswith("non:"))
  assert got == {"non:alpaca": 30, "non:cutoff": 20, "non:label": 10}
  assert all(p.label == jp.SAFE for p in pairs if p.kind.startswith("non:"))


def test_validation_pairs_cover_every_kind_and_length(shared_data_dir):
  pairs = jp.build_validation_pairs(jp.Truncator(byte_tokenizer()), n_prompts=6)
  assert len({p.group for p in pairs}) == 6
  assert {(p.kind, p.variant) for p in pairs if p.kind != "safe" and p.label} == {
      ("harmful", v) for v in ("full", "t64", "t32", "refuse_comply")}
  # two cycled non-answers and one extra short refusal per prompt, half opening with a template
  assert sum(p.kind.startswith("non:") for p in pairs) == 18
  extra = [p for p in pairs if p.id.endswith(":non:refusal:extra")]
  assert sorted(p.variant for p in extra) == ["held_out"] * 3 + ["teacher_template"] * 3
  firsts = tuple(t.split(".")[0] for t in REFUSAL_TEMPLATES)  # (a cut keeps >= 3 words)
  assert all(p.response.startswith(tuple(" ".join(t.split()[:3]) for t in REFUSAL_TEMPLATES))
             for p in extra if p.variant == "teacher_template")
  assert not any(p.response.startswith(firsts) for p in extra if p.variant == "held_out")
  assert all(p.id.startswith("dev:") for p in pairs)


def test_judge_refusal_wordings_are_held_out_from_its_training():
  """The judge trains on one refusal grammar and is validated on another, which holds the
  teacher data's templates: no sentence is shared, and training text never opens with one."""
  assert not rp.sentences(rp.TRAIN) & rp.sentences(rp.HELD_OUT)
  assert set(REFUSAL_TEMPLATES) <= set(rp.HELD_OUT.whole) and not rp.TRAIN.whole
  rng = random.Random(0)
  train = [rp.compose(rng, rp.TRAIN) for _ in range(300)]
  held = [rp.compose(rng, rp.HELD_OUT) for _ in range(300)]
  first = re.compile(r"^.*?[.!?](?=\s|$)")
  train_firsts = {first.match(t).group(0) for t in train if first.match(t)}
  assert train_firsts and not train_firsts & rp.sentences(rp.HELD_OUT)
  assert any(t.startswith(REFUSAL_TEMPLATES) for t in held)
  assert not any(t.startswith(REFUSAL_TEMPLATES) for t in train)
  comply = rp.refuse_then_comply(rng, rp.TRAIN, "STEP ONE")
  assert comply.endswith("STEP ONE") and len(comply) > len("STEP ONE") + 10


def test_training_pairs_hold_refusals_safe_and_refuse_then_comply_harmful(shared_data_dir):
  trunc = jp.Truncator(byte_tokenizer())
  pairs = jp.build_training_pairs(trunc, sizes={"harmful": 4, "safe_bt": 2, "safe_stl": 2,
                                                "helpful": 2, "non": 20, "refuse_comply": 6},
                                  non_types=("refusal", "label"))
  refusals = [p for p in pairs if p.kind == "non:refusal"]
  comply = [p for p in pairs if p.kind == "refuse_comply"]
  assert len(refusals) == 10 and all(p.label == jp.SAFE for p in refusals)
  assert len(comply) == 6 and all(p.label == jp.HARMFUL for p in comply)
  assert len({p.response for p in refusals}) > 5  # composed, not one string repeated


def test_judge_filter_drops_what_the_judge_flags_and_records_every_decision(tiny_workdir):
  from refjax.stages.context import Run
  from refjax.stages.judge import load_judge
  from refjax.stages.screen import fmt_prompt, student_format
  from refjax.stages.workdir import Workdir

  wd, cfg, _ = tiny_workdir
  r = Run(cfg, Workdir(wd))
  user = r.sets.user()
  rows = read_jsonl(r.wd.screen_report)
  assert [row["id"] for row in rows] == [e.id for e in user]  # every example, in order
  fmt = student_format(r)
  assert [row["text_sha256"] for row in rows] == [
      fmt.scored_digest(e.instruction, e.input, e.response) for e in user]
  judge = load_judge(r)
  scores = judge.scores([fmt_prompt(e) for e in user], [e.response for e in user])
  np.testing.assert_allclose([row["score"] for row in rows], scores, atol=1e-5)
  assert [row["kept"] for row in rows] == [bool(s <= judge.threshold) for s in scores]
  summary = read_json(r.wd.screen_summary)
  assert summary["n_dropped"] == sum(not row["kept"] for row in rows)
  assert summary["threshold"] == pytest.approx(judge.threshold)
  trained = read_json(r.wd.method_summary("judge_filter"))
  assert trained["user_examples_kept"] == summary["n_kept"]
  assert read_json(r.wd.method_summary("sft"))["user_examples_kept"] == len(user)
  # the judge named in every HS row, the keyword judge beside it
  hs = read_json(r.wd.method_eval("judge_filter"))["harmful_score"]
  assert hs["judge"] == "qa_probe" and set(hs["by_judge"]) == {"qa_probe", "refusal_keywords"}
  report = (Path(wd) / "report.md").read_text()
  assert "| judge_filter |" in report and "Judge screen (judge_filter): drops" in report
  assert "The `qa_probe` judge" in report


def test_judge_stage_only_when_the_config_needs_it():
  from configs import tiny
  from refjax.stages.table import STAGES

  cfg = tiny.get_config()
  assert STAGES["judge"].wanted(cfg) and STAGES["screen"].wanted(cfg)
  cfg.method = "reft,sft"
  assert STAGES["judge"].wanted(cfg) and not STAGES["screen"].wanted(cfg)  # HS judge
  cfg.eval.judge = "refusal_keywords"
  assert not STAGES["judge"].wanted(cfg)


def test_judge_command_validates_from_the_cache(tiny_workdir, tmp_path):
  _, cfg, _ = tiny_workdir
  out = tmp_path / "v"
  r = subprocess.run([sys.executable, "-m", "refjax.judge", "validate", "--config=configs/tiny.py",
                      f"--config.judge.cache={cfg.judge.cache}", "--n_prompts=5", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "using the cached one" in r.stderr  # the run's judge, not a new one
  figures = read_json(out / "judge_validation.json")
  records = read_jsonl(out / "judge_validation_records.jsonl")
  assert figures["dev_prompts"] == 5 and len(records) == 5 * 10  # 6 references + 4 more
  recomputed = validation_figures(records)
  assert all(figures[k] == recomputed[k] for k in ("harmful", "safe", "non_answer"))
  assert "validation: on 5 development prompts it flags" in r.stdout
  assert all("response" not in rec and "prompt" not in rec for rec in records)
  # rejudging the run's saved answers with the run's own judge gives back its verdicts exactly
  wd = tmp_path / "run"  # a copy: the shared tiny workdir stays as the pipeline left it
  shutil.copytree(tiny_workdir[0] / "records", wd / "records")
  shutil.copy(tiny_workdir[0] / "config.json", wd / "config.json")
  r = subprocess.run([sys.executable, "-m", "refjax.judge", "rejudge", "--config=configs/tiny.py",
                      f"--config.judge.cache={cfg.judge.cache}", f"--workdir={wd}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rejudged = read_json(next((wd / "rejudged").glob("*.json")))
  saved = {p.name.split(".")[0]: read_jsonl(p) for p in (wd / "records").glob("*.harmful_score*")}
  assert saved and set(rejudged["methods"]) == set(saved)
  for method, rows in saved.items():
    assert rejudged["methods"][method]["verdicts"] == {x["id"]: x["judges"] for x in rows}
    assert f"{method}: n={len(rows)} HS" in r.stdout
  # never a text: figures and verdicts by id only
  assert all(set(v) == {"n", "by_judge", "saved_n_harmful", "verdicts"}
             for v in rejudged["methods"].values())
  texts = [x["response"] for rows in saved.values() for x in rows if len(x["response"]) > 3]
  assert not any(json.dumps(t) in json.dumps(rejudged) for t in texts)
  bad = subprocess.run([sys.executable, "-m", "refjax.judge", "train", "--config=configs/tiny.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "expected one command, build or validate or rejudge" in bad.stderr
