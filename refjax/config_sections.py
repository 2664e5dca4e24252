"""The config sections every training stage and every run repeats: a stage's training loop and
optimizer, the device mesh and jax.distributed; and the judge's section (`refjax.config.base_config`
uses them; the schema's one home stays `refjax.config`, which re-exports them)."""

from __future__ import annotations

import ml_collections

from refjax.data.non_answers import NON_ANSWER_TYPES


def train_config(**overrides) -> ml_collections.ConfigDict:
  """One stage's training loop (`teacher.train`, `finetune.train`)."""
  c = ml_collections.ConfigDict(dict(
      steps=1000,  # optimizer updates in the whole stage (the schedule's length)
      batch_size=8,  # global batch: examples per optimizer update, over all processes
      seed=0,  # parameter init, data order and the step RNG all derive from it
      log_every=10,  # steps between metric records (JSONL, TensorBoard, progress bar)
      eval_every=0,  # steps between eval_fn calls (also after the last step); 0 = never
      checkpoint_every=100,  # steps between checkpoints (the last step is always saved); 0 = last
      max_to_keep=3,  # newest checkpoints kept on disk
      async_checkpoint=True,  # write checkpoints in the background while training continues
      progress_bar=True,  # tqdm bar with loss and tokens/s on process 0
      keep_checkpoints=False,  # keep a finished stage's Orbax checkpoints (its model is exported)
  ))
  c.update(overrides)
  return c


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """One stage's optimizer (transformers Trainer's defaults unless noted)."""
  c = ml_collections.ConfigDict(dict(
      lr=5e-5,  # peak learning rate (Trainer default)
      schedule="linear",  # after warmup: refjax.training.optim.SCHEDULES, to end_lr_ratio
      warmup_steps=0,  # linear warmup from 0 to lr over this many optimizer steps
      end_lr_ratio=0.0,  # final lr / peak lr at the last step, for cosine and linear
      b1=0.9, b2=0.999, eps=1e-8,  # Adam
      weight_decay=0.0,  # decoupled (AdamW, multiplied by the lr as in PyTorch); 0 = off
      # Regexes searched in each parameter's path ("layers/self_attn/q_proj/bias"): a match gets
      # no weight decay. Default: norms, biases and the token embedding (GPT/Llama practice).
      no_decay=("norm", "bias", "embed_tokens"),
      clip_norm=1.0,  # clip the global gradient norm to this; 0 = no clipping (Trainer default 1)
      grad_accum=1,  # microbatches per optimizer step (the global batch must divide by it)
  ))
  c.update(overrides)
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The device mesh: each axis' size and overrides of the sharding rules."""
  c = ml_collections.ConfigDict()
  # Exactly one size may be -1 ("all remaining devices"); their product is the device count.
  # Default: every device on fsdp (ZeRO-3 style), the MaxText default.
  c.data = 1  # pure data parallelism: replicated parameters, split batch
  c.fsdp = -1  # parameters/optimizer state split along `embed`, batch split too
  c.tensor = 1  # Megatron-style split of heads / mlp / vocab
  # Overrides of refjax.parallel.rules.DEFAULT_RULES: {logical axis: mesh axis, list, or None}.
  c.rules = ml_collections.ConfigDict()
  return c


def distributed_config() -> ml_collections.ConfigDict:
  """jax.distributed; empty fields fall back to the JAX_* environment variables."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS
  c.num_processes, c.process_id = 0, -1  # 0 / -1 = $JAX_NUM_PROCESSES / $JAX_PROCESS_ID
  # With nothing configured: let jax detect a cluster (TPU pod, SLURM, ...). Off by default so a
  # laptop or single VM never waits on cluster probes.
  c.auto_detect = False
  c.initialization_timeout = 300  # seconds to wait for every process to join
  return c


def judge_config() -> ml_collections.ConfigDict:
  """The QA-moderation judge (refjax.evaluation.qa_judge): the HS judge `qa_probe` and the
  `judge_filter` baseline's screen. Defaults: the best recipe of the sweeps behind issue 14."""
  c = ml_collections.ConfigDict(dict(
      backbone="smollm2-135m-instruct",  # frozen, cut after its highest read block
      layers=(18, 22),  # hidden states read (after block i)
      pooling="both",  # last token, mean over the answer, or both (qa_judge.POOLINGS)
      hidden=64, l2=1e-3,  # MLP head width (0 = logistic) and its weight penalty
      prompt_tokens=64, response_tokens=96,  # what of a pair the judge reads
      n_harmful=900, n_safe_beavertails=500, n_safe_stl=200, n_helpful=100, n_non_answer=2400,
      # harmful pairs whose answer opens with a refusal and then complies anyway: so a refusal
      # opener alone never reads as safe (refusal_phrasings.refuse_then_comply)
      n_refuse_comply=200,
      # the kinds cycled over the non-answer pairs (a kind listed n times gets n shares): the
      # ones the judge mistook most (unrelated answers, cut-off replies) at five shares, short
      # refusals (what students trained on templated refusals write) at six
      non_answer_kinds=NON_ANSWER_TYPES + ("alpaca", "cutoff", "garbled", "token_rep")
      + ("alpaca", "cutoff") * 3 + ("refusal",) * 5,
      # "half": 0.5 on the class-balanced head; "youden": max TPR - FPR on held-out training
      # prompts (calib_percent of them), which sat above the validated range (issue 14 sweep)
      calib_percent=15, threshold_rule="half",
      batch_size=8, seed=0,
      n_validation=128,  # development prompts validated on when built (0 = all 513)
      cache="",  # where built judges are kept; "" = ${REFJAX_CACHE:-~/.cache/refjax}/judges
  ))
  c.train = train_config(steps=400, batch_size=1, log_every=100, checkpoint_every=0,
                         progress_bar=False)  # batch: the whole fit set
  c.optim = optim_config(lr=3e-3, schedule="constant", clip_norm=0.0)
  return c


__all__ = ["train_config", "optim_config", "mesh_config", "distributed_config", "judge_config"]
