"""How a run lives on disk: every artifact path of a workdir, the refusal-feature artifact, stage
markers, and the loader the notebook and the report read a finished run with.

    config.json                   the resolved config of the run that made these artifacts
    stages/<stage>.done.json      a finished stage's fingerprint, inputs and summary
    stages/<stage>/<method>.done.json   the same for one method of a per-method stage
    refusal_base/                 the start model's refusal feature + per-layer AUROC + layer
    teacher/model/                the Ref-Teacher (HF dir); metrics.jsonl, refusal_updates.json
    refusal/                      the teacher's refusal feature, auroc.json, cosine_sets.npz,
                                  generalisation.json (stage `generalisation`)
    filter/                       filter_report.jsonl (every decision), filter_summary.json,
                                  logistic_probe.npz / directions.npz (filter.scorer's fit)
    distill/                      the teacher's top-k targets on the alignment responses
    judge/ screen/                the QA judge (pointer, validation) and its screen of the user data
    methods/<method>/             model/, finetune.json, metrics.jsonl, eval.json
    eval.json report.md *.png records/   the evaluation report
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from refjax.evaluation.report import EVAL_JSON, RECORDS_DIR, REPORT_MD
from refjax.files import CorruptFile, read_json, read_jsonl, read_npz, write_json, write_npz
from refjax.method.refusal import POSITION_RULE
from refjax.training.loop import METRICS_FILE

FEATURE_FILE = "refusal_feature.npz"
META_FILE = "refusal_feature.json"


class Workdir:
  """Every path of one run's workdir (one home for the layout)."""

  def __init__(self, root: str | Path):
    self.root = Path(root)

  def __repr__(self) -> str:
    return f"Workdir({str(self.root)!r})"

  # --- the run
  @property
  def config_json(self) -> Path:
    return self.root / "config.json"

  def marker(self, stage: str, method: str | None = None) -> Path:
    """A finished unit's record: a stage, or one method of a per-method stage."""
    if method is None:
      return self.root / "stages" / f"{stage}.done.json"
    return self.root / "stages" / stage / f"{method}.done.json"

  def running(self, stage: str, method: str | None = None) -> Path:
    """The record of a unit that started and has not finished (its fingerprint)."""
    done = self.marker(stage, method)
    return done.with_name(done.name.replace(".done.", ".running."))

  @property
  def generations(self) -> Path:
    return self.root / "generations.json"

  # --- teacher
  @property
  def teacher(self) -> Path:
    return self.root / "teacher"

  @property
  def teacher_model(self) -> Path:
    return self.teacher / "model"

  @property
  def refusal_updates(self) -> Path:
    return self.teacher / "refusal_updates.json"

  @property
  def alignment_set(self) -> Path:
    return self.teacher / "alignment_set.json"

  # --- refusal features
  @property
  def refusal_base(self) -> Path:
    return self.root / "refusal_base"

  @property
  def refusal(self) -> Path:
    return self.root / "refusal"

  @property
  def auroc(self) -> Path:
    return self.refusal / "auroc.json"

  @property
  def cosine_sets(self) -> Path:
    return self.refusal / "cosine_sets.npz"

  @property
  def generalisation(self) -> Path:
    return self.refusal / "generalisation.json"

  # --- filter
  @property
  def filter(self) -> Path:
    return self.root / "filter"

  @property
  def filter_report(self) -> Path:
    return self.filter / "filter_report.jsonl"

  @property
  def filter_summary(self) -> Path:
    return self.filter / "filter_summary.json"

  @property
  def logistic_probe(self) -> Path:
    return self.filter / "logistic_probe.npz"

  @property
  def filter_directions(self) -> Path:
    return self.filter / "directions.npz"

  # --- the QA judge (a pointer to its cache) and the moderation-filter baseline's screen
  @property
  def judge(self) -> Path:
    return self.root / "judge"

  @property
  def judge_pointer(self) -> Path:
    return self.judge / "judge.json"

  @property
  def judge_validation(self) -> Path:
    return self.judge / "judge_validation.json"

  @property
  def screen(self) -> Path:
    return self.root / "screen"

  @property
  def screen_report(self) -> Path:
    return self.screen / "screen_report.jsonl"

  @property
  def screen_summary(self) -> Path:
    return self.screen / "screen_summary.json"

  # --- the teacher's cached distillation targets
  @property
  def distill(self) -> Path:
    return self.root / "distill"

  @property
  def distill_targets(self) -> Path:
    return self.distill / "targets.npz"

  @property
  def distill_summary(self) -> Path:
    return self.distill / "summary.json"

  # --- methods
  def method(self, name: str) -> Path:
    return self.root / "methods" / name

  def method_model(self, name: str) -> Path:
    return self.method(name) / "model"

  def method_summary(self, name: str) -> Path:
    return self.method(name) / "finetune.json"

  def method_eval(self, name: str) -> Path:
    return self.method(name) / EVAL_JSON

  # --- evaluation report
  @property
  def eval_json(self) -> Path:
    return self.root / EVAL_JSON

  @property
  def report_md(self) -> Path:
    return self.root / REPORT_MD

  @property
  def records(self) -> Path:
    return self.root / RECORDS_DIR

  def costs(self) -> list[dict[str, Any]]:
    """Every finished unit's cost (stage, method, seconds, peak memory), from its marker."""
    rows = []
    for path in sorted((self.root / "stages").rglob("*.done.json")):
      try:
        m = read_json(path)
      except (CorruptFile, OSError):
        continue
      if "cost" in m:
        rows.append({"stage": m.get("stage"), "method": m.get("method"), **m["cost"]})
    return rows

  @property
  def notebook_figures(self) -> Path:
    """Where the notebook saves its figures."""
    return self.root / "notebook_figures"

  @staticmethod
  def metrics(stage_dir: Path) -> Path:
    """The metrics log `fit` writes in a training stage's directory."""
    return Path(stage_dir) / METRICS_FILE


