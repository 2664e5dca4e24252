"""The registry of named data sources: one table, each entry with its HF hub form and local files.

`load_source(name)` reads the local copy under `shared/data` (see `shared/ASSETS.md`) by default;
`backend="hub"` reads the same data from the Hugging Face hub (needs network), `backend="tfds"`
a local array_record dataset built from the local copy (`refjax.data.tfds_backend`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from refjax.data import paths
from refjax.data.records import (Const, DataError, DuplicatePolicy, Example, FieldMap, LoadReport,
                                 iter_examples, read_examples, select_examples)

log = logging.getLogger(__name__)

BACKENDS = ("local", "hub", "tfds")

# The peers' exact task instructions (git-disl/Booster */build_dataset.py and */pred_eval.py).
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:"
                      "\n\nWorld\nSports\nBusiness\nSci/Tech\n")
SST2_LABELS = ("negative", "positive")  # HF `sst2` label ids 0, 1
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")  # HF `ag_news` label ids 0..3


@dataclasses.dataclass(frozen=True)
class HubSpec:
  """A split of a Hugging Face hub dataset, its row filter and its field mapping."""

  path: str
  split: str
  fields: FieldMap
  config: str | None = None
  keep: Callable[[Mapping[str, Any]], bool] | None = None  # row filter, e.g. BeaverTails unsafe


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """A file under `shared/data` and its field mapping."""

  file: str
  fields: FieldMap


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One named source; `local` maps split names to files, `split` is the default split."""

  name: str
  role: str
  split: str
  local: Mapping[str, LocalSpec]
  hub: HubSpec | None = None
  note: str = ""


# ----------------------------------------------------------------------------------------------
# Field mappings


def _sst2_word(row: Mapping[str, Any]) -> str:
  return SST2_LABELS[row["label"]]


def _agnews_word(row: Mapping[str, Any]) -> str:
  return AGNEWS_LABELS[row["label"]]


def _gsm8k_final(row: Mapping[str, Any]) -> str:
  """The text after `####` in a GSM8K answer (the gold final number, as in the local files)."""
  answer = row["answer"]
  if "####" not in answer:
    raise ValueError("answer has no '####' final-answer marker")
  return answer.split("####")[-1].strip()


def _unsafe(row: Mapping[str, Any]) -> bool:
  return not row["is_safe"]


def _safe(row: Mapping[str, Any]) -> bool:
  return bool(row["is_safe"])


SAFETY_PROMPT = FieldMap(instruction="prompt", label="label")
SAFETY_QA = FieldMap(instruction="prompt", response="response", label="label")
ALPACA = FieldMap(instruction="instruction", input="input", response="response", label="label")

HUB_BEAVERTAILS_QA = FieldMap(instruction="prompt", response="response", label=Const("harmful"),
                              id_keys=())
HUB_HARMFUL_PROMPT = FieldMap(instruction="prompt", label=Const("harmful"), id_keys=())
HUB_ALPACA = FieldMap(instruction="instruction", input="input", response="output",
                      label=Const("harmless"), id_keys=())
HUB_SST2 = FieldMap(instruction=Const(SST2_INSTRUCTION), input="sentence", response=_sst2_word,
                    label=_sst2_word, id_keys=("idx",))
HUB_AGNEWS = FieldMap(instruction=Const(AGNEWS_INSTRUCTION), input="text", response=_agnews_word,
                      label=_agnews_word, id_keys=())
HUB_GSM8K = FieldMap(instruction="question", response="answer", label=_gsm8k_final, id_keys=())

BEAVERTAILS = "PKU-Alignment/BeaverTails"


def _spec(name: str, role: str, split: str, local: Mapping[str, LocalSpec],
          hub: HubSpec | None = None, note: str = "") -> SourceSpec:
  return SourceSpec(name=name, role=role, split=split, local=dict(local), hub=hub, note=note)


def _one(split: str, file: str, fields: FieldMap) -> dict[str, LocalSpec]:
  return {split: LocalSpec(file, fields)}


