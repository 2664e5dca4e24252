"""`fit`: a model, a loss function, data and named frozen inputs -> the trained model.

Teacher preparation, the `sa_ft` alignment phase and student finetuning differ only in their loss
function, data and step inputs; `fit` wires those into the one train state
(`refjax.training.state`), the one jitted step (`refjax.training.step`) and the one loop
(`refjax.training.loop`). It knows nothing of refusal features or teachers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from flax import nnx

from refjax.files import read_jsonl
from refjax.parallel.plan import Parallel
from refjax.training.loop import METRICS_FILE, StepHook, TrainResult, train
from refjax.training.optim import make_optimizer, trainable_filter
from refjax.training.state import train_state_from_model
from refjax.training.step import make_train_step


def train_graphdef(model: nnx.Module, lora_rank: int = 0) -> nnx.GraphDef:
  """The graphdef `fit` merges (trained, frozen) states with; hooks rebuild the model from it."""
  return nnx.split(model, trainable_filter(_lora_rank(model, lora_rank)), ...)[0]


def _lora_rank(model: nnx.Module, default: int) -> int:
  cfg = getattr(model, "cfg", None)
  return int(getattr(cfg, "lora_rank", default) or 0)


def fit(stage_cfg: ml_collections.ConfigDict, workdir: str | Path, model: nnx.Module,
        loss_fn: Callable, data, batch_shardings: Mapping[str, Any], plan: Parallel, *,
        extras: Mapping[str, Any] | None = None,
        extra_shardings: Mapping[str, Any] | None = None,
        checkpoint_extras: Sequence[str] = (), hooks: Sequence[StepHook] = (),
        eval_fn: Callable | None = None) -> tuple[nnx.Module, TrainResult]:
  """Trains `model` with `loss_fn(model, batch, rng, extras)`; returns the trained model.

  stage_cfg holds `train` and `optim` (this stage's steps, batch, lr, ...). `extras` are named
  frozen step inputs with `extra_shardings` of the same keys. A model with LoRA adapters
  (`model.cfg.lora_rank > 0`) trains its adapters only; the base weights stay bit-identical.
  """
  extras, extra_shardings = dict(extras or {}), dict(extra_shardings or {})
  if set(extras) != set(extra_shardings):
    raise ValueError(f"extras {sorted(extras)} and extra_shardings {sorted(extra_shardings)} must "
                     "have the same keys")
  wrt = trainable_filter(_lora_rank(model, 0))
  tx, schedule = make_optimizer(stage_cfg.optim, int(stage_cfg.train.steps))
  graphdef, state, shardings = train_state_from_model(
      model, tx, plan.mesh, plan.rules, wrt=wrt, seed=int(stage_cfg.train.seed))
  step = make_train_step(loss_fn, graphdef, tx, state_shardings=shardings,
                         batch_shardings=batch_shardings, extra_shardings=extra_shardings,
                         grad_accum=int(stage_cfg.optim.grad_accum), schedule=schedule)
  result = train(stage_cfg, workdir, init_state=state, state_shardings=shardings,
                 train_step=step, data=data, batch_shardings=batch_shardings, extras=extras,
                 checkpoint_extras=checkpoint_extras, eval_fn=eval_fn, hooks=hooks)
  trained = nnx.merge(graphdef, result.state.params, result.state.frozen)
  return trained, result


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  """The JSONL metric records a `fit` wrote (for reports and tests)."""
  path = Path(workdir) / METRICS_FILE
  return read_jsonl(path) if path.exists() else []


__all__ = ["fit", "train_graphdef", "read_metrics"]
