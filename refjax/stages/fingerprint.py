"""Stage fingerprints: a digest of everything a stage reads (the config fields it uses, the content
of its input data and models, its upstream stages' fingerprints), so a rerun reuses an artifact
only when it would be made again from the same inputs.

Data and models are hashed by content (the examples a stage reads, the model's files), never by
path or id: a changed row under the same id, or the same file behind a new symlink, is seen as
what it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from refjax.data import paths
from refjax.data.filter_sources import FILTER_SOURCES
from refjax.data.judge_pairs import SOURCE_FILES
from refjax.data.sources import load_source
from refjax.files import CorruptFile, jsonable, read_json
from refjax.models import hub, shipped

log = logging.getLogger(__name__)

# Config fields that never change a stage's result (progress and bookkeeping): left out of every
# fingerprint, so changing them reruns nothing.
NEUTRAL_TRAIN_KEYS = ("log_every", "progress_bar", "checkpoint_every", "max_to_keep",
                      "async_checkpoint", "keep_checkpoints")
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json")


def digest(obj: Any) -> str:
  """sha256 of the canonical JSON of `obj` (sorted keys, NaN as null)."""
  text = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def examples_digest(examples: Iterable[Any]) -> str:
  """sha256 over every example's id and text fields, in order."""
  h = hashlib.sha256()
  for e in examples:
    for value in (e.id, e.instruction, e.input, e.response, e.label or "", e.provenance or ""):
      h.update(str(value).encode("utf-8"))
      h.update(b"\0")
    h.update(b"\1")
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # cache keys: a rewritten file is hashed again
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
  st = os.stat(path)
  return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def model_digest(name: str | os.PathLike | None) -> str:
  """Content digest of a model: a shipped model's pinned GGUF sha256, the random test model's
  name, or the sha256 of a directory's config and weight files (or of a .gguf file)."""
  name = str(name)
  if hub.is_tiny(name):
    return f"tiny:{name}"
  if name in shipped.REGISTRY:
    return f"sha256:{shipped.REGISTRY[name].sha256}"
  path = Path(name).expanduser()
  if not path.exists():
    return f"name:{name}"  # a hub id: its snapshot is fetched (and hashed) when it is loaded
  if path.is_file():
    return file_digest(path)
  files = sorted(p for p in path.iterdir()
                 if p.name in _WEIGHT_FILES or p.suffix in (".safetensors", ".gguf"))
  return digest({p.name: file_digest(p) for p in files})


# Where a result is kept, not what it is: moving the judge cache reruns nothing.
NEUTRAL_FIELDS = ("judge.cache",)


def config_part(cfg: Any, keys: Sequence[str]) -> dict[str, Any]:
  """The named config fields/sections (dotted keys) as plain JSON, neutral training keys left out."""
  out = {}
  for key in keys:
    value = cfg
    for part in key.split("."):
      value = value[part]
    value = jsonable(value)
    if isinstance(value, dict):
      value = {k: v for k, v in _drop_neutral(value).items()
               if f"{key}.{k}" not in NEUTRAL_FIELDS}
    out[key] = value
  return out


def _drop_neutral(d: dict) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      v = _drop_neutral(v)
      if k == "train":
        v = {kk: vv for kk, vv in v.items() if kk not in NEUTRAL_TRAIN_KEYS}
    out[k] = v
  return out


def changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
  """Dotted names of the inputs that differ between two recorded input dicts."""
  if old is None:
    return ["(no record)"]
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{key}.{k}" for k in changed(a, b)]
    elif a != b:
      out.append(key)
  return out


