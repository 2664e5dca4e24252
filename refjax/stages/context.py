"""What every stage of one run shares: its config, workdir, parallelism plan, example sets, and how
a model is loaded onto the mesh, exported and cleaned up after."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from refjax.data.batches import encode_examples, harmful_labels, prompt_batches
from refjax.data.prompts import PromptFormat
from refjax.data.sets import ExampleSets
from refjax.evaluation.judges import RefusalKeywordJudge
from refjax.models.export import export_hf_dir
from refjax.models.loading import load_model_and_tokenizer
from refjax.models.lora import merge_lora
from refjax.parallel.plan import Parallel
from refjax.stages.fingerprint import Digests
from refjax.stages.workdir import Workdir
from refjax.training.loop import CHECKPOINT_DIR

log = logging.getLogger(__name__)
MIN_ROOM = 8  # tokens of user text a prompt must have room for beyond its template


@dataclasses.dataclass
class Run:
  """One run: `cfg` (the resolved config) and `wd` (its workdir); the rest is built on demand."""

  cfg: Any
  wd: Workdir

  @functools.cached_property
  def plan(self) -> Parallel:
    return Parallel.from_config(self.cfg)

  @functools.cached_property
  def sets(self) -> ExampleSets:
    return ExampleSets(self.cfg, RefusalKeywordJudge().is_refusal)

  @functools.cached_property
  def digests(self) -> Digests:
    return Digests(self.cfg, self.sets)

  _shared: dict = dataclasses.field(default_factory=dict, repr=False)

  def shared(self, key: str, make: Callable[[], Any]) -> Any:
    """One object per run shared by its stages (a loaded judge, say), made on first use."""
    if key not in self._shared:
      self._shared[key] = make()
    return self._shared[key]

  @property
  def start_model(self) -> str | None:
    """What the teacher (and the base refusal feature) starts from: None = config.model."""
    return None if self.cfg.teacher.init == "base" else self.cfg.teacher.init

  def load(self, name: str | Path | None = None, lora_rank: int | None = None
           ) -> tuple[Any, Any, PromptFormat]:
    """(model, tokenizer, prompt format) of config.model, or of model `name` with the same
    settings (dtype, LoRA: `lora_rank` when given), each tensor read into its sharding."""
    mc = self.cfg.model
    if name is not None or lora_rank is not None:
      mc = mc.copy_and_resolve_references()
      with mc.unlocked():
        mc.name = str(name) if name is not None else mc.name
        mc.lora_rank = mc.lora_rank if lora_rank is None else int(lora_rank)
    model, tok = load_model_and_tokenizer(mc, plan=self.plan)
    fmt = PromptFormat.from_config(tok, self.cfg.prompt)
    check_lengths(fmt, self.cfg.prompt)
    return model, tok, fmt

  def require(self, path: Path, stage: str) -> Path:
    """`path`, or an error naming the stage that writes it."""
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: run the `{stage}` stage first "
                              f"(--stages={stage})")
    return path

  def training_arrays(self, examples: Sequence[Any], fmt: PromptFormat) -> dict[str, np.ndarray]:
    """Prompt + response of each example as right-padded [N, prompt.max_len] training arrays."""
    enc = encode_examples(examples, fmt, self.cfg.prompt.max_len)
    if enc.truncated:
      log.info("%d of %d examples were truncated to prompt.max_len=%d", enc.truncated, len(enc),
               self.cfg.prompt.max_len)
    a = enc.arrays
    # Rows without a response (edgy benign prompts of the filter levers) train the regulariser only.
    has_response = np.array([bool(e.response) for e in examples])[:, None]
    return {"tokens": a["tokens"], "attention_mask": a["attention_mask"],
            "loss_mask": a["response_mask"] * has_response.astype(a["response_mask"].dtype),
            "weights": np.ones(len(enc), np.float32),
            "last_prompt_index": a["last_prompt_index"], "labels_sign": a["labels_sign"]}

  def prompt_batches(self, examples: Sequence[Any], fmt: PromptFormat, batch_size: int,
                     *, labelled: bool = True) -> tuple[list[dict], np.ndarray | None]:
    """Fixed-shape prompt batches (and their harmful/harmless labels) at prompt.max_prompt_len."""
    labels = harmful_labels(examples) if labelled else None
    return prompt_batches(examples, fmt, batch_size=batch_size,
                          max_len=self.cfg.prompt.max_prompt_len, labels=labels,
                          share_prefix=bool(self.cfg.prompt.share_prefix)), labels

  @staticmethod
  def export(model: Any, tokenizer: Any, out: Path) -> Path:
    """The model (LoRA merged) as an HF directory, written atomically."""
    merged = merge_lora(model)
    return export_hf_dir(merged, merged.cfg, tokenizer, out, overwrite=True)

  @staticmethod
  def drop_checkpoints(stage_dir: Path, keep: bool) -> None:
    """Deletes a finished stage's Orbax checkpoints unless `keep` (its model is exported): renamed
    away first (atomic), so a kill mid-delete never leaves a half checkpoint to resume from."""
    stage_dir, doomed = Path(stage_dir), Path(stage_dir) / f".{CHECKPOINT_DIR}.deleting"
    if doomed.exists():  # left by a kill during an earlier delete
      shutil.rmtree(doomed)
    if not keep and (stage_dir / CHECKPOINT_DIR).exists():
      os.replace(stage_dir / CHECKPOINT_DIR, doomed)
      shutil.rmtree(doomed)


def check_lengths(fmt: PromptFormat, pc: Any, room: int = MIN_ROOM) -> None:
  """prompt.max_prompt_len / max_len must leave room for the user's text beyond the template's
  own tokens (else every prompt is cut to the template and every score is the same)."""
  overhead = fmt.template_overhead()
  for key in ("max_prompt_len", "max_len"):
    if int(pc[key]) < overhead + room:
      raise ValueError(f"config.prompt.{key}={pc[key]} leaves no room for the user's text: the "
                       f"{pc.template} template alone takes {overhead} tokens; expected >= "
                       f"{overhead + room}")


__all__ = ["Run", "check_lengths"]