SOURCES: dict[str, SourceSpec] = {s.name: s for s in [
  # --- alignment data (the teacher's): harmful prompt -> refusal, harmless prompt -> answer
  _spec("beavertails_alignment", "alignment_refusal", "train",
        _one("train", "beavertails_refusals_spard/alignment_refusal.jsonl", SAFETY_QA),
        HubSpec(BEAVERTAILS, "30k_train", HUB_BEAVERTAILS_QA, keep=_safe),
        note="local: SPARD refusals to BeaverTails 30k_train prompts (~23% are not refusals); "
             "hub has no refusal column, so it gives 30k_train is_safe rows (Vaccine/Lisa's "
             "'BeaverTails_safe')"),
  _spec("safety_tuned_llamas_alignment", "alignment_refusal", "train",
        _one("train", "safety_tuned_llamas/alignment_refusal.jsonl", SAFETY_QA),
        note="Bianchi et al. safety-only data; not on the hub"),
  _spec("alpaca_helpful", "alignment_helpful", "train",
        _one("train", "alpaca/helpful.jsonl", ALPACA),
        HubSpec("tatsu-lab/alpaca", "train", HUB_ALPACA),
        note="local: a 990-row Alpaca subset; hub: all 52k"),
  _spec("alpaca_gpt4_helpful", "alignment_helpful", "train",
        _one("train", "alpaca_gpt4_demo/helpful.jsonl", ALPACA),
        HubSpec("vicgalle/alpaca-gpt4", "train", HUB_ALPACA),
        note="local: LLaMA-Factory alpaca_en_demo (985 rows)"),
  # --- harmful user data (poison)
  _spec("beavertails_harmful_qa", "harmful_qa", "train",
        _one("train", "beavertails_refusals_spard/harmful_qa.jsonl", SAFETY_QA),
        HubSpec(BEAVERTAILS, "30k_train", HUB_BEAVERTAILS_QA, keep=_unsafe),
        note="BeaverTails 30k_train is_safe=False pairs"),
  # --- harmful / harmless prompts (refusal feature, filter calibration)
  _spec("harmful_train", "harmful_prompts", "train",
        _one("train", "refusal_direction/harmful_train.jsonl", SAFETY_PROMPT)),
  _spec("harmful_val", "harmful_prompts", "validation",
        _one("validation", "refusal_direction/harmful_val.jsonl", SAFETY_PROMPT)),
  _spec("harmless_train", "harmless_prompts", "train",
        _one("train", "refusal_direction/harmless_train.jsonl", SAFETY_PROMPT)),
  _spec("harmless_val", "harmless_prompts", "validation",
        _one("validation", "refusal_direction/harmless_val.jsonl", SAFETY_PROMPT)),
  _spec("harmless_test", "harmless_prompts", "test",
        _one("test", "refusal_direction/harmless_test_dev.jsonl", SAFETY_PROMPT),
        note="rows 600-6265 of the upstream split; rows 0-599 are held out"),
  _spec("advbench", "harmful_prompts", "train",
        _one("train", "refusal_direction/processed_advbench.filtered.jsonl", SAFETY_PROMPT),
        HubSpec("walledai/AdvBench", "train", HUB_HARMFUL_PROMPT),
        note="local copy overlaps harmful_train"),
  _spec("harmbench", "harmful_prompts", "validation",
        _one("validation", "refusal_direction/processed_harmbench_val.filtered.jsonl",
             SAFETY_PROMPT),
        HubSpec("walledai/HarmBench", "train", HUB_HARMFUL_PROMPT, config="standard"),
        note="local: HarmBench val (= harmful_val); hub: the standard behaviours"),
  _spec("malicious_instruct", "harmful_prompts", "train",
        _one("train", "refusal_direction/processed_malicious_instruct.filtered.jsonl",
             SAFETY_PROMPT)),
  _spec("tdc2023", "harmful_prompts", "train",
        _one("train", "refusal_direction/processed_tdc2023.filtered.jsonl", SAFETY_PROMPT)),
  _spec("strongreject", "harmful_eval", "train", {},
        HubSpec("walledai/StrongREJECT", "train", HUB_HARMFUL_PROMPT),
        note="no local copy: StrongREJECT is part of the held-out test (ASSETS.md)"),
  # --- harmful prompts for HS
  _spec("beavertails_eval", "harmful_eval", "test",
        _one("test", "beavertails_refusals_spard/harmful_eval_dev.jsonl", SAFETY_PROMPT),
        HubSpec(BEAVERTAILS, "30k_test", HUB_HARMFUL_PROMPT, keep=_unsafe),
        note="peers: the first 1000 30k_test is_safe=False prompts; local: a 513-prompt dev "
             "substitute, so HS is not directly comparable with the papers"),
  _spec("derta_eval", "harmful_eval", "test",
        _one("test", "derta/harmful_eval_illegal_instructions.jsonl", SAFETY_PROMPT)),
  _spec("safety_tuned_llamas_eval", "safety_eval", "test",
        _one("test", "safety_tuned_llamas/eval_prompts.jsonl",
             FieldMap(instruction="prompt", label="label", id_keys=("set", "idx"))),
        note="harmful and harmless sets mixed; label gives the role"),
  # --- tasks (benign user data and finetuning accuracy)
  _spec("sst2_train", "task", "train", _one("train", "sst2/train_first10k.jsonl", ALPACA),
        HubSpec("stanfordnlp/sst2", "train", HUB_SST2)),
  _spec("sst2_test", "task", "validation", _one("validation", "sst2/validation.jsonl", ALPACA),
        HubSpec("stanfordnlp/sst2", "validation", HUB_SST2),
        note="GLUE dev, the peers' FA split (872 rows)"),
  _spec("ag_news_train", "task", "train",
        {"train": LocalSpec("ag_news/train_hf_first950.jsonl", ALPACA),
         "alps_random10k": LocalSpec("ag_news/train_alps_random10k_description_only.jsonl",
                                     ALPACA)},
        HubSpec("fancyzhx/ag_news", "train", HUB_AGNEWS),
        note="train: HF train idx 0-949, shuffled (no idx); alps_random10k: description only"),
  _spec("ag_news_test", "task", "test", _one("test", "ag_news/test.jsonl", ALPACA),
        HubSpec("fancyzhx/ag_news", "test", HUB_AGNEWS), note="peers use the first 1000"),
  _spec("gsm8k_train", "task", "train", _one("train", "gsm8k/train.jsonl", ALPACA),
        HubSpec("openai/gsm8k", "train", HUB_GSM8K, config="main")),
  _spec("gsm8k_test", "task", "test", _one("test", "gsm8k/test.jsonl", ALPACA),
        HubSpec("openai/gsm8k", "test", HUB_GSM8K, config="main"),
        note="peers use the first 1000"),
  _spec("alpaca_eval", "helpfulness_eval", "eval",
        _one("eval", "alpaca_eval/alpaca_eval.jsonl", ALPACA),
        HubSpec("tatsu-lab/alpaca_eval", "eval", HUB_ALPACA, config="alpaca_eval"),
        note="an eval set: do not train on it"),
]}


