"""Train-step throughput: our jitted step vs the same step in PyTorch, and MFU vs measured peak.

SmolLM2-135M (the cached model's config.json when present, else its published shape; random
weights: speed does not depend on them), full finetuning and LoRA (rank 8 on q/k/v/o), fixed
batch and length, fp32, AdamW, one process. PyTorch runs transformers' LlamaForCausalLM built from
the same config with torch.optim.AdamW (foreach), LoRA hand-written (frozen base, trainable
A/B, same init and scale as ours). Peak = the best of several 2048x2048 fp32 matmuls (jax, numpy,
torch) measured by this script before the steps and again after each mode (a shared CPU's speed
drifts). A table of jax vs torch speed on each matmul shape of the step shows the kernel-level
ceiling of the ratio. Prints figures and ratios; asserts nothing.

  python benchmarks/train_step.py [--batch 8] [--seq 128] [--steps 5] [--modes full,lora]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
               model_type="llama")
CACHED = Path.home() / ".cache" / "refjax" / "models" / "smollm2-135m-instruct" / "config.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def hf_config() -> tuple[dict, str]:
  if CACHED.exists():
    return json.loads(CACHED.read_text()), str(CACHED)
  return dict(SMOLLM2), "published SmolLM2-135M shape (cached model absent)"


def batch_arrays(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  return {"tokens": tokens, "attention_mask": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.int32), "weights": np.ones((batch,), np.float32)}


# ------------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(cfg: dict, lora_rank: int = 0) -> tuple[int, int]:
  """(params in matmuls per token incl. the LM head, LoRA params): the 6N of MFU counting."""
  d, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
  h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
  lora = L * lora_rank * ((d + h * hd) * 2 + (d + kv * hd) * 2) if lora_rank else 0
  return L * per_layer + d * cfg["vocab_size"], lora


def step_flops(cfg: dict, batch: int, seq: int, lora_rank: int) -> float:
  """Model FLOPs of one training step (PaLM appendix B counting, attention included).

  Full: 6N per token + 12*L*H*hd*T attention. LoRA: the base weights get no weight gradient,
  so 4N per token (forward + input gradients) + 6 N_lora + 12*L*H*hd*T (attention keeps both
  backward products).
  """
  n, n_lora = matmul_params(cfg, lora_rank)
  attn = 12 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * cfg["head_dim"] * seq
  per_token = (6 * n if not lora_rank else 4 * n + 6 * n_lora) + attn
  return per_token * batch * seq


def _jax_matmul_seconds(a: np.ndarray, b: np.ndarray, reps: int) -> float:
  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda x, y: x @ y)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  f(ja, jb).block_until_ready()
  return min(_timed(lambda: f(ja, jb).block_until_ready()) for _ in range(reps))


def _torch_matmul_seconds(a: np.ndarray, b: np.ndarray, reps: int) -> float:
  import torch
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  ta @ tb
  return min(_timed(lambda: ta @ tb) for _ in range(reps))


def matmul_peak(n: int = 2048, reps: int = 10, torch_too: bool = True) -> dict[str, float]:
  """Best-of-`reps` GFLOP/s of an n x n fp32 matmul in jax, numpy (and torch)."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  flop = 2 * n ** 3 / 1e9
  out = {"jax": flop / _jax_matmul_seconds(a, a, reps)}
  a @ a
  out["numpy"] = flop / min(_timed(lambda: a @ a) for _ in range(reps))
  if torch_too:
    out["torch"] = flop / _torch_matmul_seconds(a, a, reps)
  return out


def step_gemms(cfg: dict, batch: int, seq: int) -> dict[str, tuple[tuple[int, int, int], int, bool]]:
  """The step's projection and LM-head matmuls: name -> ((M, K, N), count per step, is wgrad).

  Every projection contributes a forward, an input-gradient (dgrad) and a weight-gradient
  (wgrad) matmul; LoRA's frozen base has no wgrad. Attention's own contractions are left out.
  """
  m, d, f, v = batch * seq, cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q = cfg["num_attention_heads"] * cfg["head_dim"]
  kv = cfg["num_key_value_heads"] * cfg["head_dim"]
  layers = cfg["num_hidden_layers"]
  out = {}
  for name, (k, n, count) in {"q proj": (d, q, layers), "k/v proj": (d, kv, 2 * layers),
                              "o proj": (q, d, layers), "mlp up/gate": (d, f, 2 * layers),
                              "mlp down": (f, d, layers), "lm head": (d, v, 1)}.items():
    out[f"{name} fwd"] = ((m, k, n), count, False)
    out[f"{name} dgrad"] = ((m, n, k), count, False)
    out[f"{name} wgrad"] = ((k, m, n), count, True)
  return out


