"""Trains a tiny random decoder on synthetic tokens through the shared loop: the smoke run the
train-loop, multi-process and launch tests drive (kill/resume, SIGTERM, NaN, jax.distributed).

  python -m refjax.tools.train_tiny --workdir=/tmp/run --steps=6 --mesh=1,-1,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np


def synthetic_data(n: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
  """Random prompts + responses with left padding, a response loss mask and some zero weights."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (n, seq_len)).astype(np.int32)
  pad = rng.integers(0, seq_len // 4, n)
  attention = (np.arange(seq_len)[None] >= pad[:, None]).astype(np.int32)
  tokens = tokens * attention
  prompt_end = pad + rng.integers(2, seq_len // 2, n)
  loss_mask = ((np.arange(seq_len)[None] > prompt_end[:, None]) & (attention > 0)).astype(np.int32)
  weights = (rng.random(n) > 0.2).astype(np.float32)
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask,
          "weights": weights}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=16)
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
  p.add_argument("--lora_rank", type=int, default=0)
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--checkpoint_every", type=int, default=2)
  p.add_argument("--log_every", type=int, default=1)
  p.add_argument("--eval_every", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sleep", type=float, default=0.0, help="seconds slept before each step")
  p.add_argument("--nan_at_step", type=int, default=-1, help="poison the loss from this step on")
  p.add_argument("--nan_grad_at_step", type=int, default=-1,
                 help="from this step on, a finite loss with NaN gradients")
  p.add_argument("--params_out", default="", help="write the final params here (.npz; process 0 writes, every process must get it)")
  p.add_argument("--coordinator", default="", help="host:port of process 0 (jax.distributed)")
  p.add_argument("--num_processes", type=int, default=0)
  p.add_argument("--process_id", type=int, default=-1)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # after argument parsing: XLA_FLAGS / JAX_* come from the caller's environment
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx

  from refjax import parallel
  from refjax.parallel import distributed

  from refjax import config as config_lib
  dcfg = config_lib.distributed_config()
  dcfg.coordinator_address = args.coordinator
  dcfg.num_processes = args.num_processes
  dcfg.process_id = args.process_id
  distributed.initialize(dcfg)

  from refjax.method.losses import causal_lm_loss
  from refjax.models import Decoder, ModelConfig
  from refjax.training import data as data_lib
  from refjax.training import loop, optim, state as train_state, step as train_step

  cfg = ml_collections.ConfigDict(dict(
      optim=config_lib.optim_config(), mesh=config_lib.mesh_config(),
      train=config_lib.train_config(), distributed=dcfg))
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in args.mesh.split(","))
  cfg.optim.lr = 1e-3
  cfg.optim.warmup_steps = 2
  cfg.optim.schedule = "cosine"
  cfg.optim.weight_decay = 0.01
  cfg.optim.grad_accum = args.grad_accum
  cfg.train.steps = args.steps
  cfg.train.batch_size = args.batch_size
  cfg.train.seed = args.seed
  cfg.train.log_every = args.log_every
  cfg.train.checkpoint_every = args.checkpoint_every
  cfg.train.eval_every = args.eval_every
  cfg.train.progress_bar = False
  model_cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, lora_rank=args.lora_rank)
  cfg.model = json.loads(json.dumps(dataclasses.asdict(model_cfg)))

  mesh = parallel.make_mesh(cfg.mesh)
  rules = parallel.make_rules(cfg.mesh.rules)
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
  wrt = optim.trainable_filter(model_cfg.lora_rank)
  model_fn = lambda rngs: Decoder(model_cfg, rngs=rngs)  # noqa: E731
  graphdef, abstract = train_state.abstract_train_state(model_fn, tx, wrt, cfg.train.seed)
  shardings = train_state.state_shardings(abstract, mesh, rules)

  arrays = synthetic_data(64, args.seq_len, model_cfg.vocab_size, seed=1234)
  example = {k: jax.ShapeDtypeStruct((args.batch_size,) + v.shape[1:], v.dtype)
             for k, v in arrays.items()}
  batch_shardings = parallel.batch_shardings(example, mesh, rules)
  rows = parallel.process_batch_rows(batch_shardings["tokens"], args.batch_size)
  data = data_lib.ArrayIterator(arrays, args.batch_size, seed=cfg.train.seed, rows=rows)

  @jax.custom_vjp
  def nan_grad(x, on):  # 0 in the forward pass; a NaN gradient for x when `on` is 1
    return 0.0 * x

  nan_grad.defvjp(lambda x, on: (0.0 * x, on),
                  lambda on, ct: (jnp.where(on > 0, jnp.nan, 0.0) * ct, None))

  def loss_fn(model, batch, rng, extras):
    loss, aux = causal_lm_loss(model, batch, rng, extras)
    params = sum(jnp.sum(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return loss + extras["poison"] + nan_grad(params, extras["grad_poison"]), aux

  rep = parallel.replicated(mesh)
  step_fn = train_step.make_train_step(
      loss_fn, graphdef, tx, state_shardings=shardings, batch_shardings=batch_shardings,
      extra_shardings={"poison": rep, "grad_poison": rep}, grad_accum=cfg.optim.grad_accum,
      schedule=schedule)
  hooks = []
  if args.sleep > 0:
    hooks.append(loop.StepHook(1, lambda s, st, ex: time.sleep(args.sleep), "sleep"))
  for key, at, value in (("poison", args.nan_at_step, np.nan),
                         ("grad_poison", args.nan_grad_at_step, 1.0)):
    if at >= 0:
      def poison(s, st, ex, key=key, at=at, value=value):
        if s + 1 == at:  # the update that would be logged as step `at`
          return loop.HookResult(extras={key: jax.device_put(np.float32(value), rep)})
        return None
      hooks.append(loop.StepHook(1, poison, key))

  eval_fn = None
  if args.eval_every:
    eval_step = train_step.make_eval_step(loss_fn, graphdef, state_shardings=shardings,
                                          batch_shardings=batch_shardings,
                                          extra_shardings={"poison": rep, "grad_poison": rep})
    eval_local = {k: v[-args.batch_size:][rows] for k, v in arrays.items()}
    eval_batch = parallel.host_to_global(eval_local, batch_shardings, args.batch_size)
    eval_fn = lambda state, extras: eval_step(state, eval_batch, extras)  # noqa: E731

  init = lambda: train_state.create_train_state(model_fn, tx, mesh, rules, wrt=wrt,  # noqa: E731
                                                seed=cfg.train.seed)[1]
  result = loop.train(
      cfg, args.workdir, init_state=init, state_shardings=shardings, train_step=step_fn,
      data=data, batch_shardings=batch_shardings,
      extras={k: jax.device_put(np.float32(0.0), rep) for k in ("poison", "grad_poison")},
      checkpoint_extras=("poison", "grad_poison"),
      hooks=hooks, eval_fn=eval_fn)

  if args.params_out:
    from jax.experimental import multihost_utils
    full = multihost_utils.process_allgather(result.state.params, tiled=True)
    if jax.process_index() == 0:
      flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
              for path, v in jax.tree_util.tree_flatten_with_path(full)[0]}
      np.savez(args.params_out, **flat)
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "resumed_from": result.resumed_from,
                      "loss": result.metrics.get("loss")}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
