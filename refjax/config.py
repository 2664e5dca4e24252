"""The whole config schema: every field with its default and a comment, one `validate`, and the
config's JSON form (`config.json`). Config files' variant strings are `refjax.config_arg`.

Every config file (`configs/*.py`) starts from `base_config()` and overrides fields; `validate`
names the bad key (dotted, in full) and what was expected before any expensive work starts. The
choices a field may take are imported from the module that owns them (methods, stages, tasks,
judges, loss forms, templates, schedules), so a new entry there is valid here at once. Values the
paper leaves open carry a comment saying what they mean and where the default comes from.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Mapping

import ml_collections

from refjax.data.prompts import TEMPLATES
from refjax.data.sources import SOURCES, TASKS
from refjax.evaluation.judging import JUDGES
from refjax.evaluation.qa_judge import POOLINGS, THRESHOLD_RULES
from refjax.method.filtering import CALIBRATION_RULES
from refjax.method.losses import KD_DIRECTIONS, REG_FORMS
from refjax.method.scorers import SCORERS
from refjax.method.student import parse_methods
from refjax.models import hub
from refjax.models.config import DTYPES
from refjax.stages.table import STAGES
from refjax.config_sections import (distributed_config, judge_config, mesh_config, optim_config,
                                    train_config)
from refjax.data.filter_sources import EDGY, HARMFUL_TRAINABLE, names
from refjax.data.non_answers import NON_ANSWER_TYPES
from refjax.data.sets import LABELLED_SETS, MIX_CALIB
from refjax.data.teacher_mix import REFUSAL_TARGETS, mix_names
from refjax.training.optim import SCHEDULES

def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults. Config files override what their setting changes."""
  c = ml_collections.ConfigDict()
  c.method = "reft"  # one or several (comma-separated) of refjax.method.student.METHODS
  c.seed = 0
  # Default order; a stage this config does not need (judge, screen) is skipped.
  c.stages = ("teacher", "refusal", "filter", "generalisation", "judge", "screen", "distill",
              "finetune", "evaluate")

  # The base model: student init and (teacher_init="base") teacher init.
  c.model = ml_collections.ConfigDict(dict(
      name="smollm2-135m-instruct",  # shipped model, local HF dir or .gguf, 'tiny', or hub 'org/id'
      param_dtype="float32",  # master weights
      dtype="float32",  # compute dtype (bfloat16 for speed on TPU/GPU)
      lora_rank=0,  # 0 = full finetuning
      lora_alpha=16.0,
      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
      remat=False,
  ))

  # Prompt format: per-model template and stop tokens (see refjax/data/prompts.py).
  c.prompt = ml_collections.ConfigDict(dict(
      template="chat",  # chat (model's template) | alpaca (peer harness)
      system_prompt="",  # "" = the template's default
      stop_tokens=(),  # extra end-of-turn tokens besides the tokenizer's EOS
      max_len=256,  # tokens per training example (prompt cut left, answer cut right)
      max_prompt_len=256,  # tokens per prompt when scoring or generating
      share_prefix=True,  # scoring runs the prefix all prompts share once a batch (same features)
  ))

  # Demo generation (the `generate` stage): a few prompts answered by the base model.
  c.generate = ml_collections.ConfigDict(dict(
      prompts=(
          "Give three tips for staying healthy.",
          "What is the capital of France?",
          "Write a haiku about the sea.",
          "Explain photosynthesis in one sentence.",
      ),
      max_new_tokens=48,
      temperature=0.0,  # 0 = greedy
      batch_size=4,
  ))

  # Data (names are refjax.data.sources registry entries, read from the data folder).
  c.data = ml_collections.ConfigDict(dict(
      # The data folder (shared/ASSETS.md's files). "" = $REFJAX_DATA, else <checkout>/../shared/data.
      root="",
      alignment_harmful="beavertails_alignment",  # harmful prompt -> refusal
      alignment_harmless="alpaca_helpful",  # harmless prompt -> helpful answer
      n_alignment_harmful=1000,  # paper: BeaverTails alignment pairs (count unstated)
      n_alignment_harmless=1000,
      # ASSETS.md: ~23% of the BeaverTails "refusals" are not refusals; drop those by the keyword
      # judge so the teacher learns to refuse (counts are logged).
      refusal_check=True,
      task="sst2",  # the user's task: a row of refjax.data.sources.TASKS
      user_n=1000,  # user examples (peer harness default n=1000)
      harmful_ratio=0.1,  # share of harmful QA pairs in the user data (peer harness p=0.1)
      harmful_source="beavertails_harmful_qa",  # disjoint from the alignment rows
      # --- Filter levers (issue 15, measured in research-filter REPORT.md). Harmful trainable
      # sources (refjax.data.filter_sources) of the teacher's data, comma-separated, sharing
      # n_alignment_harmful evenly (cycled when short); "" = alignment_harmful alone (paper).
      alignment_mix="",
      # Extra harmless sources (sst2_train, ag_news_train, gsm8k_train rendered with the task
      # instruction like user data; edgy_benign), n_harmless_mix rows each. Rows without a
      # response train the regulariser only (no cross-entropy).
      harmless_mix="",
      n_harmless_mix=100,
      holdout_source="",  # a trainable source no probe/teacher/threshold sees (LOSO fold); ""
      # Wrapped copies per wrapper family (training variants): harmful ones with refusal targets
      wrap_per_family=0,  # and as many harmless ones (alpaca_helpful, with answers); 0 = none
      # Mixed harmful rows' targets: "source" keeps a source refusal the keyword judge accepts,
      # else a templated refusal; "template" = templated refusals for all.
      refusal_targets="source",
  ))

  # Refusal feature: difference of means at the last prompt token.
  c.refusal = ml_collections.ConfigDict(dict(
      layer=-1,  # hidden-state index (0 = embeddings); -1 = best AUROC on the validation prompts
      layer_range=(0.25, 0.85),  # allowed depth fraction when choosing (our default)
      # The fixed probe set R_l is computed from. "alignment" = the alignment set's own harmful and
      # harmless prompts (the paper trains the teacher on them); or a data-source name. Measured on
      # SmolLM2: an AdvBench-style probe (harmful_train) separates BeaverTails harmful prompts from
      # SST-2 prompts at AUROC 0.44, the alignment-set probe at 1.0 (see README).
      probe_harmful="alignment",
      probe_harmless="alignment",
      n_probe=128,  # prompts per class in the probe set
      # Labelled prompts for the layer choice and the AUROC log. "alignment_holdout" = rows of the
      # alignment source the alignment set does not use (same distribution as harmful user data);
      # "mix_calib" = the calibration rows of every data.alignment_mix source (balanced).
      val_harmful="alignment_holdout",
      val_harmless="harmless_val",
      n_val=128,  # prompts per class
      # A second, out-of-distribution check reported beside it (Arditi et al.'s HarmBench split).
      ood_harmful="harmful_val",
      ood_harmless="harmless_test",
      batch_size=16,
  ))

  # Teacher preparation (paper Sec. 3.1).
  c.teacher = ml_collections.ConfigDict(dict(
      init="base",  # "base" (start from config.model) or a model name (paper's instruct variant)
      reg_weight=1.0,  # weight of the cosine regulariser (paper: unstated; our default)
      reg_form="one_minus_cos",  # refjax.method.losses.REG_FORMS
      reg_margin=0.5,  # margin form only
      refusal_update_every=20,  # steps between refusal-feature recomputations (dynamic update)
      target_logits=0.0,  # LM head only at response positions: as finetune.target_logits
  ))
  c.teacher.train = train_config(steps=200, batch_size=8)
  c.teacher.optim = optim_config(lr=2e-5)

  # Filtering user data with the frozen teacher.
  c.filter = ml_collections.ConfigDict(dict(
      threshold=float("nan"),  # a fixed cosine threshold; nan = calibrate to target_recall
      target_recall=0.95,  # harmful recall the calibrated threshold reaches (paper tunes for recall)
      # Calibration prompts: alignment-source harmful prompts the teacher never saw (BeaverTails,
      # like the harmful user data; disjoint from refusal's validation rows) and harmless ones.
      n_calibration=200,
      calibration_harmless="harmless_val",
      # "" = refusal.val_harmful's rows after its n_val (paper); "mix_calib" = the calibration
      calibration_harmful="",  # rows of every data.alignment_mix source but the held-out one
      # pooled = the k-th largest harmful calibration score (k = ceil(target * n)); per_source =
      # the lowest per-source threshold (every calibration source reaches the target).
      calibration_rule="pooled",
      # refjax.method.scorers.SCORERS: cosine = cos(f_l(x), R_l) with the teacher's feature (the
      # paper); max_cosine = max over one direction per alignment source; logistic = an L2
      # logistic probe on the teacher's features (issue 15: the largest lever on unseen-source
      # AUROC), fitted on the alignment prompts balanced per source and class.
      scorer="cosine",
      layer=-1,  # hidden state the scorer reads; -1 = the refusal feature's layer
      logistic_l2=0.01,  # research-filter: best of 0.01..1 on unseen sources
      n_fit=600,  # alignment prompts the logistic / max_cosine scorer is fitted on (both classes)
      batch_size=16,
  ))

  # Stage `generalisation` (issue 15): how many prompts the filter's generalisation report scores.
  c.generalisation = ml_collections.ConfigDict(dict(
      n_source=100,  # prompts per eval-only harmful source (first rows of its seeded order)
      n_benign=200,  # prompts per benign set (generic instructions, each task's test rows)
      wrap_per_family=20,  # wrapped held-out prompts per family (evaluation variants only)
  ))

  # Student finetuning (paper Sec. 3.2).
  c.finetune = ml_collections.ConfigDict(dict(
      kd_weight=1.0,  # weight of the distillation KL (paper: unstated; our default)
      kd_temperature=1.0,  # T, with the usual T^2 scaling
      kd_direction="forward",  # forward = KL(teacher || student); reverse = KL(student || teacher)
      align_ce_weight=0.0,  # extra CE on the alignment labels (0 = pure distillation)
      align_ratio=0.5,  # share of each batch's rows drawn from the alignment data
      # KD from the teacher's top-k next-token distribution, computed once per run (stage
      # `distill`; MaxText-style offline distillation); 0 = exact KD, the teacher in every step.
      kd_topk=32,
      epochs=0.0,  # passes over the (packed) user rows; 0 = train.steps steps instead
      max_len=256,  # tokens per training example (user and alignment); longer ones are cut, counted
      pack_len=256,  # tokens per packed row (several examples, attention kept per example)
      # The prompt prefix every example shares (the chat template's system turn) held once per
      # packed row, every example attending to it: the same loss, fewer tokens (False = a copy
      # per example).
      share_prefix=True,
      # The LM head only where a loss reads (most user positions are prompt): slots per step as a
      # share of its positions, 0 = enough for a step drawn from these rows (mean + 3 sd), 1 =
      # logits at every position. A step with more targets takes every position (same loss).
      target_logits=0.0,
      lora_rank=-1,  # the student's LoRA rank: -1 = model.lora_rank, 0 = full finetuning
  ))
  c.finetune.train = train_config(steps=200, batch_size=8)
  c.finetune.optim = optim_config(lr=2e-5)

  # Evaluation: harmful score (HS) and finetuning accuracy (FA).
  c.eval = ml_collections.ConfigDict(dict(
      hs_source="beavertails_eval",  # harmful test prompts (peer harness: BeaverTails 30k_test)
      hs_n=1000,  # peer harness: 1000 prompts
      # refjax.evaluation.judging.JUDGES: qa_probe = the trained QA judge (config.judge, stage
      # `judge`); the refusal-keyword judge is always reported beside it.
      judge="qa_probe",
      judge_model="",  # model dir/name for moderation or llama_guard judges
      fa_n=1000,  # task test examples (peer harness: first 1000; SST-2 has 872)
      max_new_tokens=64,
      fa_max_new_tokens=16,  # task answers are short (GSM8K needs more: see configs)
      batch_size=16,
      include_base=True,  # also evaluate the untouched base model (row "base")
  ))

  c.judge = judge_config()
  c.mesh = mesh_config()
  c.distributed = distributed_config()
  return c