def gemm_table(cfg: dict, batch: int, seq: int, reps: int = 5) -> dict[str, tuple[float, float]]:
  """Times each of the step's matmul shapes in jax and torch, prints them; name -> (jax s, torch s).

  The kernel-level ceiling on our step's speed against PyTorch: matmuls are most of the step.
  """
  rng = np.random.default_rng(0)
  seconds: dict[tuple[int, int, int], tuple[float, float]] = {}
  out = {}
  for name, (shape, _, _) in step_gemms(cfg, batch, seq).items():
    if shape not in seconds:  # e.g. q and o proj share a shape when heads * head_dim = hidden
      m, k, n = shape
      a = rng.standard_normal((m, k), dtype=np.float32)
      b = rng.standard_normal((k, n), dtype=np.float32)
      seconds[shape] = (_jax_matmul_seconds(a, b, reps), _torch_matmul_seconds(a, b, reps))
    tj, tt = out[name] = seconds[shape]
    flop = 2 * np.prod(shape) / 1e9
    print(f"  gemm {name:18s} {'x'.join(map(str, shape))}: jax {flop / tj:6.1f} GFLOP/s, torch "
          f"{flop / tt:6.1f} GFLOP/s, torch/jax {tj / tt:.2f}x", flush=True)
  ratios = [tj / tt for tj, tt in seconds.values()]
  print(f"  gemm torch/jax speed ratio over {len(seconds)} distinct shapes: median "
        f"{np.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x; torch faster on "
        f"{sum(r > 1 for r in ratios)}", flush=True)
  return out


def matmul_seconds(cfg: dict, batch: int, seq: int, table: dict[str, tuple[float, float]],
                   lora: bool) -> tuple[float, float]:
  """(jax, torch) seconds per step of the step's matmuls, each timed alone (`gemm_table`)."""
  tj = tt = 0.0
  for name, (_, count, wgrad) in step_gemms(cfg, batch, seq).items():
    if not (lora and wgrad):
      tj, tt = tj + count * table[name][0], tt + count * table[name][1]
  return tj, tt


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# JAX (ours)


def jax_step(cfg_hf: dict, arrays: dict, lora_rank: int):
  """(run_one_step() -> loss, compile seconds) for our jitted train step on one device."""
  import jax

  from refjax import config as config_lib
  from refjax import parallel
  from refjax.method.losses import causal_lm_loss
  from refjax.models import Decoder, ModelConfig
  from refjax.training import optim
  from refjax.training import state as train_state
  from refjax.training import step as train_step

  cfg = ModelConfig.from_hf(cfg_hf, lora_rank=lora_rank, lora_alpha=16.0,
                            lora_targets=LORA_TARGETS)
  mesh = parallel.make_mesh(config_lib.mesh_config(), devices=jax.devices()[:1])
  rules = parallel.make_rules()
  ocfg = config_lib.optim_config()
  ocfg.lr, ocfg.weight_decay, ocfg.schedule, ocfg.clip_norm = 1e-5, 0.0, "constant", 0.0
  tx, _ = optim.make_optimizer(ocfg, 100)
  graphdef, state, shardings = train_state.create_train_state(
      lambda rngs: Decoder(cfg, rngs=rngs), tx, mesh, rules, wrt=optim.trainable_filter(lora_rank))
  bsh = parallel.batch_shardings(arrays, mesh, rules)
  batch = parallel.host_to_global(arrays, bsh, arrays["tokens"].shape[0])
  step = train_step.make_train_step(causal_lm_loss, graphdef, tx,
                                    state_shardings=shardings, batch_shardings=bsh)
  t = time.perf_counter()
  compiled = step.lower(state, batch, {}).compile()
  compile_s = time.perf_counter() - t
  holder = {"state": state}

  def run() -> float:
    holder["state"], metrics = compiled(holder["state"], batch, {})
    return float(metrics["loss"])  # blocks until the step is done

  return run, compile_s


# ------------------------------------------------------------------------------------------------
# PyTorch (reference)