# ---------------------------------------------------------------------------------------------
# The refusal-feature artifact


@dataclasses.dataclass(frozen=True)
class RefusalArtifact:
  """A saved refusal feature: all layers [L+1,D], the chosen layer, and its metadata."""

  feature: np.ndarray
  layer: int
  meta: dict[str, Any]

  @property
  def direction(self) -> np.ndarray:
    """The feature [D] at the chosen layer (what the filter scores against)."""
    return self.feature[self.layer]


REQUIRED_META = ("model_hash", "n_harmful", "n_harmless")


def save_refusal_feature(directory: str | Path, feature: np.ndarray | jax.Array, layer: int,
                         meta: Mapping[str, Any]) -> tuple[Path, Path]:
  """Writes refusal_feature.npz (feature [L+1,D] fp32, layer) and refusal_feature.json.

  `meta` must hold model_hash, n_harmful, n_harmless; `layer_auroc` ([L+1] floats) and anything
  else JSON-serialisable (layer_range, data sources, ...) is stored as given.
  """
  feature = np.asarray(jax.device_get(feature), np.float32)
  if feature.ndim != 2:
    raise ValueError(f"feature has shape {feature.shape}; expected [L+1, D]")
  if not np.all(np.isfinite(feature)):
    raise ValueError("feature has non-finite values")
  layer = int(layer)
  if not 0 <= layer < feature.shape[0]:
    raise ValueError(f"layer={layer}; expected 0..{feature.shape[0] - 1}")
  missing = [k for k in REQUIRED_META if k not in meta]
  if missing:
    raise ValueError(f"refusal feature meta is missing {missing}")
  aur = meta.get("layer_auroc")
  if aur is not None and len(aur) != feature.shape[0]:
    raise ValueError(f"layer_auroc has {len(aur)} entries; expected {feature.shape[0]}")
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  record = {
      "layer": layer,
      "position": POSITION_RULE,
      "num_hidden_states": feature.shape[0],
      "hidden_size": feature.shape[1],
      **{k: v for k, v in meta.items() if k not in ("layer", "position")},
  }
  npz, js = directory / FEATURE_FILE, directory / META_FILE
  write_npz(npz, feature=feature, layer=np.int32(layer))
  write_json(js, record)
  return npz, js


