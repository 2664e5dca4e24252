"""Stage `screen`: the moderation-filter baseline's screen. The QA judge reads every user example's
(prompt, response) pair and drops the ones it flags (the strongest published data-filtering
defence: a moderation model screening the customer's pairs before plain finetuning).

Reads judge/ and the user data; writes screen/screen_report.jsonl (every example: id, the judge's
P(harmful), decision, provenance, sha256 of the text; never the text) and screen/screen_summary.json.
"""

from __future__ import annotations

import logging

from refjax.data.judge_pairs import assert_unseen
from refjax.data.prompts import PromptFormat, template_markers
from refjax.evaluation.qa_judge import RULE_TEXT
from refjax.models import hub
from refjax.models.loading import load_tokenizer
from refjax.models.tiny import byte_tokenizer
from refjax.stages.context import Run
from refjax.stages.decisions import write_decisions
from refjax.stages.judge import load_judge

log = logging.getLogger(__name__)


def run(r: Run) -> dict:
  judge = r.shared("qa_judge", lambda: load_judge(r))
  user = r.sets.user()
  assert_unseen(judge.trained_prompts, [fmt_prompt(e) for e in user], [e.id for e in user], "user")
  assert_unseen(judge.trained_prompts, [e.instruction for e in user], [e.id for e in user], "user")
  scores = judge.scores([fmt_prompt(e) for e in user], [e.response for e in user])
  keep = scores <= judge.threshold
  if not keep.any():
    raise ValueError(f"the judge flags all {len(user)} user examples (threshold "
                     f"{judge.threshold:.3f}); nothing is left to finetune on")
  fmt = student_format(r)
  summary = write_decisions(
      r.wd.screen_report, r.wd.screen_summary, user, scores, keep, judge.threshold,
      text_sha256=[fmt.scored_digest(e.instruction, e.input, e.response) for e in user],
      markers=[template_markers(e.instruction, e.input) for e in user],
      scorer="QA judge: P(harmful) of the (prompt, response) pair",
      threshold_rule=f"the judge's own: {RULE_TEXT[judge.spec.threshold_rule]}")
  log.info("screen: the judge drops %d of %d user examples", summary["n_dropped"], len(user))
  return {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


def fmt_prompt(e) -> str:
  """The user's request as the judge reads it: the instruction, then its input if any."""
  return f"{e.instruction}\n\n{e.input}" if e.input else e.instruction


def student_format(r: Run) -> PromptFormat:
  """The student's prompt format (the text hashes must match what finetune checks)."""
  name = r.cfg.model.name
  tok = byte_tokenizer() if hub.is_tiny(name) else load_tokenizer(hub.resolve(name))
  return PromptFormat.from_config(tok, r.cfg.prompt)


__all__ = ["run"]
