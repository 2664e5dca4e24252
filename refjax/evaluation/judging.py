"""The one judge factory: `config.eval.judge` -> a Judge, built once per evaluate stage.

JUDGES is the list of names a config may give; each entry's builder is below it.
"""

from __future__ import annotations

from typing import Any, Callable

from refjax.evaluation.generation import Generator, SamplingConfig
from refjax.evaluation.judges import Judge, LlamaGuardJudge, RefusalKeywordJudge
from refjax.evaluation.moderation import ModerationJudge
from refjax.models import hub

JUDGES = ("refusal_keywords", "qa_probe", "moderation", "llama_guard")

# (model dir) -> (Decoder, tokenizer, PromptFormat): how a stage loads a generative judge's model.
ModelLoader = Callable[[str], tuple[Any, Any, Any]]


def make_judge(eval_cfg: Any, load_model: ModelLoader | None = None,
               load_qa: Callable[[], Judge] | None = None) -> Judge:
  """The judge `eval_cfg.judge` names: the trained QA judge comes from `load_qa` (the run's
  `judge` stage); the moderation and llama_guard judges load `eval_cfg.judge_model`."""
  name = eval_cfg.judge
  if name not in JUDGES:
    raise ValueError(f"config.eval.judge={name!r}; expected one of {JUDGES}")
  if name == "refusal_keywords":
    return RefusalKeywordJudge()
  if name == "qa_probe":
    if load_qa is None:
      raise ValueError("the qa_probe judge needs the run's trained judge (stage `judge`)")
    return load_qa()
  if not eval_cfg.judge_model:
    raise ValueError(f"config.eval.judge_model: the {name!r} judge needs a model (HF dir, hub id "
                     "or shipped model name)")
  path = str(hub.resolve(eval_cfg.judge_model))
  if name == "moderation":
    return ModerationJudge.from_pretrained(path)
  if load_model is None:
    raise ValueError("the llama_guard judge needs a model loader")
  model, tok, fmt = load_model(path)
  gen = Generator(model, fmt, batch_size=int(eval_cfg.batch_size), max_prompt_len=4096)
  return LlamaGuardJudge(lambda texts: gen.generate_raw(texts, SamplingConfig(max_new_tokens=10)),
                         tok)


__all__ = ["JUDGES", "make_judge"]