def load_refusal_feature(directory: str | Path) -> RefusalArtifact:
  """Reads what `save_refusal_feature` wrote; a missing or inconsistent file raises naming it."""
  directory = Path(directory)
  npz, js = directory / FEATURE_FILE, directory / META_FILE
  for path in (npz, js):
    if not path.is_file():
      raise FileNotFoundError(f"refusal feature artifact {path} is missing; run the `refusal` "
                              "stage (or save_refusal_feature) first")
  data = read_npz(npz)
  feature, layer = data["feature"], int(data["layer"])
  meta = read_json(js)
  if meta.get("layer") != layer:
    raise ValueError(f"{js} says layer={meta.get('layer')} but {npz} says layer={layer}")
  if meta.get("position") != POSITION_RULE:
    raise ValueError(f"{js}: position={meta.get('position')!r}; expected {POSITION_RULE!r}")
  if feature.ndim != 2 or not 0 <= layer < feature.shape[0]:
    raise ValueError(f"{npz}: feature shape {feature.shape} with layer {layer} is inconsistent")
  return RefusalArtifact(feature=feature, layer=layer, meta=meta)


# ---------------------------------------------------------------------------------------------
# A finished run, as the notebook and analysis read it


@dataclasses.dataclass(frozen=True)
class RunArtifacts:
  """Whatever the run's stages left in `workdir`; a part whose stage has not run is None."""

  workdir: Path
  config: dict[str, Any]  # config.json: the resolved config as plain JSON (refjax.config_json.from_dict)
  auroc: dict[str, Any] | None  # refusal/auroc.json
  cosine_sets: dict[str, np.ndarray] | None  # refusal/cosine_sets.npz: "teacher/harmful" -> [N]
  filter_rows: list[dict[str, Any]] | None  # filter/filter_report.jsonl, one dict per example
  filter_summary: dict[str, Any] | None  # filter/filter_summary.json
  refusal_base: RefusalArtifact | None  # the start model's feature (refusal_base/)
  refusal_teacher: RefusalArtifact | None  # the teacher's (refusal/)
  refusal_updates: list[dict[str, Any]] | None  # teacher/refusal_updates.json
  generalisation: dict[str, Any] | None = None  # refusal/generalisation.json


def load_run(workdir: str | Path) -> RunArtifacts:
  """Reads every artifact the notebook uses; `config.json` is required (every run writes it)."""
  wd = Workdir(workdir)
  if not wd.config_json.is_file():
    raise FileNotFoundError(f"{wd.config_json} is missing: {wd.root} is not a refjax workdir (run "
                            "`python -m refjax.main --workdir=...` first)")
  cos = None
  if wd.cosine_sets.is_file():
    cos = {k: np.asarray(v, np.float64) for k, v in read_npz(wd.cosine_sets).items()}
  return RunArtifacts(
      workdir=wd.root, config=read_json(wd.config_json), auroc=_json_or_none(wd.auroc),
      cosine_sets=cos,
      filter_rows=read_jsonl(wd.filter_report) if wd.filter_report.is_file() else None,
      filter_summary=_json_or_none(wd.filter_summary),
      refusal_base=_feature_or_none(wd.refusal_base), refusal_teacher=_feature_or_none(wd.refusal),
      refusal_updates=_json_or_none(wd.refusal_updates),
      generalisation=_json_or_none(wd.generalisation))


def _json_or_none(path: Path) -> Any:
  return read_json(path) if path.is_file() else None


def _feature_or_none(directory: Path) -> RefusalArtifact | None:
  return load_refusal_feature(directory) if (directory / FEATURE_FILE).is_file() else None