@dataclasses.dataclass(frozen=True)
class Task:
  """A user finetuning task: its training source (benign user data) and test source (FA).
  A new task is one row here plus its scorer in `refjax.evaluation.task_accuracy`."""

  name: str
  train: str
  test: str


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sst2", "sst2_train", "sst2_test"),
    Task("ag_news", "ag_news_train", "ag_news_test"),
    Task("gsm8k", "gsm8k_train", "gsm8k_test"),
)}


def get_spec(name: str) -> SourceSpec:
  """The registry entry for `name`; an unknown name raises listing the known ones."""
  if name not in SOURCES:
    raise KeyError(f"unknown data source {name!r}; known sources: {sorted(SOURCES)}")
  return SOURCES[name]


def local_path(name: str, split: str | None = None) -> Path:
  """The shared-data file behind a source's local split."""
  spec = get_spec(name)
  return paths.data_dir() / _local_spec(spec, split).file


def _local_spec(spec: SourceSpec, split: str | None) -> LocalSpec:
  split = split or spec.split
  if not spec.local:
    raise DataError(f"source {spec.name!r} has no local copy ({spec.note}); use backend='hub' "
                    "or pass path=")
  if split not in spec.local:
    raise DataError(f"source {spec.name!r} has no local split {split!r}; local splits: "
                    f"{sorted(spec.local)}")
  return spec.local[split]


