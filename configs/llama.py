"""The paper's scale: Llama-2 base student and a Ref-Teacher prepared from it, on a pod or cluster.

  python -m refjax.main --config=configs/llama.py --workdir=/mnt/shared/refjax/llama-sst2
  python -m refjax.main --config=configs/llama.py:task=gsm8k,size=13b,pod=v4-32 --workdir=...
  launch/tpu_pod.sh --name refjax --zone us-central2-b --accelerator-type v4-32 \
      --config configs/llama.py:task=ag_news --workdir /mnt/shared/refjax/llama-agnews

`arg` (comma-separated key=value; see refjax.config_arg):
  task=sst2|ag_news|gsm8k   the user's finetuning task (paper: all three; default sst2)
  size=7b|13b               Llama-2 size (paper: 7B; 13B for a larger student)
  pod=v4-32|v5e-16|gpu-2x8  the machine, which fixes the mesh sizes below (default v4-32)
  lora=R                    LoRA rank for teacher and student (default 0 = full finetuning)

The paper (arXiv 2506.07356) states the model, the data sets and the loss terms but not the step
counts, batch sizes, learning rates or weights. Where it is silent, the values below follow the
peer harness the paper compares against (Vaccine / Lisa / Booster: n=1000 user examples with
harmful ratio p=0.1, finetuning lr in 1e-5..1e-4, batch 10, 20 epochs, the Alpaca template for base
models, 1000 BeaverTails test prompts for the harmful score) or are our choice, marked as such.
"""

from refjax.config import base_config
from refjax.config_arg import parse_arg

DEFAULTS = dict(task="sst2", size="7b", pod="v4-32", lora=0)
CHOICES = dict(task=("sst2", "ag_news", "gsm8k"), size=("7b", "13b"),
               pod=("v4-32", "v5e-16", "gpu-2x8"))
HUB_IDS = {"7b": "meta-llama/Llama-2-7b-hf", "13b": "meta-llama/Llama-2-13b-hf"}
PARAMS_B = {"7b": 6.74, "13b": 13.0}  # parameters, billions

