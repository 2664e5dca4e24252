"""The built-in default: SmolLM2-135M-Instruct and the local data, sized for a 2-core CPU.

  python -m refjax.main --config=configs/smollm.py          # reft, sft, judge_filter, joint
  python -m refjax.main --config=configs/smollm.py:all      # + sa_ft, filter_only, distill_only
  python -m refjax.main --config=configs/smollm.py:quick    # a smoke run of every stage
  python -m refjax.main --config=configs/smollm.py:paper    # the paper's filter (see below)
  python -m refjax.main --config=configs/smollm.py:full     # full finetuning instead of LoRA

The default filter is the best measured on harmful sources the teacher never saw (issue 15;
README, Results): five harmful sources balanced in the teacher's data, probe, layer choice and
calibration; task-formatted and edgy harmless rows and wrapped prompts in the regulariser's data;
a logistic probe on the teacher's layer-25 features as the filter's scorer. It catches nearly
every unseen harmful request (recall 0.94 against the paper filter's 0.27) but drops about 30% of
generic harmless instructions (0% of the task's rows); with it, `reft` is as safe as with the
paper's filter and `joint` safer (HS 2 and 14 against 4 and 33). `:paper` is the paper's filter:
BeaverTails alone in the teacher's data, one difference-of-means direction, cosine. Variants
combine (`:paper,quick`).

The default trains a real attack: one epoch over 1000 user examples, 10% of them harmful, for
every method, with LoRA adapters on the student (README, Results, gives the measured time).

SmolLM2-135M-Instruct is not safety-aligned (../shared/ENV.md): it is the base model, the
student's start and the teacher's start, as in the paper's main setting.
"""

from refjax.config import base_config
from refjax.config_arg import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, {"quick": False, "all": False, "paper": False, "full": False},
                where="configs/smollm.py")
  c = base_config()
  c.model.name = "smollm2-135m-instruct"
  c.prompt.template = "chat"
  c.prompt.stop_tokens = ("<|im_end|>",)
  c.prompt.max_len = 128
  c.prompt.max_prompt_len = 128
  c.method = "sft,judge_filter,joint,reft"
  if a["all"]:  # the other baseline and the two ablations: about 20 minutes more
    c.method = "sft,sa_ft,joint,judge_filter,reft,filter_only,distill_only"
  c.data.task = "sst2"
  c.data.user_n = 1000
  c.data.harmful_ratio = 0.1
  c.data.n_alignment_harmful = 400
  c.data.n_alignment_harmless = 400
  c.refusal.n_probe = 64
  c.refusal.n_val = 64
  if not a["paper"]:  # issue 15's filter levers: the best measured on unseen harmful sources
    c.data.alignment_mix = "beavertails,stl_alignment,advbench,malicious_instruct,tdc2023"
    c.data.harmless_mix = "sst2_train,ag_news_train,gsm8k_train,edgy_benign"
    c.data.n_harmless_mix = 50
    c.data.wrap_per_family = 20
    c.refusal.val_harmful = "mix_calib"
    c.filter.calibration_harmful = "mix_calib"
    c.filter.n_calibration = 400
    c.filter.scorer = "logistic"
    c.filter.logistic_l2 = 0.01
    c.filter.layer = 25
  c.teacher.refusal_update_every = 20
  c.teacher.train.update(steps=40, batch_size=8, log_every=5, checkpoint_every=20, max_to_keep=1)
  c.teacher.optim.update(lr=5e-5, warmup_steps=5)
  # One epoch over the user rows, packed (several examples per 256-token row, attention kept per
  # example, the 24 tokens of the chat template's system turn and user header held once per row:
  # `finetune.share_prefix`); two of each step's six rows are alignment rows (KD from the
  # teacher's cached top-k for reft). The bulk of the run. Six rows of about five examples give a
  # step about as many user examples as the earlier eight rows of unshared prompts did (`sft` at
  # eight shared rows, 25 steps, reached FA 72 against 86 at six, 33 steps; README, Results).
  # The student trains LoRA r=8 adapters on every linear layer at lr 1e-3; the teacher stays
  # fully finetuned. `:full` finetunes every weight at lr 1e-4.
  c.model.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")
  c.finetune.update(epochs=1.0, align_ratio=1 / 3, max_len=256, pack_len=256, kd_topk=32,
                    lora_rank=8, share_prefix=True)
  c.finetune.train.update(batch_size=6, log_every=2, checkpoint_every=20, max_to_keep=1)
  c.finetune.optim.update(lr=1e-3, warmup_steps=3)
  if a["full"]:
    c.finetune.lora_rank = 0
    c.finetune.optim.lr = 1e-4
  c.eval.update(hs_n=100, fa_n=100, max_new_tokens=32, fa_max_new_tokens=4, batch_size=32)
  # The judge reads an answer's first 48 tokens, not 96: the answers it scores here are at most
  # 32 tokens long, and its build (every training and validation pair) runs shorter rows.
  c.judge.response_tokens = 48
  # The filter on unseen sources: 50 prompts per harmful source and 100 per benign set (about
  # 2.5 minutes; the figures in the README's issue-15 research used 100 / 200).
  c.generalisation.update(n_source=50, n_benign=100)
  if a["quick"]:
    c.method = "reft,sft,judge_filter"
    c.prompt.max_len = 64
    c.prompt.max_prompt_len = 64
    c.data.user_n = 40
    c.data.n_alignment_harmful = 16
    c.data.n_alignment_harmless = 16
    c.refusal.n_probe = 16
    c.refusal.n_val = 16
    c.teacher.refusal_update_every = 2
    c.teacher.train.update(steps=3, batch_size=4, log_every=1, checkpoint_every=0)
    c.finetune.update(epochs=0.0, max_len=128, pack_len=128)  # three steps, short rows
    c.finetune.train.update(steps=3, batch_size=4, log_every=1, checkpoint_every=0)
    c.filter.update(n_calibration=16, n_fit=32)
    if not a["paper"]:
      c.data.update(n_harmless_mix=4, wrap_per_family=2)
    c.generalisation.update(n_source=8, n_benign=8, wrap_per_family=2)
    c.eval.update(hs_n=8, fa_n=8, max_new_tokens=16, fa_max_new_tokens=4, batch_size=8)
    # a smaller judge (its own cache entry): the same recipe on a quarter of the pairs
    c.judge.update(n_harmful=200, n_safe_beavertails=100, n_safe_stl=50, n_helpful=25,
                   n_non_answer=600, n_refuse_comply=50, n_validation=16)
    c.judge.train.update(steps=200)
  return c
