"""Ahead-of-time compile of the paper's scale: a Llama-2-7B teacher forward + a 7B student train
step (full finetune, fp32 master weights, bf16 compute, AdamW, remat), for a real TPU topology,
from this CPU-only machine; prints per-device memory. Nothing is allocated: every input is a
ShapeDtypeStruct (jax.eval_shape), so a 7B model compiles on a laptop.

TPU targets need libtpu (the PyPI wheel that `jax[tpu]` pins; jax 0.10.2 -> libtpu 0.0.42.1).
Install it into a separate folder so no other JAX process on the machine picks it up:
  pip install --no-deps --target /tmp/libtpu_pkg libtpu==0.0.42.1
  python benchmarks/aot_7b.py --libtpu /tmp/libtpu_pkg --target v5e:4x4 --mesh 1,16,1
The fallback without libtpu compiles the same step for 8 fake CPU devices:
  python benchmarks/aot_7b.py --target cpu:8 --mesh 1,8,1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--target", default="v5e:4x4",
                 help="a TPU topology name (v5e:4x4, v4:2x2x4, ...) or cpu:N (N fake devices)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1 = the rest)")
  p.add_argument("--libtpu", default="", help="folder holding the libtpu package (pip --target)")
  p.add_argument("--batch", type=int, default=16, help="global batch (examples per step)")
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--kd_weight", type=float, default=1.0)
  p.add_argument("--no_remat", action="store_true")
  p.add_argument("--lora_rank", type=int, default=0, help=">0: LoRA student instead of full")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  cpu = args.target.startswith("cpu")
  if cpu:
    n = int(args.target.split(":")[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={n}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU backend
  if args.libtpu:
    sys.path.insert(0, args.libtpu)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.experimental import mesh_utils, topologies
  from jax.sharding import AxisType, Mesh

  from refjax import config as config_lib
  from refjax import parallel
  from refjax.method.losses import token_cross_entropy
  from refjax.models import Decoder, ModelConfig
  from refjax.training import optim
  from refjax.training import state as train_state
  from refjax.training import step as train_step

  if cpu:
    devices = jax.devices()
    where = f"{len(devices)} fake CPU devices"
  else:
    try:
      devices = topologies.get_topology_desc(args.target, "tpu").devices
    except Exception as e:  # noqa: BLE001 - report why a TPU compile is impossible here
      print(f"cannot describe TPU topology {args.target!r}: {type(e).__name__}: {e}\n"
            "(install libtpu into a folder and pass --libtpu, or use --target cpu:8)")
      return 1
    where = f"TPU {args.target}: {len(devices)} x {devices[0].device_kind}"
  mesh_cfg = config_lib.mesh_config()
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = (int(x) for x in args.mesh.split(","))
  shape = parallel.resolve_mesh_shape(mesh_cfg, len(devices))
  mesh = Mesh(mesh_utils.create_device_mesh(shape, devices), parallel.MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)
  rules = parallel.make_rules(mesh_cfg.rules)

  remat = not args.no_remat
  student_cfg = ModelConfig.from_hf(LLAMA2_7B, param_dtype="float32", dtype="bfloat16",
                                    remat=remat, lora_rank=args.lora_rank)
  teacher_cfg = ModelConfig.from_hf(LLAMA2_7B, param_dtype="bfloat16", dtype="bfloat16",
                                    remat=remat)

  ocfg = config_lib.optim_config()
  ocfg.lr, ocfg.weight_decay, ocfg.warmup_steps, ocfg.schedule = 2e-5, 0.01, 10, "cosine"
  tx, schedule = optim.make_optimizer(ocfg, 1000)
  wrt = optim.trainable_filter(args.lora_rank)
  graphdef, abstract = train_state.abstract_train_state(
      lambda rngs: Decoder(student_cfg, rngs=rngs), tx, wrt)
  state_sh = train_state.state_shardings(abstract, mesh, rules)
  t_graphdef, t_abstract = nnx.split(nnx.eval_shape(
      lambda: Decoder(teacher_cfg, rngs=nnx.Rngs(0))))
  t_sh = parallel.param_shardings(t_abstract, mesh, rules)

  b, t = args.batch, args.seq
  batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}
  batch_sh = parallel.batch_shardings(batch, mesh, rules)
  kd_weight = args.kd_weight

  def distill_loss(model, batch, rng, extras):
    """CE on the targets + kd_weight * KL(teacher || student) over the vocabulary on the same
    targets: the shape of the Ref-Teacher student step (refjax.method.student owns the real one)."""
    teacher = nnx.merge(t_graphdef, extras["teacher"])
    t_logits = teacher(batch["tokens"], batch["attention_mask"]).logits
    s_logits = model(batch["tokens"], batch["attention_mask"]).logits
    ce, weight = token_cross_entropy(s_logits, batch["tokens"], batch["loss_mask"],
                                                batch["weights"])
    kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(s_logits, -1),
                                                     jax.nn.log_softmax(t_logits, -1))  # [B,T]
    w = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros((b, 1), jnp.int32)], 1)
    w = w.astype(jnp.float32) * batch["weights"][:, None]
    denom = jnp.maximum(weight, 1e-9)
    return (ce + kd_weight * jnp.sum(kl * w)) / denom, {"loss_weight": weight}

  step = train_step.make_train_step(distill_loss, graphdef, tx, state_shardings=state_sh,
                                    batch_shardings=batch_sh, extra_shardings={"teacher": t_sh},
                                    schedule=schedule)
  n_student = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  n_teacher = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t_abstract))
  print(f"target: {where}; mesh data,fsdp,tensor = {shape}; batch {b} x {t}; remat {remat}; "
        f"student {n_student / 1e9:.2f}B trained params (fp32 + AdamW), teacher "
        f"{n_teacher / 1e9:.2f}B (bf16, frozen)", flush=True)
  t0 = time.perf_counter()
  lowered = step.lower(abstract, batch, {"teacher": t_abstract})
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f"lowered in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s", flush=True)
  mem = compiled.memory_analysis()
  gib = 2 ** 30
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  if mem is None:
    print("memory_analysis() is not available for this backend")
  else:
    for f in fields:
      print(f"  {f:32s} {getattr(mem, f, 0) / gib:8.2f} GiB per device")
    peak = getattr(mem, "peak_memory_in_bytes", None)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    print(f"  {'arguments+outputs-aliased+temp':32s} {total / gib:8.2f} GiB per device"
          + (f"; peak_memory_in_bytes {peak / gib:.2f} GiB" if peak else ""))
    if not cpu:
      print(f"  device HBM: {_hbm_gib(devices[0].device_kind)} GiB per chip")
  return 0


def _hbm_gib(kind: str) -> str:
  kind = kind.lower()
  for name, gib in (("v5 lite", 16), ("v5e", 16), ("v5p", 95), ("v4", 32), ("v6", 32),
                    ("v3", 16), ("v2", 8)):
    if name in kind:
      return str(gib)
  return "?"


if __name__ == "__main__":
  sys.exit(main())
