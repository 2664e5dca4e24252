"""The one training loop every stage uses (teacher preparation, baselines, student finetuning).

It owns the edges around the pure jitted step: resumable data, host -> global batches, progress
bar, metrics (JSONL + TensorBoard), evaluation and step hooks, Orbax checkpoints (async, resumed
automatically with data position, RNG, hook-updated step inputs and the resolved config),
SIGTERM (save, then exit cleanly) and non-finite losses or gradients (the step drops the update;
the loop stops naming the step; every checkpoint holds finite parameters).

Step numbering: `step` is the number of optimizer updates done. Metrics of the update that takes
the state from step s-1 to s are logged as step s; a checkpoint named s holds the state after s
updates and the data position s (the next batch is batch s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from refjax.files import jsonable, read_jsonl, write_json, write_jsonl
from refjax.parallel.distributed import host_to_global
from refjax.training import checkpoint
from refjax.training.data import DataIterator
from refjax.training.state import TrainState

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


# ------------------------------------------------------------------------------------------------
# Hooks and results


@dataclasses.dataclass
class HookResult:
  """What a step hook hands back: new values for named step inputs (extras), metrics to log."""

  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepHook:
  """Runs `fn(step, state, extras)` before the update from `step` whenever step % every == 0
  (so at step 0 too, and again at a resumed step that is a multiple of `every`)."""

  every: int
  fn: Callable[[int, TrainState, Mapping[str, Any]], HookResult | None]
  name: str = "hook"

  def __post_init__(self):
    if int(self.every) < 1:
      raise ValueError(f"StepHook {self.name!r}: every={self.every}; expected >= 1")


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  extras: dict[str, Any]
  step: int
  metrics: dict[str, float]  # the last step's metrics
  resumed_from: int | None  # checkpoint step the run resumed from, if any


class Preempted(SystemExit):
  """Raised after SIGTERM once a checkpoint is saved; uncaught, the process exits with status 0."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


class NonFiniteLoss(FloatingPointError):
  """A NaN or inf loss or gradient; names the step; no update or checkpoint holds it."""


# ------------------------------------------------------------------------------------------------
# Metrics


class MetricWriter:
  """JSONL (one record per logged step) and TensorBoard scalars, written by process 0 only."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self.path = workdir / METRICS_FILE
    self._tb = None
    if enabled:
      self._tb = _summary_writer_cls()(str(workdir / TENSORBOARD_DIR))

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint a resumed run restarts from), so
    a resumed run's log holds every step once."""
    if not self.enabled or not self.path.exists():
      return
    rows = read_jsonl(self.path, torn_tail_ok=True)
    write_jsonl(self.path, [r for r in rows if r.get("step", 0) <= step])

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _metric_value(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:  # append-only log; a torn last line is dropped on resume
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _summary_writer_cls():
  """tensorboardX.SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (only to recognise its tensors), which costs ~5 s per process; we log floats."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def _metric_value(v: Any) -> Any:
  """A metric as JSON: a non-finite float is kept visible as the string "nan"/"inf"."""
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


# ------------------------------------------------------------------------------------------------
# The loop


class _SigtermFlag:
  """Sets a flag on SIGTERM (main thread only); the loop saves and stops at the next step end."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True on every process if any process got SIGTERM (they must save the same step)."""
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))


