"""The optimizer from an `optim` config section: AdamW, global-norm clipping, warmup + schedule,
decay mask.

Gradient accumulation (`cfg.optim.grad_accum`) is not an optax wrapper: the train step scans over
microbatches inside one jitted call (see `refjax.training.step`), so the optimizer here only ever
sees whole-batch gradients and its step count is the number of optimizer updates.
With LoRA the optimizer is built over the adapters only (`refjax.training.state` splits them off), so
the base weights are never an optimizer input and stay bit-identical.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
import optax
from flax import nnx

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """lr(step): linear warmup 0 -> lr over warmup_steps, then constant, cosine or linear to
  lr * end_lr_ratio at `total_steps` (cfg: an `optim` section, validated by refjax.config)."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  decay = max(int(total_steps) - warmup, 1)
  end = lr * float(cfg.end_lr_ratio)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay, alpha=float(cfg.end_lr_ratio))
  else:
    main = optax.linear_schedule(lr, end, decay)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _path_str(path) -> str:
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    if name is not None and name != "value":
      parts.append(str(name))
  return "/".join(parts)


def decay_mask(params: Any, no_decay: Sequence[str] = ("norm", "bias", "embed_tokens")) -> Any:
  """A bool per parameter (same tree as `params`): True = weight decay applies."""
  patterns = [re.compile(p) for p in no_decay]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(_path_str(path)) for p in patterns), params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW with the decay mask and schedule), and the schedule for logging."""
  schedule = make_schedule(cfg, total_steps)
  no_decay = tuple(cfg.no_decay)
  mask: Callable[[Any], Any] | None = None
  if cfg.weight_decay > 0:
    mask = lambda params: decay_mask(params, no_decay)  # noqa: E731
  adamw = optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                      weight_decay=float(cfg.weight_decay), mask=mask)
  parts = [adamw]
  if cfg.clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(float(cfg.clip_norm)))
  return optax.chain(*parts), schedule


def trainable_filter(lora_rank: int) -> Any:
  """The nnx filter of what trains: the LoRA adapters when lora_rank > 0, else every Param."""
  return nnx.LoRAParam if lora_rank > 0 else nnx.Param
