"""The whole Ref-Teacher finetune stage, refjax against a PyTorch reference written the way the peer
harness does it, measured in one run and printed as ratios; then the per-step ratio with identical
padding, and MFU against the matmul peak this script measures.

Both train `reft` (CE on the user rows + KD from the teacher on the alignment rows) for one epoch
over the same N user examples (SST-2 with 10% harmful QA, from ../shared/data) and the same
alignment set, with AdamW at the same learning rate, on SmolLM2-135M-Instruct (student; its own
weights stand in for the teacher: speed does not depend on them), LoRA r=8 on the config's
targets (smollm: every linear layer, as its default finetune) and full.

  refjax   the real pipeline stages `distill` (the teacher's top-k targets, once) and
           `finetune` (packed rows with segment ids, KD read from the cached targets)
  PyTorch  transformers' LlamaForCausalLM, PEFT LoRA, every example padded to max_len, the teacher
           run on the alignment rows in every step, an HF-style Python training loop

  python benchmarks/finetune_stage.py [--n_user 128] [--modes lora,full] [--step_reps 4]

Both sides are timed in a warm process: an untimed refjax stage over 16 examples runs first, as
the pipeline's finetune follows the teacher and filter stages (`--no_warmup`: cold). In a cold
process refjax also pays the first growth of its heap and first-use costs: 194 s against 139 s
for the same LoRA stage run twice in one process (2026-11-30).

refjax's rows hold the chat template's shared system turn once per row (finetune.share_prefix);
the PyTorch rows carry it in every example, as the peer harness's do.
Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from train_step import matmul_peak, step_flops  # benchmarks/ is the script's directory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ beside refjax/

SMOLLM = "smollm2-135m-instruct"


def stage_config(args, lora: bool, n_user: int):
  """The smollm config restricted to `reft`'s finetune, at the benchmark's sizes."""
  from configs import smollm
  c = smollm.get_config()
  c.method = "reft"
  c.data.user_n = n_user
  c.finetune.epochs = 1.0
  c.finetune.max_len = c.finetune.pack_len = args.max_len
  c.finetune.kd_topk = args.kd_topk
  c.finetune.align_ratio = args.align_ratio
  c.finetune.train.update(batch_size=args.batch, log_every=1000, checkpoint_every=0,
                          progress_bar=False)
  c.finetune.optim.update(lr=args.lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.finetune.lora_rank = 8 if lora else 0  # on the config's targets (smollm: every linear layer)
  return c


def refjax_stage(args, lora: bool) -> dict:
  """Wall time of the stages `distill` + `finetune[reft]` in a fresh workdir whose teacher is the
  base model and whose filter keeps every user example."""
  from refjax import config as config_lib
  from refjax.data.paths import set_data_root
  from refjax.data.prompts import PromptFormat
  from refjax.files import write_jsonl
  from refjax.models import shipped
  from refjax.models.loading import load_tokenizer
  from refjax.stages import pipeline
  from refjax.stages.context import Run
  from refjax.stages.workdir import Workdir

  cfg = stage_config(args, lora, args.n_user)
  config_lib.validate(cfg)
  set_data_root(cfg.data.root)
  wd = Workdir(tempfile.mkdtemp(prefix="refjax-bench-"))
  base = shipped.fetch(SMOLLM)
  shutil.copytree(base, wd.teacher_model)
  fmt = PromptFormat.from_config(load_tokenizer(base), cfg.prompt)
  user = Run(cfg, wd).sets.user()
  write_jsonl(wd.filter_report, [
      {"id": e.id, "kept": True, "text_sha256": fmt.scored_digest(e.instruction, e.input,
                                                                   e.response)} for e in user])
  t0 = time.perf_counter()
  out = pipeline.run(cfg, wd.root, stages=["distill", "finetune"])
  seconds = time.perf_counter() - t0
  ft = out["finetune"]["reft"]
  marker = json.loads(wd.marker("distill").read_text())
  shutil.rmtree(wd.root)
  return {"seconds": seconds, "steps": ft["steps"], "distill_s": marker["cost"]["seconds"],
          "rows": ft["packing"]["user"]["rows"], "padding": ft["packing"]}


# ------------------------------------------------------------------------------------------------
# The PyTorch reference


def torch_reference(args, lora: bool) -> dict:
  """One epoch over the same user examples, the peer harness's way; wall time and steps."""
  import torch
  from transformers import AutoModelForCausalLM

  from refjax.data.paths import set_data_root
  from refjax.data.prompts import PromptFormat
  from refjax.models import shipped
  from refjax.models.loading import load_tokenizer
  from refjax.stages.context import Run
  from refjax.stages.workdir import Workdir

  cfg = stage_config(args, lora, args.n_user)
  set_data_root(cfg.data.root)
  base = str(shipped.fetch(SMOLLM))
  fmt = PromptFormat.from_config(load_tokenizer(base), cfg.prompt)
  sets = Run(cfg, Workdir(tempfile.gettempdir())).sets
  user, align = padded(sets.user(), fmt, args.max_len), padded(sets.alignment(), fmt, args.max_len)
  t0 = time.perf_counter()
  student = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
  teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  if lora:
    from peft import LoraConfig, get_peft_model
    student = get_peft_model(student, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=list(cfg.model.lora_targets)))
  opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr,
                          weight_decay=0.0, foreach=True)
  n_align = max(1, round(args.align_ratio * args.batch))
  n_user = args.batch - n_align
  steps = math.ceil(len(user["tokens"]) / n_user)
  rng = np.random.default_rng(0)
  order, align_order = rng.permutation(len(user["tokens"])), rng.permutation(len(align["tokens"]))
  step = torch_step(student, teacher, opt)
  for s in range(steps):
    u = order[s * n_user:(s + 1) * n_user]
    u = np.concatenate([u, order[:n_user - len(u)]])  # the last batch filled up, as a sampler does
    a = align_order[(np.arange(n_align) + s * n_align) % len(align_order)]
    step({k: v[u] for k, v in user.items()}, {k: v[a] for k, v in align.items()})
  return {"seconds": time.perf_counter() - t0, "steps": steps}


