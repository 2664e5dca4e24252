"""Stage `generate` (on demand): the base model answers `config.generate.prompts`, a one-minute
check that the model loads and talks. Writes generations.json."""

from __future__ import annotations

import logging

from refjax.evaluation.generation import Generator, SamplingConfig
from refjax.files import write_json
from refjax.stages.context import Run

log = logging.getLogger(__name__)


def run(r: Run) -> dict:
  gc = r.cfg.generate
  model, _, fmt = r.load()
  gen = Generator(model, fmt, batch_size=gc.batch_size,
                  max_prompt_len=r.cfg.prompt.max_prompt_len,
                  share_prefix=bool(r.cfg.prompt.share_prefix))
  prompts = list(gc.prompts)
  answers = gen.generate_text(prompts, SamplingConfig(max_new_tokens=gc.max_new_tokens,
                                                      temperature=gc.temperature),
                              seed=r.cfg.seed, progress=True)
  rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
  write_json(r.wd.generations, rows)
  for row in rows:
    log.info("Q: %s\nA: %s", row["prompt"], row["answer"])
  return {"generations": str(r.wd.generations), "n": len(rows)}
