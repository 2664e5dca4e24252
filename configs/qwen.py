"""The Qwen2 family at small scale: the shipped Qwen2.5-Coder-0.5B-Instruct (../shared/ENV.md).

  python -m refjax.main --config=configs/qwen.py --workdir=workdirs/qwen
  python -m refjax.main --config=configs/qwen.py:quick --workdir=workdirs/qwen-quick
  python -m refjax.main --config=configs/qwen.py:student=base,task=ag_news --workdir=...

`arg` (comma-separated key=value; see refjax.config_arg):
  quick                     a smoke run of every stage (minutes on a 2-core CPU)
  task=sst2|ag_news|gsm8k   the user's finetuning task (default sst2)
  student=instruct|base     instruct (default): the shipped model is student and teacher start,
                            offline. base: the student is the hub's Qwen2.5-Coder-0.5B base model
                            (needs network) and the teacher starts from the shipped instruct model.

This model is safety-aligned (it refuses plain harmful requests; its difference-of-means direction
separates harmful from harmless prompts at AUROC ~0.99, ENV.md), so it exercises the paper's
variant in which the Ref-Teacher is prepared from an instruct model (`teacher.init`). With
`student=base` the setting is exactly that variant: aligned teacher, unaligned base student, same
architecture and vocabulary (distillation needs both).
"""

from refjax.config import base_config
from refjax.config_arg import parse_arg

INSTRUCT = "qwen2.5-coder-0.5b-instruct"  # refjax.models.shipped name (shipped on PyPI)
BASE_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B"  # the matching base model (hub only)
DEFAULTS = dict(quick=False, task="sst2", student="instruct")
CHOICES = dict(task=("sst2", "ag_news", "gsm8k"), student=("instruct", "base"))


def get_config(arg=None):
  a = parse_arg(arg, DEFAULTS, CHOICES, where="configs/qwen.py")
  c = base_config()
  c.method = "reft,sft"  # Ref-Teacher and the undefended baseline (each method is a finetune)

  # --- Model: 24 layers, d=896, vocab 151,936, untied embeddings (~0.5B parameters).
  c.model.name = BASE_HUB_ID if a["student"] == "base" else INSTRUCT
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"  # CPU: bf16 matmuls are no faster here
  # LoRA r=8 on the attention projections: full finetuning of 0.5B parameters with fp32 Adam
  # state is ~8 GiB and ~4x slower than SmolLM2-135M per token on 2 cores (ENV.md). Our choice.
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  c.model.remat = False

  # --- Prompt format: Qwen's ChatML template (its default system prompt) ends turns with
  # <|im_end|>.
  c.prompt.template = "chat"
  c.prompt.stop_tokens = ("<|im_end|>",)
  c.prompt.max_len = 128
  c.prompt.max_prompt_len = 128

  # --- Data: the local copies (../shared/ASSETS.md), sized like configs/smollm.py's full run.
  c.data.task = a["task"]
  c.data.user_n = 400
  c.data.harmful_ratio = 0.1  # peer harness p=0.1
  c.data.n_alignment_harmful = 200
  c.data.n_alignment_harmless = 200

  # --- Refusal feature: the instruct model already has a clean one (AUROC ~0.99 at layers 16-24).
  c.refusal.n_probe = 64
  c.refusal.n_val = 64

  # --- Teacher: prepared from the instruct model (the paper's variant), whatever the student.
  c.teacher.init = INSTRUCT
  c.teacher.refusal_update_every = 10
  c.teacher.train.update(steps=40, batch_size=8, log_every=5, checkpoint_every=20, max_to_keep=1)
  c.teacher.optim.update(lr=1e-4, warmup_steps=4)  # LoRA: the peers' upper lr (our choice)

  c.filter.n_calibration = 100

  # --- Student finetuning.
  c.finetune.train.update(steps=40, batch_size=8, log_every=5, checkpoint_every=20,
                          max_to_keep=1)
  c.finetune.optim.update(lr=1e-4, warmup_steps=4)

  c.eval.update(hs_n=64, fa_n=64, max_new_tokens=48, batch_size=16,
                fa_max_new_tokens=128 if a["task"] == "gsm8k" else 4)

  if a["quick"]:
    c.prompt.max_len = 64
    c.prompt.max_prompt_len = 64
    c.data.user_n = 40
    c.data.n_alignment_harmful = 16
    c.data.n_alignment_harmless = 16
    c.refusal.n_probe = 16
    c.refusal.n_val = 16
    c.teacher.refusal_update_every = 2
    c.teacher.train.update(steps=3, batch_size=4, log_every=1, checkpoint_every=0)
    c.finetune.train.update(steps=3, batch_size=4, log_every=1, checkpoint_every=0)
    c.filter.n_calibration = 16
    c.eval.update(hs_n=8, fa_n=8, max_new_tokens=16, batch_size=8,
                  fa_max_new_tokens=32 if a["task"] == "gsm8k" else 4)
  return c