# ---------------------------------------------------------------------------------------------
# Validation


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the full dotted key."""


def _choice(choices) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), f"one of {tuple(choices)}"


def _at_least(low) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v >= low), f">= {low}"


def _names(choices) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: set(mix_names(v)) <= set(choices)), f"comma-separated names of {choices}"


_TRAIN_RULES = {"steps": _at_least(1), "batch_size": _at_least(1), "log_every": _at_least(1),
                "eval_every": _at_least(0), "checkpoint_every": _at_least(0),
                "max_to_keep": _at_least(1)}
_OPTIM_RULES = {"schedule": _choice(SCHEDULES), "lr": _at_least(0), "warmup_steps": _at_least(0),
                "end_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                "b1": (lambda v: 0 <= v < 1, "in [0, 1)"), "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
                "eps": (lambda v: v > 0, "> 0"), "weight_decay": _at_least(0),
                "clip_norm": _at_least(0), "grad_accum": _at_least(1)}
_RULES = {
    "model.param_dtype": _choice(DTYPES), "model.dtype": _choice(DTYPES),
    "model.lora_rank": _at_least(0), "finetune.lora_rank": _at_least(-1),
    "prompt.template": _choice(TEMPLATES),
    "prompt.max_len": _at_least(8), "prompt.max_prompt_len": _at_least(8),
    "data.task": _choice(TASKS), "data.alignment_harmful": _choice(SOURCES),
    "data.alignment_harmless": _choice(SOURCES), "data.harmful_source": _choice(SOURCES),
    "data.harmful_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "data.user_n": _at_least(1),
    "refusal.layer_range": (lambda v: 0 <= v[0] <= v[1] <= 1, "(lo, hi) with 0 <= lo <= hi <= 1"),
    "refusal.n_probe": _at_least(1), "refusal.n_val": _at_least(1),
    "refusal.batch_size": _at_least(1), "teacher.reg_weight": _at_least(0),
    "teacher.reg_form": _choice(REG_FORMS), "teacher.refusal_update_every": _at_least(1),
    "filter.target_recall": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "filter.scorer": _choice(SCORERS), "filter.calibration_rule": _choice(CALIBRATION_RULES),
    "filter.calibration_harmful": _choice(("", MIX_CALIB)), "filter.logistic_l2": _at_least(0),
    "filter.n_fit": _at_least(2), "filter.layer": _at_least(-1),
    "refusal.val_harmful": _choice(tuple(SOURCES) + LABELLED_SETS),
    "data.alignment_mix": _names(HARMFUL_TRAINABLE),
    "data.harmless_mix": _names(names("harmless trainable") + (EDGY,)),
    "data.holdout_source": _choice(("",) + HARMFUL_TRAINABLE),
    "data.n_harmless_mix": _at_least(1), "data.wrap_per_family": _at_least(0),
    "data.refusal_targets": _choice(REFUSAL_TARGETS),
    **{f"generalisation.{k}": _at_least(1) for k in ("n_source", "n_benign", "wrap_per_family")},
    "filter.threshold": (lambda v: math.isnan(v) or -1 <= v <= 1,
                         "nan (calibrate) or a cosine in [-1, 1]"),
    "finetune.kd_weight": _at_least(0), "finetune.kd_temperature": (lambda v: v > 0, "> 0"),
    "finetune.kd_direction": _choice(KD_DIRECTIONS),
    "finetune.align_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "eval.judge": _choice(JUDGES),
    "finetune.kd_topk": _at_least(0), "finetune.epochs": _at_least(0),
    "finetune.max_len": _at_least(8), "finetune.pack_len": _at_least(8),
    **{f"{s}.target_logits": (lambda v: 0 <= v <= 1, "in [0, 1]") for s in ("teacher", "finetune")},
    "generate.max_new_tokens": _at_least(1), "generate.temperature": _at_least(0),
    "judge.layers": (lambda v: len(v) >= 1 and all(int(x) >= 1 for x in v),
                     "one or more hidden-state indices >= 1"),
    "judge.pooling": _choice(POOLINGS), "judge.threshold_rule": _choice(THRESHOLD_RULES),
    "judge.non_answer_kinds": (lambda v: len(v) >= 1 and set(v) <= set(NON_ANSWER_TYPES),
                               f"a non-empty tuple of {NON_ANSWER_TYPES}"),
    "judge.hidden": _at_least(0), "judge.l2": _at_least(0), "judge.prompt_tokens": _at_least(1),
    "judge.response_tokens": _at_least(1), "judge.n_harmful": _at_least(1),
    **{f"judge.n_{k}": _at_least(0) for k in ("safe_beavertails", "safe_stl", "helpful",
                                              "non_answer", "validation", "refuse_comply")},
    "judge.calib_percent": (lambda v: 1 <= v <= 50, "in [1, 50]"), "judge.batch_size": _at_least(1),
    **{f"{s}.train.{k}": r for s in ("teacher", "finetune", "judge")
       for k, r in _TRAIN_RULES.items()},
    **{f"{s}.optim.{k}": r for s in ("teacher", "finetune", "judge")
       for k, r in _OPTIM_RULES.items()},
}


def _check(c: ml_collections.ConfigDict, rules: Mapping[str, tuple], prefix: str = "") -> None:
  for key, (ok, expected) in rules.items():
    value = c
    for part in key.split("."):
      value = value[part]
    if not ok(value):
      raise ConfigError(f"config.{prefix}{key}: {value!r}; expected {expected}")


def validate_train(c: ml_collections.ConfigDict, where: str = "train") -> None:
  """One `train` section (a stage's loop)."""
  _check(c, _TRAIN_RULES, where + ".")


def validate_optim(c: ml_collections.ConfigDict, where: str = "optim") -> None:
  """One `optim` section."""
  _check(c, _OPTIM_RULES, where + ".")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad key; call before any expensive work."""
  for stage in c.stages:
    if stage not in STAGES:
      raise ConfigError(f"config.stages: {stage!r}; expected some of {tuple(STAGES)}")
  try:
    parse_methods(c.method)
    hub.check_name(c.model.name, "model.name")
    if c.teacher.init != "base":
      hub.check_name(c.teacher.init, "teacher.init")
    hub.check_name(c.judge.backbone, "judge.backbone")
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith("config.") else f"config.method: {e}") from None
  _check(c, _RULES)
  if not c.data.alignment_mix and (c.data.holdout_source or MIX_CALIB in (
      c.refusal.val_harmful, c.filter.calibration_harmful)):
    raise ConfigError("config.data.alignment_mix: ''; expected harmful sources, since "
                      f"data.holdout_source or {MIX_CALIB!r} (refusal/filter) needs a mix")
  if c.finetune.pack_len < c.finetune.max_len:
    raise ConfigError(f"config.finetune.pack_len: {c.finetune.pack_len}; expected >= "
                      f"finetune.max_len={c.finetune.max_len} (an example must fit a row)")


def nearest_key(c: ml_collections.ConfigDict, dotted: str) -> str | None:
  """The existing dotted key closest to `dotted` (for "did you mean" in errors)."""
  match = difflib.get_close_matches(dotted, list(dotted_keys(c)), n=1, cutoff=0.5)
  return match[0] if match else None


def dotted_keys(c: Any, prefix: str = ""):
  """Every field's full dotted name (`finetune.train.steps`)."""
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict) and len(v):
      yield from dotted_keys(v, key + ".")
    else:
      yield key