def padded(examples, fmt, max_len: int) -> dict[str, np.ndarray]:
  """Every example right-padded to max_len: ids, attention mask, labels (-100 off the response)."""
  from refjax.data.prompts import pad_batch
  enc = [fmt.encode(e.instruction, e.input, e.response, max_len=max_len) for e in examples]
  a = pad_batch(enc, max_len, fmt.pad_id, side="right")
  labels = np.where(a["response_mask"] > 0, a["tokens"], -100)
  return {"tokens": a["tokens"].astype(np.int64), "mask": a["attention_mask"].astype(np.int64),
          "labels": labels.astype(np.int64)}


def torch_step(student, teacher, opt):
  """One optimizer update: CE on the user rows + KL(teacher || student) on the alignment rows'
  response tokens, the teacher run in the step (as the peer harness distils)."""
  import torch
  import torch.nn.functional as F

  def step(user, align):
    ut, um, ul = (torch.from_numpy(user[k]) for k in ("tokens", "mask", "labels"))
    at, am, al = (torch.from_numpy(align[k]) for k in ("tokens", "mask", "labels"))
    ce = student(input_ids=ut, attention_mask=um, labels=ul).loss
    with torch.no_grad():
      t_logits = teacher(input_ids=at, attention_mask=am).logits
    s_logits = student(input_ids=at, attention_mask=am).logits
    sel = (al[:, 1:] != -100)
    kl = F.kl_div(F.log_softmax(s_logits[:, :-1][sel], -1), F.log_softmax(t_logits[:, :-1][sel], -1),
                  log_target=True, reduction="batchmean")
    (ce + kl).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(ce.detach())

  return step


# ------------------------------------------------------------------------------------------------
# The per-step ratio, identical padding