def _abstract(tree: Any, shardings: Any = None) -> Any:
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    init_state: TrainState | Callable[[], TrainState],
    state_shardings: TrainState,
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    data: DataIterator,
    batch_shardings: Mapping[str, Any],
    extras: Mapping[str, Any] | None = None,
    checkpoint_extras: Sequence[str] = (),
    eval_fn: Callable[[TrainState, Mapping[str, Any]], Mapping[str, float]] | None = None,
    hooks: Sequence[StepHook] = (),
) -> TrainResult:
  """Runs `config.train.steps` updates of `train_step(state, batch, extras)`.

  init_state: the initial state or a function making it (only called when no checkpoint exists,
    so a resumed run never allocates a throwaway state). state_shardings: its shardings.
  data: host-local batches, resumable (see DataIterator); each is made global with
    `batch_shardings` (global batch = config.train.batch_size).
  extras: the step's named frozen inputs (a dict). Those in `checkpoint_extras`
    (e.g. a refusal feature a hook recomputes) are saved and restored with the state.
  eval_fn(state, extras) -> metrics, every train.eval_every steps, logged as "eval/<name>".
  hooks: StepHooks that may replace extras and log metrics.
  """
  tc = config.train
  workdir = Path(workdir)
  primary = jax.process_index() == 0
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
  extras = dict(extras or {})
  unknown = [k for k in checkpoint_extras if k not in extras]
  if unknown:
    raise KeyError(f"checkpoint_extras {unknown} are not in extras {sorted(extras)}")
  config_dict = jsonable(config)
  if primary:
    write_json(workdir / CONFIG_FILE, config_dict)

  manager = ocp.CheckpointManager(
      (workdir / CHECKPOINT_DIR).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=int(tc.max_to_keep), enable_async_checkpointing=bool(tc.async_checkpoint),
          cleanup_tmp_directories=True, create=True))
  writer = MetricWriter(workdir, enabled=primary)

  # ---- resume or start (a built state's frozen weights stay out of its checkpoints)
  given = None if callable(init_state) else init_state
  sums = None
  resumed_from = manager.latest_step()
  if resumed_from is not None:
    abstract_state = (jax.eval_shape(init_state) if given is None
                      else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), given))
    state, restored_extras, meta = checkpoint.restore(
        manager, resumed_from, _abstract(abstract_state, state_shardings), given,
        _abstract({k: extras[k] for k in checkpoint_extras}))
    extras.update(restored_extras)
    data.set_state(meta["data"])
    if meta.get("config") != config_dict:
      log.warning("resuming from step %d of a run whose saved config differs from this one",
                  resumed_from)
    writer.truncate_after(resumed_from)
    log.info("resumed from %s at step %d", workdir / CHECKPOINT_DIR, resumed_from)
  else:
    state = init_state() if given is None else given
  step = int(jax.device_get(state.step))
  if resumed_from is not None and step != resumed_from:
    raise RuntimeError(f"checkpoint {resumed_from} holds state.step={step}; the files are corrupt")
  with_frozen = given is None
  if not with_frozen:
    sums = checkpoint.frozen_sums(state)
  del given  # a resumed run holds no reference to the state it was given

  def save(at: int) -> None:
    checkpoint.save(manager, at, state, {k: extras[k] for k in checkpoint_extras},
                    {"step": at, "data": data.get_state(), "config": config_dict},
                    with_frozen=with_frozen, sums=sums)

  from tqdm.auto import tqdm  # the bar is an edge concern: imported where it is drawn
  bar = tqdm(total=int(tc.steps), initial=step, disable=not (primary and tc.progress_bar),
             dynamic_ncols=True)
  last_saved = resumed_from
  metrics: dict[str, float] = {}
  t_prev = time.perf_counter()
  try:
    with _SigtermFlag() as sigterm:
      while step < int(tc.steps):
        hook_metrics: dict[str, float] = {}
        for hook in hooks:
          if step % int(hook.every) == 0:
            out = hook.fn(step, state, extras)
            if out is not None:
              bad = [k for k in out.extras if k not in extras]
              if bad:
                raise KeyError(f"hook {hook.name!r} returned unknown extras {bad}; expected some "
                               f"of {sorted(extras)}")
              extras.update(out.extras)
              hook_metrics.update({f"{hook.name}/{k}": float(v) for k, v in out.metrics.items()})
        local = next(data)
        sizes = getattr(data, "batch_sizes", None) or int(tc.batch_size)
        batch = host_to_global(local, batch_shardings, sizes)
        state, step_metrics = train_step(state, batch, extras)
        # Block on every step: fake CPU devices deadlock on back-to-back collectives
        # (shared/ENV.md), and the NaN check below needs the loss anyway.
        jax.block_until_ready((state, step_metrics))
        metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not metrics.get("applied", 1.0):
          manager.wait_until_finished()
          raise NonFiniteLoss(
              f"step {step + 1} (the update from step {step}) has loss {metrics['loss']} and "
              f"gradient norm {metrics['grad_norm']}: the update was not applied and nothing was "
              f"saved; the newest checkpoint (step {manager.latest_step()} in "
              f"{workdir / CHECKPOINT_DIR}) holds finite parameters and resumes. Fix the cause "
              "(e.g. lower optim.lr) and rerun")
        step += 1
        now = time.perf_counter()
        tokens = sum(v.size for k, v in batch.items() if k.endswith("tokens"))
        metrics["tokens_per_s"] = tokens / max(now - t_prev, 1e-9)
        metrics["step_time_s"] = now - t_prev
        t_prev = now
        metrics.update(hook_metrics)
        bar.update(1)
        if step % int(tc.log_every) == 0 or step == int(tc.steps) or hook_metrics:
          writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if eval_fn is not None and int(tc.eval_every) and (
            step % int(tc.eval_every) == 0 or step == int(tc.steps)):
          eval_metrics = {f"eval/{k}": float(v) for k, v in eval_fn(state, extras).items()}
          writer.write(step, eval_metrics)
          metrics.update(eval_metrics)
          t_prev = time.perf_counter()  # evaluation time is not training throughput
        if (int(tc.checkpoint_every) and step % int(tc.checkpoint_every) == 0) or (
            step == int(tc.steps)):
          save(step)
          last_saved = step
        if sigterm.any_process():
          if last_saved != step:
            save(step)
          manager.wait_until_finished()
          log.warning("SIGTERM: saved step %d in %s; exiting", step, workdir / CHECKPOINT_DIR)
          raise Preempted(step)
      if last_saved != step:  # resumed at the very end: make sure the last step is on disk
        save(step)
      manager.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    manager.close()
  return TrainResult(state, extras, step, metrics, resumed_from)