# Mesh per machine: (data, fsdp, tensor) with their product = the number of JAX devices.
#   v4-32:   16 chips (32 TensorCores; one JAX device per megacore chip), 4 hosts, 32 GiB HBM each.
#            fsdp=16: parameters, gradients and Adam state split 16 ways (7B full finetuning:
#            ~7 GiB per chip of fp32 state; 13B: ~13 GiB), every chip also splits the batch.
#   v5e-16:  16 chips (gcloud type v5litepod-16), 4 hosts, 16 GiB HBM each: fsdp=16 again
#            (data x fsdp = 2 x 8 would hold ~13 GiB of fp32 state per chip for 7B: with the
#            teacher and the activations, more than 16 GiB). 13B full finetuning does not fit
#            either (~13 GiB of state + the teacher per chip at fsdp=16): use lora=R.
#   gpu-2x8: 2 nodes x 8 GPUs (launch/gpu_slurm.sbatch): fsdp=8 inside a node (NVLink), data=2
#            across nodes (one gradient all-reduce per step over the slower network).
MESHES = {"v4-32": dict(data=1, fsdp=16, tensor=1, hbm_gib=32),
          "v5e-16": dict(data=1, fsdp=16, tensor=1, hbm_gib=16),
          "gpu-2x8": dict(data=2, fsdp=8, tensor=1, hbm_gib=80)}


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS, CHOICES, where="configs/llama.py")
  if a["lora"] < 0:
    raise ValueError(f"configs/llama.py: lora={a['lora']}; expected a rank >= 0")
  mesh = MESHES[a["pod"]]
  _check_memory(a, mesh)
  c = base_config()
  c.method = "reft"  # one method per run; --config.method=sft|sa_ft|joint|... for the baselines

  # --- Model: student = base model; the teacher starts from it too (teacher.init="base").
  c.model.name = HUB_IDS[a["size"]]  # paper: Llama-2-7B (base, not chat); needs the hub licence
  c.model.param_dtype = "float32"  # fp32 master weights (optimizer updates stay exact)
  c.model.dtype = "bfloat16"  # bf16 compute on TPU/GPU matrix units
  c.model.remat = True  # recompute each layer's activations in the backward pass (memory)
  c.model.lora_rank = a["lora"]  # 0 = full finetuning, as in the paper's main setting
  if a["lora"]:
    c.model.lora_alpha = 2.0 * a["lora"]  # alpha = 2r (common practice; our choice)

  # --- Prompt format: Llama-2 base has no chat template; the peers use the Alpaca template.
  c.prompt.template = "alpaca"
  c.prompt.system_prompt = ""  # the Alpaca preamble ("Below is an instruction ...")
  c.prompt.stop_tokens = ()  # the tokenizer's EOS (</s>) ends every answer
  c.prompt.max_len = 512  # prompt + answer tokens per training example (GSM8K answers fit)
  c.prompt.max_prompt_len = 256  # BeaverTails / task prompts are far shorter

  # --- Data (paper: BeaverTails alignment data; SST-2, AG News, GSM8K user tasks).
  c.data.alignment_harmful = "beavertails_alignment"  # harmful prompt -> refusal
  c.data.alignment_harmless = "alpaca_helpful"  # harmless prompt -> helpful answer
  # Count unstated in the paper; 900 each fits the local copies (990 Alpaca rows; 2480 BeaverTails
  # refusal rows, ~23% dropped by the refusal check) and leaves BeaverTails rows unused for the
  # refusal validation (n_val) and the filter calibration (n_calibration). Our choice.
  c.data.n_alignment_harmful = 900
  c.data.n_alignment_harmless = 900
  c.data.refusal_check = True
  c.data.task = a["task"]
  c.data.user_n = 1000  # peer harness n=1000
  c.data.harmful_ratio = 0.1  # peer harness p=0.1
  c.data.harmful_source = "beavertails_harmful_qa"

  # --- Refusal feature (difference of means at the last prompt token).
  c.refusal.layer = -1  # chosen by validation AUROC within layer_range (our rule)
  c.refusal.layer_range = (0.25, 0.85)  # middle layers, where refusal directions live (Arditi)
  c.refusal.n_probe = 256  # prompts per class for R_l (our choice; 2x the base default)
  c.refusal.n_val = 256  # prompts per class for the layer choice and the AUROC log
  c.refusal.batch_size = 64  # scoring batch; a multiple of the 16 batch shards

  # --- Teacher preparation (paper Sec. 3.1). Steps, batch and lr are unstated in the paper.
  c.teacher.init = "base"  # the paper's main setting
  c.teacher.reg_weight = 1.0  # weight of the cosine regulariser (unstated; our default)
  c.teacher.reg_form = "one_minus_cos"
  c.teacher.refusal_update_every = 50  # dynamic update of R_l every 50 steps (our choice)
  # 1800 alignment examples, 5 epochs at batch 32: 280 steps (our choice).
  c.teacher.train.update(steps=280, batch_size=32, log_every=10, checkpoint_every=100,
                         max_to_keep=2, progress_bar=False)
  c.teacher.optim.update(lr=1e-5 if a["lora"] == 0 else 1e-4, schedule="cosine", warmup_steps=20,
                         weight_decay=0.0, clip_norm=1.0)

  # --- Filter: teacher cosine score >= threshold drops the example.
  c.filter.threshold = float("nan")  # calibrate on held-out labelled prompts
  c.filter.target_recall = 0.95  # the paper tunes the filter for recall
  c.filter.n_calibration = 500  # labelled prompts per class (our choice)
  c.filter.batch_size = 64

  # --- Student finetuning (paper Sec. 3.2). Peer harness: lr 1e-5 (full) .. 1e-4 (LoRA), batch
  # 10, 20 epochs over the 1000 user examples. The global batch must split over 16 devices, so
  # 32 rows: 16 user + 16 alignment (align_ratio=0.5); 20 epochs of user data = 1250 steps.
  c.finetune.kd_weight = 1.0  # weight of KL(teacher || student) (unstated; our default)
  c.finetune.kd_temperature = 1.0
  c.finetune.kd_direction = "forward"
  c.finetune.align_ce_weight = 0.0
  c.finetune.align_ratio = 0.5
  c.finetune.train.update(steps=1250, batch_size=32, log_every=10, checkpoint_every=250,
                          max_to_keep=2, progress_bar=False)
  c.finetune.optim.update(lr=1e-5 if a["lora"] == 0 else 1e-4, schedule="cosine", warmup_steps=50,
                          weight_decay=0.0, clip_norm=1.0)

  # --- Evaluation: the peer protocol.
  c.eval.hs_source = "beavertails_eval"  # first 1000 harmful BeaverTails 30k_test prompts
  c.eval.hs_n = 1000
  c.eval.judge = "moderation"  # the peers' BeaverTails moderation classifier
  c.eval.judge_model = "PKU-Alignment/beaver-dam-7b"
  c.eval.fa_n = 1000  # first 1000 test examples (SST-2 has 872)
  c.eval.max_new_tokens = 128  # answers to harmful prompts, enough for the judge (our choice)
  c.eval.fa_max_new_tokens = 256 if a["task"] == "gsm8k" else 16  # GSM8K reasons step by step
  c.eval.batch_size = 64
  c.eval.include_base = True

  # --- Parallelism: the mesh for the chosen machine; jax.distributed on every host.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
  # The launch scripts set the coordinator (tpu_pod.sh: auto-detect on the TPU VM; slurm: the
  # JAX_* variables), so the config stays portable between machines.
  c.distributed.initialization_timeout = 600
  return c


def _check_memory(a, mesh) -> None:
  """Fails early when full finetuning's fp32 state (params, grads, 2 Adam moments = 16 bytes per
  parameter) plus a frozen fp32 teacher (4 bytes) cannot fit in the chips' HBM with headroom."""
  if a["lora"]:
    return
  per_param = 16 + 4
  devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  shards = mesh["fsdp"] * mesh["tensor"]  # `data` replicates parameters
  gib = PARAMS_B[a["size"]] * 1e9 * per_param / shards / 2**30
  if gib > 0.75 * mesh["hbm_gib"]:
    raise ValueError(
        f"configs/llama.py: size={a['size']} full finetuning on pod={a['pod']} needs ~{gib:.0f} "
        f"GiB of weights and optimizer state per device ({devices} devices, "
        f"{mesh['hbm_gib']} GiB each); use lora=16 or a larger pod")
