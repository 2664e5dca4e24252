"""tensorflow-datasets backend: a local `array_record` dataset built from Examples, read back with
`tfds.data_source` (random access, no TensorFlow needed).

Nothing here downloads: a source is built from its local copy the first time it is asked for.
Never `tfds.load` public datasets here; it hangs on network retries offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from refjax.data.records import DataError, DuplicatePolicy, Example, LoadReport, select_examples

ENV_VAR = "REFJAX_TFDS_DIR"


def default_data_dir() -> Path:
  """`$REFJAX_TFDS_DIR`, else tfds' own default `~/tensorflow_datasets`."""
  return Path(os.environ.get(ENV_VAR, "~/tensorflow_datasets")).expanduser()


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
  """Where the built dataset of source `name` lives (one version directory)."""
  from refjax.data import tfds_builder

  base = Path(data_dir) if data_dir is not None else default_data_dir()
  return base / tfds_builder.BUILDER_NAME / name / tfds_builder.VERSION


def is_built(name: str, data_dir: str | Path | None = None) -> bool:
  return (dataset_dir(name, data_dir) / "dataset_info.json").is_file()


def build(name: str, splits: Mapping[str, Sequence[Example]], data_dir: str | Path | None = None,
          *, overwrite: bool = False) -> Path:
  """Writes `splits` (split name -> Examples) as the array_record dataset of source `name`."""
  from refjax.data import tfds_builder

  if not splits:
    raise ValueError(f"no splits given for source {name!r}")
  if not name.isidentifier():
    raise ValueError(f"source name {name!r} cannot name a tfds config; expected an identifier")
  for split, examples in splits.items():
    if not split.isidentifier():
      raise ValueError(f"split {split!r} cannot name a tfds split; expected an identifier")
    if not examples:
      raise ValueError(f"split {split!r} of source {name!r} has no examples to build")
  out = dataset_dir(name, data_dir)
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} already exists; pass overwrite=True to rebuild it")
    shutil.rmtree(out)
  base = Path(data_dir) if data_dir is not None else default_data_dir()
  with tempfile.TemporaryDirectory(prefix="refjax_tfds_") as staging:
    for split, examples in splits.items():
      with open(Path(staging) / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
          f.write(json.dumps(dataclasses.asdict(ex), ensure_ascii=True) + "\n")
    config = tfds_builder.ExamplesConfig(name=name, staging_dir=staging)
    builder = tfds_builder.RefjaxExamples(config=config, data_dir=str(base),
                                          file_format="array_record")
    builder.download_and_prepare()
  return out


def read(name: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
  """Reads a built split back into Examples, in the order they were written."""
  import tensorflow_datasets as tfds

  from refjax.data import tfds_builder

  if not is_built(name, data_dir):
    raise FileNotFoundError(f"no tfds dataset for source {name!r} at {dataset_dir(name, data_dir)}"
                            "; build it first (tfds_backend.build)")
  base = Path(data_dir) if data_dir is not None else default_data_dir()
  sources = tfds.data_source(f"{tfds_builder.BUILDER_NAME}/{name}:{tfds_builder.VERSION}",
                             data_dir=str(base), download=False)
  if split not in sources:
    raise KeyError(f"tfds dataset of source {name!r} has no split {split!r}; splits: "
                   f"{sorted(sources)}")
  source = sources[split]
  return [_to_example(r) for r in source.__getitems__(list(range(len(source))))]


def _to_example(record: Mapping[str, object]) -> Example:
  text = {k: _text(record[k]) for k in ("id", "instruction", "input", "response", "label",
                                        "source", "provenance")}
  if not bool(record["has_label"]):
    text["label"] = None
  return Example(**text)


def _text(value: object) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load(name: str, *, split: str, data_dir: str | Path | None = None, limit: int | None = None,
         duplicates: DuplicatePolicy = "keep",
         build_splits: Callable[[], Mapping[str, Sequence[Example]]] | None = None
         ) -> tuple[list[Example], LoadReport]:
  """The `backend="tfds"` path of `load_source`: builds the dataset from `build_splits()` (the
  source's local copy) when it is missing, then reads `split`."""
  if not is_built(name, data_dir):
    if build_splits is None:
      raise DataError(f"no tfds dataset for source {name!r} at {dataset_dir(name, data_dir)} and "
                      "nothing to build it from")
    build(name, build_splits(), data_dir)
  examples = read(name, split, data_dir)
  location = f"tfds:{dataset_dir(name, data_dir)}[{split}]"
  return select_examples(((f"{location}, row {i}", ex) for i, ex in enumerate(examples)),
                         source=name, location=location, backend="tfds", limit=limit,
                         duplicates=duplicates)