class Digests:
  """Content digests of one run's inputs, each computed once: models, the run's example sets,
  named sources."""

  def __init__(self, cfg: Any, sets: Any):
    self.cfg, self.sets = cfg, sets
    self._cache: dict[tuple, str] = {}

  def _memo(self, key: tuple, fn) -> str:
    if key not in self._cache:
      self._cache[key] = fn()
    return self._cache[key]

  def model(self, name: str | os.PathLike | None) -> str:
    return self._memo(("model", str(name)), lambda: model_digest(name))

  def examples(self, kind: str, n: int | None = None) -> str:
    """One of the run's sets (`refjax.data.sets.ExampleSets`): alignment, probe, validation, ood,
    calibration, user, or task_test (its first n)."""
    get = (lambda: self.sets.task_test(n)) if kind == "task_test" else getattr(self.sets, kind)
    return self._memo(("examples", kind, n), lambda: examples_digest(get()))

  def source(self, name: str, n: int | None = None) -> str:
    return self._memo(("source", name, n), lambda: examples_digest(load_source(name, limit=n)))

  def judge(self) -> str:
    """The HS judge config.eval names (the trained `qa_probe` judge is an upstream stage)."""
    ec = self.cfg.eval
    return self._memo(("judge",), lambda: digest(
        {"judge": ec.judge, "model": self.model(ec.judge_model) if ec.judge_model else ""}))

  def filter_sources(self) -> str:
    """Content digest of every file of the filter protocol's source table (its pools)."""
    return self._memo(("filter_sources",), lambda: digest(
        {s.file: file_digest(paths.data_dir() / s.file) for s in FILTER_SOURCES.values()
         if s.use != "never"}))

  def judge_data(self) -> str:
    """Content digest of every data file the QA judge's pairs are built from."""
    return self._memo(("judge_data",), lambda: digest(
        {rel: file_digest(paths.data_dir() / rel) for rel in SOURCE_FILES}))


Unit = tuple[str, str | None]  # (stage, method or None)


def key(unit: Unit) -> str:
  """A unit's name in logs and records: `stage` or `stage[method]`."""
  stage, method = unit
  return stage if method is None else f"{stage}[{method}]"


class Plan:
  """The fingerprint of every unit of a stage table and which units are valid or forced.

  `stages`: {name: stage} with `config`, `data(run, method)`, `upstream(cfg, method)` and
  `methods(cfg)` (`refjax.stages.pipeline.Stage`). `run` has `cfg` and `wd` (a Workdir).
  """

  def __init__(self, r: Any, stages: Mapping[str, Any], force: set[str]):
    self.r, self.stages, self.force = r, stages, force
    self._fp: dict[Unit, tuple[str, dict]] = {}

  def units(self, stage: str) -> list[Unit]:
    return [(stage, m) for m in self.stages[stage].methods(self.r.cfg)]

  def fingerprint(self, unit: Unit) -> tuple[str, dict]:
    """(fingerprint, the inputs it digests) of one unit; upstream units first."""
    if unit not in self._fp:
      stage = self.stages[unit[0]]
      inputs = {"config": config_part(self.r.cfg, stage.config),
                "data": stage.data(self.r, unit[1]),
                "upstream": {key(u): self.fingerprint(u)[0]
                             for u in stage.upstream(self.r.cfg, unit[1])}}
      self._fp[unit] = (digest(inputs), inputs)
    return self._fp[unit]

  def forced(self, unit: Unit) -> bool:
    """Forced itself, or downstream of a forced unit."""
    if unit[0] in self.force:
      return True
    return any(self.forced(u) for u in self.stages[unit[0]].upstream(self.r.cfg, unit[1]))

  def marker(self, unit: Unit) -> dict | None:
    path = self.r.wd.marker(*unit)
    if not path.exists():
      return None
    try:
      return read_json(path)
    except CorruptFile as e:
      log.warning("%s; treating %s as not done", e, key(unit))
      return None

  def valid(self, unit: Unit) -> bool:
    m = self.marker(unit)
    return (m is not None and m.get("fingerprint") == self.fingerprint(unit)[0]
            and not self.forced(unit) and self.outputs_ok(unit))

  def outputs_ok(self, unit: Unit) -> bool:
    """The unit's recorded outputs are on disk and its JSON files parse (a torn or deleted
    artifact makes the unit not done)."""
    for path in self.stages[unit[0]].artifacts(self.r.wd, unit[1]):
      if not path.exists():
        log.warning("%s is missing; treating %s as not done", path, key(unit))
        return False
      if path.suffix == ".json":
        try:
          read_json(path)
        except CorruptFile as e:
          log.warning("%s; treating %s as not done", e, key(unit))
          return False
    return True

  def why(self, unit: Unit) -> str:
    if self.forced(unit):
      return "forced (--force)"
    old = self.marker(unit) or read_or_none(self.r.wd.running(*unit))
    what = changed((old or {}).get("inputs"), self.fingerprint(unit)[1])
    if not what:
      return "its artifacts are missing or torn"
    return "inputs changed: " + ", ".join(what[:8]) + (" ..." if len(what) > 8 else "")


def read_or_none(path: Path) -> dict | None:
  try:
    return read_json(path) if path.exists() else None
  except CorruptFile:
    return None
