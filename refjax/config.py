"""The config schema with documented defaults, and its validation in one place.

Every config file (`configs/*.py`) starts from `base_config()` and overrides fields; `validate`
names the bad key and what was expected before any expensive work starts. Values the paper leaves
open carry a comment saying what they mean and where the default comes from.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

METHODS = ("reft", "sft", "sa_ft", "joint", "filter_only", "distill_only")
STAGES = ("teacher", "refusal", "filter", "finetune", "evaluate")


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults. Config files override what their setting changes."""
  c = ml_collections.ConfigDict()
  c.method = "reft"  # reft | sft | sa_ft | joint | filter_only | distill_only
  c.seed = 0
  c.stages = STAGES  # what `python -m refjax.main` runs when --stages is not given

  # The base model: student init and (teacher_init="base") teacher init.
  c.model = ml_collections.ConfigDict(dict(
      name="smollm2-135m-instruct",  # refjax.assets name, local HF dir, or hub id
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
      task="sst2",  # the user's task: sst2 | ag_news | gsm8k
      user_n=1000,  # user examples (peer harness default n=1000)
      harmful_ratio=0.1,  # share of harmful QA pairs in the user data (peer harness p=0.1)
      harmful_source="beavertails_harmful_qa",  # disjoint from the alignment rows
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
      # alignment source the alignment set does not use (same distribution as harmful user data).
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
      reg_form="one_minus_cos",  # one_minus_cos | squared | margin
      reg_margin=0.5,  # margin form only
      refusal_update_every=20,  # steps between refusal-feature recomputations (dynamic update)
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
      batch_size=16,
  ))

  # Student finetuning (paper Sec. 3.2).
  c.finetune = ml_collections.ConfigDict(dict(
      kd_weight=1.0,  # weight of the distillation KL (paper: unstated; our default)
      kd_temperature=1.0,  # T, with the usual T^2 scaling
      kd_direction="forward",  # forward = KL(teacher || student); reverse = KL(student || teacher)
      align_ce_weight=0.0,  # extra CE on the alignment labels (0 = pure distillation)
      align_ratio=0.5,  # share of each batch's rows drawn from the alignment data
      keep_checkpoints=False,  # delete a finished stage's Orbax checkpoints (the model is exported)
  ))
  c.finetune.train = train_config(steps=200, batch_size=8)
  c.finetune.optim = optim_config(lr=2e-5)

  # Evaluation: harmful score (HS) and finetuning accuracy (FA).
  c.eval = ml_collections.ConfigDict(dict(
      hs_source="beavertails_eval",  # harmful test prompts (peer harness: BeaverTails 30k_test)
      hs_n=1000,  # peer harness: 1000 prompts
      judge="refusal_keywords",  # refusal_keywords | moderation | llama_guard
      judge_model="",  # model dir/name for moderation or llama_guard judges
      fa_n=1000,  # task test examples (peer harness: first 1000; SST-2 has 872)
      max_new_tokens=64,
      fa_max_new_tokens=16,  # task answers are short (GSM8K needs more: see configs)
      batch_size=16,
      include_base=True,  # also evaluate the untouched base model (row "base")
  ))

  c.mesh = mesh_config()
  c.distributed = distributed_config()
  c.train = train_config()  # defaults for anything that trains outside a stage section
  return c


def train_config(**overrides) -> ml_collections.ConfigDict:
  from refjax.train_loop import train_config as tc
  c = tc()
  c.update(overrides)
  return c


def optim_config(**overrides) -> ml_collections.ConfigDict:
  from refjax.optim import optim_config as oc
  c = oc()
  c.update(overrides)
  return c


def mesh_config() -> ml_collections.ConfigDict:
  from refjax.parallel.mesh import mesh_config as mc
  return mc()