def step_ratio(args, lora: bool) -> dict:
  """Median step time of the same unpacked batch (user + alignment rows, max_len each, exact KD with
  the teacher in the step) in refjax and in PyTorch, interleaved."""
  import jax
  import torch
  from flax import nnx
  from transformers import AutoModelForCausalLM

  from refjax import config as config_lib
  from refjax import parallel
  from refjax.data.paths import set_data_root
  from refjax.data.prompts import PromptFormat
  from refjax.method.student import ALIGN, TEACHER, student_loss_fn
  from refjax.models import shipped
  from refjax.models.loading import load_tokenizer, param_shardings
  from refjax.models.weights import load_hf_dir
  from refjax.parallel.plan import Parallel
  from refjax.stages.context import Run
  from refjax.stages.workdir import Workdir
  from refjax.training import optim
  from refjax.training import state as train_state
  from refjax.training import step as train_step

  cfg = stage_config(args, lora, args.n_user)
  set_data_root(cfg.data.root)
  base = str(shipped.fetch(SMOLLM))
  fmt = PromptFormat.from_config(load_tokenizer(base), cfg.prompt)
  sets = Run(cfg, Workdir(tempfile.gettempdir())).sets
  n_align = max(1, round(args.align_ratio * args.batch))
  user = {k: v[:args.batch - n_align] for k, v in padded(sets.user(), fmt, args.max_len).items()}
  align = {k: v[:n_align] for k, v in padded(sets.alignment(), fmt, args.max_len).items()}

  plan = Parallel(parallel.make_mesh(config_lib.mesh_config(), devices=jax.devices()[:1]),
                  parallel.make_rules())
  student, mcfg = load_hf_dir(base, lora_rank=cfg.finetune.lora_rank,
                              lora_targets=tuple(cfg.model.lora_targets))
  teacher, _ = load_hf_dir(base)
  t_graphdef, t_state = nnx.split(teacher)
  tx, _ = optim.make_optimizer(cfg.finetune.optim, 100)
  graphdef, state, shardings = train_state.train_state_from_model(
      student, tx, plan.mesh, plan.rules, wrt=optim.trainable_filter(mcfg.lora_rank))

  def arrays(g):
    return {"tokens": g["tokens"].astype(np.int32), "attention_mask": g["mask"].astype(np.int32),
            "loss_mask": (g["labels"] >= 0).astype(np.int32),
            "weights": np.ones(len(g["tokens"]), np.float32)}

  batch = {**arrays(user), **{ALIGN + k: v for k, v in arrays(align).items()}}
  bsh = parallel.batch_shardings(batch, plan.mesh, plan.rules)
  batch = parallel.host_to_global(batch, bsh, {k: len(v) for k, v in batch.items()})
  from refjax.method.losses import logit_slots, target_counts
  slots = {p: logit_slots(target_counts({"loss_mask": g["loss_mask"], "weights": g["weights"]}),
                          len(g["tokens"]), args.max_len)
           for p, g in (("", arrays(user)), (ALIGN, arrays(align)))}
  runs = {}
  for name, s in (("everywhere", None), ("targets", slots)):  # logits at every position / targets
    loss_fn = student_loss_fn(kd=1.0, align_ce=0.0, kd_temperature=1.0, kd_direction="forward",
                              teacher_graphdef=t_graphdef, logit_slots=s)
    step = train_step.make_train_step(
        loss_fn, graphdef, tx, state_shardings=shardings, batch_shardings=bsh,
        extra_shardings={TEACHER: param_shardings(plan, teacher.cfg)})
    runs[name] = step.lower(state, batch, {TEACHER: t_state}).compile()
  holder = {"state": state}

  def run_jax(name):
    holder["state"], m = runs[name](holder["state"], batch, {TEACHER: t_state})
    jax.block_until_ready(m)

  ts = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
  tt = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  if lora:
    from peft import LoraConfig, get_peft_model
    ts = get_peft_model(ts, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                       target_modules=list(cfg.model.lora_targets)))
  opt = torch.optim.AdamW([p for p in ts.parameters() if p.requires_grad], lr=args.lr,
                          weight_decay=0.0, foreach=True)
  tstep = torch_step(ts, tt, opt)
  for name in runs:
    run_jax(name)
  tstep(user, align)
  tj = {name: [] for name in runs}
  tt_ = []
  for _ in range(args.step_reps):  # interleaved: the host's speed drifts
    for name in runs:
      t0 = time.perf_counter()
      run_jax(name)
      tj[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tstep(user, align)
    tt_.append(time.perf_counter() - t0)
  hf = json.loads((Path(base) / "config.json").read_text())
  flops = (step_flops(hf, args.batch, args.max_len, cfg.finetune.lora_rank)
           + 2 * n_align * args.max_len * step_flops(hf, 1, 1, 0) / 6)  # + the teacher forward
  return {"jax_s": float(np.median(tj["everywhere"])), "torch_s": float(np.median(tt_)),
          "jax_targets_s": float(np.median(tj["targets"])), "flops": flops, "slots": slots}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n_user", type=int, default=128, help="user examples (one epoch)")
  p.add_argument("--modes", default="lora,full")
  p.add_argument("--batch", type=int, default=None,
                 help="rows per step, user + alignment (default: configs/smollm.py's)")
  p.add_argument("--align_ratio", type=float, default=None,
                 help="share of alignment rows (default: configs/smollm.py's)")
  p.add_argument("--max_len", type=int, default=256)
  p.add_argument("--kd_topk", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--step_reps", type=int, default=4)
  p.add_argument("--no_warmup", action="store_true",
                 help="time refjax in a cold process (no untimed small stage first)")
  args = p.parse_args()
  from configs import smollm
  fc = smollm.get_config().finetune
  args.batch = int(fc.train.batch_size) if args.batch is None else args.batch
  args.align_ratio = float(fc.align_ratio) if args.align_ratio is None else args.align_ratio
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from refjax.runtime import reexec_with_malloc_tuning
  reexec_with_malloc_tuning()
  peak = matmul_peak()
  print(f"matmul peak (2048^2 fp32, GFLOP/s): {json.dumps({k: round(v) for k, v in peak.items()})}",
        flush=True)
  if not args.no_warmup:  # the pipeline's finetune follows other stages in a warm process
    t0 = time.perf_counter()
    refjax_stage(argparse.Namespace(**{**vars(args), "n_user": 16}), True)
    print(f"warm-up (untimed): refjax stage over 16 user examples, {time.perf_counter() - t0:.0f}"
          " s", flush=True)
  for mode in args.modes.split(","):
    lora = mode == "lora"
    r = refjax_stage(args, lora)
    t = torch_reference(args, lora)
    print(f"{mode}: whole stage, one epoch over {args.n_user} user examples: refjax {r['seconds']:.0f}"
          f" s ({r['steps']} steps of packed rows, teacher targets {r['distill_s']:.0f} s) vs "
          f"PyTorch {t['seconds']:.0f} s ({t['steps']} steps, padded to {args.max_len}): "
          f"{t['seconds'] / r['seconds']:.2f}x", flush=True)
    print(f"  padding: {json.dumps(r['padding'])}", flush=True)
    s = step_ratio(args, lora)
    best = max(peak.values()) * 1e9
    print(f"{mode}: per step, identical padding ({args.batch} x {args.max_len}, exact KD): refjax "
          f"{s['jax_s']:.2f} s vs PyTorch {s['torch_s']:.2f} s: {s['torch_s'] / s['jax_s']:.2f}x; "
          f"MFU refjax {s['flops'] / s['jax_s'] / best:.1%}, PyTorch "
          f"{s['flops'] / s['torch_s'] / best:.1%}", flush=True)
    print(f"{mode}: per step, the same batch, refjax with logits only at the loss's positions "
          f"(slots {s['slots']['']} user, {s['slots']['align_']} alignment): "
          f"{s['jax_targets_s']:.2f} s vs PyTorch {s['torch_s']:.2f} s: "
          f"{s['torch_s'] / s['jax_targets_s']:.2f}x", flush=True)


if __name__ == "__main__":
  main()
