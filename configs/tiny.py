"""A random 2-layer model with a byte tokenizer: the whole pipeline in about a minute, for tests.

Real data (../shared/data), real stages and artifacts; only the model is tiny and untrained.
"""

from refjax.config import base_config
from refjax.config_arg import parse_arg


def get_config(arg=None):
  parse_arg(arg, {}, where="configs/tiny.py")  # no variants
  c = base_config()
  c.model.name = "tiny"
  c.method = "reft,sft,judge_filter"
  c.prompt.max_len = 128
  c.prompt.max_prompt_len = 128
  c.generate.max_new_tokens = 8
  c.generate.prompts = ("hello", "what is 2+2?")
  c.data.n_alignment_harmful = 16
  c.data.n_alignment_harmless = 16
  c.data.user_n = 40
  c.data.harmful_ratio = 0.2
  c.refusal.n_probe = 16
  c.refusal.n_val = 16
  c.refusal.batch_size = 16
  c.refusal.layer_range = (0.0, 1.0)
  c.filter.n_calibration = 16
  c.teacher.refusal_update_every = 4
  c.teacher.reg_weight = 2.0
  c.teacher.train.update(steps=8, batch_size=8, log_every=2, checkpoint_every=4,
                         progress_bar=False)
  c.teacher.optim.update(lr=1e-3, warmup_steps=0)
  c.filter.n_calibration = 16
  c.filter.target_recall = 0.25  # a random model separates nothing; keep most user data
  # Issue 15's logistic scorer and the generalisation report on a few prompts per set. The
  # teacher's data stays the paper's (BeaverTails + Alpaca): in 8 steps a random 2-layer model
  # separates that, not the five-source mix with wrapped and task rows (tests/
  # test_filter_protocol.py builds the mix itself).
  c.filter.update(scorer="logistic", n_fit=16)
  c.generalisation.update(n_source=4, n_benign=4, wrap_per_family=2)
  c.finetune.train.update(steps=6, batch_size=8, log_every=2, checkpoint_every=3,
                          progress_bar=False)
  c.finetune.optim.update(lr=1e-3)
  c.eval.update(hs_n=8, fa_n=8, max_new_tokens=8, fa_max_new_tokens=4, batch_size=8)
  # The QA judge on the tiny backbone: a few pairs, a few validation prompts (a random model
  # judges nothing well; this checks the machinery, not the figures).
  c.judge.update(backbone="tiny", layers=(1, 2), hidden=8, prompt_tokens=32, response_tokens=32,
                 n_harmful=16, n_safe_beavertails=8, n_safe_stl=4, n_helpful=4, n_non_answer=16,
                 n_refuse_comply=4,
                 calib_percent=25, n_validation=4)
  c.judge.train.update(steps=20, log_every=10)
  return c