def torch_step(cfg_hf: dict, arrays: dict, lora_rank: int):
  """(run_one_step() -> loss, 0) for the same step in PyTorch."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
          "max_position_embeddings", "tie_word_embeddings")
  config = LlamaConfig(**{k: cfg_hf[k] for k in keys if k in cfg_hf})
  config._attn_implementation = "sdpa"
  model = LlamaForCausalLM(config).float().train()
  if lora_rank:
    for p in model.parameters():
      p.requires_grad_(False)
    scale = 16.0 / lora_rank
    for layer in model.model.layers:
      for name in LORA_TARGETS:
        base = getattr(layer.self_attn, name)
        setattr(layer.self_attn, name, _TorchLoRA(base, lora_rank, scale))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, foreach=True)
  tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
  mask = torch.from_numpy(arrays["attention_mask"].astype(np.int64))

  def run() -> float:
    out = model(input_ids=tokens, attention_mask=mask, labels=tokens)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  return run, 0.0


def _torch_lora_cls():
  import torch

  class TorchLoRA(torch.nn.Module):
    """y = base(x) + scale * (x @ A) @ B, base frozen; A he-uniform, B zero (as refjax)."""

    def __init__(self, base, rank, scale):
      super().__init__()
      self.base, self.scale = base, scale
      bound = (6.0 / base.in_features) ** 0.5  # jax he_uniform over fan_in = in_features
      self.a = torch.nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
      self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x):
      return self.base(x) + ((x @ self.a) @ self.b) * self.scale

  return TorchLoRA


def _TorchLoRA(base, rank, scale):  # noqa: N802 - a class factory, torch imported lazily
  return _torch_lora_cls()(base, rank, scale)


# ------------------------------------------------------------------------------------------------


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--modes", default="full,lora")
  p.add_argument("--frameworks", default="jax,torch")
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--gemms", type=int, default=1,
                 help="1: also print jax vs torch speed on each matmul shape of the step")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
  args = p.parse_args()
  # As `python -m refjax.main` does; both frameworks then run under
  # the same malloc settings.
  from refjax.runtime import reexec_with_malloc_tuning
  reexec_with_malloc_tuning()

  cfg, source = hf_config()
  arrays = batch_arrays(args.batch, args.seq, cfg["vocab_size"])
  tokens = args.batch * args.seq
  print(f"model: {source}; batch {args.batch} x {args.seq} = {tokens} tokens/step, fp32, AdamW; "
        f"cpus: {os.cpu_count()}; load avg: {os.getloadavg()[0]:.1f}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
  if "torch" in args.frameworks and args.threads:
    import torch
    torch.set_num_threads(args.threads)
  frameworks = args.frameworks.split(",")
  peak = matmul_peak(torch_too="torch" in frameworks)
  peak_gflops = max(peak.values())
  print("matmul peak 2048^2 fp32: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items())
        + f" GFLOP/s -> peak {peak_gflops:.1f}", flush=True)
  table = gemm_table(cfg, args.batch, args.seq) if args.gemms and "torch" in frameworks else None
  for mode in args.modes.split(","):
    rank = args.lora_rank if mode == "lora" else 0
    flops = step_flops(cfg, args.batch, args.seq, rank)
    runs = {fw: (jax_step if fw == "jax" else torch_step)(cfg, arrays, rank) for fw in frameworks}
    # Interleave the frameworks step by step so both see the same machine load (other processes
    # on a shared machine change the speed of both alike); the first `warmup` steps are dropped.
    times = {fw: [] for fw in frameworks}
    faults = {fw: [] for fw in frameworks}  # minor page faults: fresh memory touched per step
    losses = {fw: [] for fw in frameworks}
    for i in range(args.warmup + args.steps):
      for fw in frameworks:
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        losses[fw].append(runs[fw][0]())
        if i >= args.warmup:
          times[fw].append(time.perf_counter() - t)
          faults[fw].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    again = matmul_peak(torch_too="torch" in frameworks)
    peak_gflops = max(peak_gflops, *again.values())
    print(f"{mode:5s} matmul peak re-measured: " + ", ".join(f"{k} {v:.1f}" for k, v in again.items())
          + f" GFLOP/s -> peak {peak_gflops:.1f}", flush=True)
    for fw in frameworks:
      med, best = float(np.median(times[fw])), float(np.min(times[fw]))
      print(f"{mode:5s} {fw:6s} step median {med:.3f} s (min {best:.3f})  "
            f"{tokens / med:7.1f} tokens/s  MFU {100 * flops / med / (peak_gflops * 1e9):5.1f}% "
            f"(best step {100 * flops / best / (peak_gflops * 1e9):.1f}%)  "
            f"[{flops / 1e9:.0f} GFLOP/step; loss {losses[fw][0]:.3f} -> {losses[fw][-1]:.3f}"
            + (f"; compile {runs[fw][1]:.1f} s" if fw == "jax" else "")
            + f"; {np.median(faults[fw]):.0f} page faults/step]", flush=True)
    if table is not None and len(frameworks) == 2:
      mj, mt = matmul_seconds(cfg, args.batch, args.seq, table, lora=bool(rank))
      print(f"{mode:5s} its projection + head matmuls, timed alone: jax {mj:.2f} s = "
            f"{100 * mj / np.median(times['jax']):.0f}% of our median step, torch {mt:.2f} s = "
            f"{100 * mt / np.median(times['torch']):.0f}% of PyTorch's; with torch's matmuls our "
            f"step would take {np.median(times['jax']) - mj + mt:.2f} s", flush=True)
    if len(frameworks) == 2:
      ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
      print(f"{mode:5s} ours / PyTorch throughput: {np.median(ratios):.2f}x (median of "
            f"interleaved pairs; min-time ratio {min(times['torch']) / min(times['jax']):.2f}x; "
            f"target >= 1.3x), ours MFU {100 * flops / np.median(times['jax']) / (peak_gflops * 1e9):.1f}% "
            f"(target >= 40%)", flush=True)


if __name__ == "__main__":
  main()