def distributed_config() -> ml_collections.ConfigDict:
  from refjax.parallel.distributed import distributed_config as dc
  return dc()


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; call before any expensive work."""

  def need(ok: bool, key: str, msg: str):
    if not ok:
      raise ValueError(f"config.{key}: {msg}")

  for s in c.stages:
    need(s in STAGES + ("generate",), "stages", f"unknown stage {s!r}; expected some of "
         f"{STAGES + ('generate',)}")
  need(c.model.param_dtype in ("float32", "bfloat16"), "model.param_dtype",
       f"{c.model.param_dtype!r}; expected float32 or bfloat16")
  need(c.model.dtype in ("float32", "bfloat16"), "model.dtype",
       f"{c.model.dtype!r}; expected float32 or bfloat16")
  need(c.model.lora_rank >= 0, "model.lora_rank", f"{c.model.lora_rank}; expected >= 0")
  need(c.prompt.template in ("chat", "alpaca"), "prompt.template",
       f"{c.prompt.template!r}; expected chat or alpaca")
  need(c.prompt.max_len >= 8, "prompt.max_len", f"{c.prompt.max_len}; expected >= 8")
  for m in methods(c):
    need(m in METHODS, "method", f"{m!r} is not one of {METHODS}")
  need(c.data.task in ("sst2", "ag_news", "gsm8k"), "data.task",
       f"{c.data.task!r}; expected sst2, ag_news or gsm8k")
  need(0 <= c.data.harmful_ratio <= 1, "data.harmful_ratio", f"{c.data.harmful_ratio}; expected 0..1")
  need(c.data.user_n >= 1, "data.user_n", "expected >= 1")
  lo, hi = c.refusal.layer_range
  need(0 <= lo <= hi <= 1, "refusal.layer_range", f"{(lo, hi)}; expected 0 <= lo <= hi <= 1")
  need(c.refusal.n_probe >= 1 and c.refusal.n_val >= 1, "refusal.n_probe/n_val", "expected >= 1")
  need(c.teacher.reg_weight >= 0, "teacher.reg_weight", "expected >= 0")
  need(c.teacher.reg_form in ("one_minus_cos", "squared", "margin"), "teacher.reg_form",
       f"{c.teacher.reg_form!r}; expected one_minus_cos, squared or margin")
  need(c.teacher.refusal_update_every >= 1, "teacher.refusal_update_every", "expected >= 1")
  need(0 < c.filter.target_recall <= 1, "filter.target_recall", "expected in (0, 1]")
  need(c.finetune.kd_weight >= 0, "finetune.kd_weight", "expected >= 0")
  need(c.finetune.kd_temperature > 0, "finetune.kd_temperature", "expected > 0")
  need(c.finetune.kd_direction in ("forward", "reverse"), "finetune.kd_direction",
       f"{c.finetune.kd_direction!r}; expected forward or reverse")
  need(0 <= c.finetune.align_ratio < 1, "finetune.align_ratio", "expected 0 <= ratio < 1")
  need(c.eval.judge in ("refusal_keywords", "moderation", "llama_guard"), "eval.judge",
       f"{c.eval.judge!r}; expected refusal_keywords, moderation or llama_guard")
  from refjax.optim import validate as validate_optim
  from refjax.train_loop import validate_train_config
  for section in ("teacher", "finetune"):
    for key, fn in (("optim", validate_optim), ("train", validate_train_config)):
      try:
        fn(c[section][key])
      except ValueError as e:
        raise ValueError(f"config.{section}.{e}") from None
  need(c.generate.max_new_tokens >= 1, "generate.max_new_tokens", "expected >= 1")
  need(c.generate.temperature >= 0, "generate.temperature", "expected >= 0")


def methods(c: ml_collections.ConfigDict) -> list[str]:
  """`config.method` may name several methods, comma-separated (they share teacher and filter)."""
  return [m.strip() for m in str(c.method).split(",") if m.strip()]


def write_resolved(c: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config as JSON into the workdir (every run does this first)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    json.dump(to_dict(c), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def to_dict(c: Any) -> Any:
  if isinstance(c, ml_collections.ConfigDict):
    return {k: to_dict(v) for k, v in c.items()}
  if isinstance(c, (list, tuple)):
    return [to_dict(v) for v in c]
  return c