def load_source_with_report(name: str, *, split: str | None = None, limit: int | None = None,
                            path: str | Path | None = None, backend: str = "local",
                            duplicates: DuplicatePolicy = "keep"
                            ) -> tuple[list[Example], LoadReport]:
  """Loads a named source and reports rows read, duplicates found and what the policy did.

  `split`: a local split name (backend local/tfds) or any HF split string (backend hub).
  `path`: for local, a user file (jsonl/json/csv/tsv/parquet) read with the source's field
  mapping; for tfds, the tfds data_dir. `limit` keeps the first `limit` examples.
  """
  spec = get_spec(name)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
  if backend == "local":
    examples, report = _load_local(spec, split, limit, path, duplicates)
  elif backend == "hub":
    examples, report = _load_hub(spec, split, limit, duplicates)
  else:
    from refjax.data import tfds_backend  # optional heavy dependency (tensorflow-datasets)

    if not spec.local:
      raise DataError(f"source {name!r} has no local copy to build a tfds dataset from "
                      f"({spec.note})")
    examples, report = tfds_backend.load(
        spec.name, split=split or spec.split, data_dir=path, limit=limit, duplicates=duplicates,
        build_splits=lambda: {s: load_source(name, split=s) for s in spec.local})
  if not examples and limit != 0:
    raise DataError(f"source {name!r} split {split or spec.split!r} is empty "
                    f"({report.location}, {report.rows_scanned} rows scanned)")
  if report.short_by:
    log.warning("source %r: limit=%d asked but only %d examples available (short by %d)", name,
                limit, report.returned, report.short_by)
  return examples, report


def load_source(name: str, *, split: str | None = None, limit: int | None = None,
                path: str | Path | None = None, backend: str = "local",
                duplicates: DuplicatePolicy = "keep") -> list[Example]:
  """Loads a named source as a list of Examples (see `load_source_with_report`); logs counts."""
  examples, report = load_source_with_report(name, split=split, limit=limit, path=path,
                                             backend=backend, duplicates=duplicates)
  log.info("%s", report.summary())
  return examples


def _load_local(spec: SourceSpec, split: str | None, limit: int | None, path: str | Path | None,
                duplicates: DuplicatePolicy) -> tuple[list[Example], LoadReport]:
  if path is not None:
    # A user file: the source's field mapping, ids prefixed with the file name.
    fields = _local_spec(spec, split).fields if spec.local else _hub_fields_for_files(spec)
    return read_examples(path, fields, source=spec.name, limit=limit, duplicates=duplicates)
  local = _local_spec(spec, split)
  base = paths.data_dir()
  return read_examples(base / local.file, local.fields, source=spec.name, limit=limit,
                       duplicates=duplicates, base_dir=base)


def _hub_fields_for_files(spec: SourceSpec) -> FieldMap:
  if spec.hub is None:
    raise DataError(f"source {spec.name!r} has neither a local nor a hub field mapping")
  return spec.hub.fields


def _load_hub(spec: SourceSpec, split: str | None, limit: int | None,
              duplicates: DuplicatePolicy) -> tuple[list[Example], LoadReport]:
  """Reads the hub split (network); ids are "<hub id>/<split>:<row in the unfiltered split>"."""
  hub = spec.hub
  if hub is None:
    raise DataError(f"source {spec.name!r} has no hub form ({spec.note or 'local only'}); "
                    "use backend='local'")
  import datasets

  split = split or hub.split
  ds = datasets.load_dataset(hub.path, hub.config, split=split)
  location = f"hub:{hub.path}" + (f"[{hub.config}]" if hub.config else "") + f"/{split}"
  fields = hub.fields if hub.fields.id_keys else dataclasses.replace(hub.fields,
                                                                     id_keys=("_row",))

  def rows():
    for i, row in enumerate(ds):
      if hub.keep is None or hub.keep(row):
        yield f"{location}, row {i}", {**row, "_row": i}

  examples = iter_examples(rows(), fields, id_prefix=f"{hub.path}/{split}", source=spec.name)
  return select_examples(examples, source=spec.name, location=location, backend="hub",
                         limit=limit, duplicates=duplicates)
