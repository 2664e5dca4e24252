"""The `Example` record every stage passes around, and the readers that make it from files or rows.

Bad input is reported where it enters: a malformed line or a missing field raises `DataError`
naming the file, the line (or row) and the field. Duplicates are counted, and a policy
(`keep`, `drop`, `error`) decides what happens to them; the counts go into a `LoadReport`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

DuplicatePolicy = Literal["keep", "drop", "error"]
DUPLICATE_POLICIES = ("keep", "drop", "error")
FILE_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt (+ optional input, response, label) with a unique, traceable id."""

  id: str  # "<file or hub split>:<idx>", e.g. "sst2/validation:17"
  instruction: str
  input: str = ""
  response: str = ""
  label: str | None = None  # safety role ("harmful"/"harmless") or a task's gold answer
  source: str = ""  # registry name the example was loaded under
  provenance: str = ""  # mixture tag, "benign" or "harmful"; empty outside a user mixture


class DataError(ValueError):
  """Bad data where it enters: the message names the file (or source), line and field."""


@dataclasses.dataclass(frozen=True)
class Const:
  """A field value that is the same for every row (e.g. the peers' fixed SST-2 instruction)."""

  value: Any


# A field is a record key, a constant, or a function of the row (a KeyError it raises names the
# missing key). Functions are how hub rows are mapped (e.g. SST-2's integer label -> "positive").
FieldValue = str | Const | Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """How one record's keys become `Example` fields."""

  instruction: FieldValue
  input: FieldValue | None = None
  response: FieldValue | None = None
  label: FieldValue | None = None
  # Keys whose values form the id; used when the file's first row has them all, otherwise the
  # 0-based row number is (ag_news/train_hf_first950.jsonl has no `idx`).
  id_keys: tuple[str, ...] = ("idx",)


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What a load read, returned and did with duplicates; counts only, never text."""

  source: str
  backend: str
  location: str  # file(s) or "hub:<id>/<split>"
  rows_scanned: int
  returned: int
  duplicate_prompts: int  # rows whose (instruction, input) appeared in an earlier row
  duplicate_rows: int  # of those, rows also equal in response and label
  duplicates: str  # the policy applied
  dropped: int  # rows dropped by the policy
  limit: int | None = None
  short_by: int = 0  # limit - returned when the source had fewer rows than asked

  def summary(self) -> str:
    text = (f"{self.source} [{self.backend}] {self.returned} examples from {self.location} "
            f"({self.rows_scanned} rows scanned; {self.duplicate_prompts} duplicate prompts, "
            f"{self.duplicate_rows} duplicate rows, policy={self.duplicates}, "
            f"dropped {self.dropped})")
    if self.short_by:
      text += f"; limit={self.limit} asked, short by {self.short_by}"
    return text


# ----------------------------------------------------------------------------------------------
# Raw readers: (where, record) pairs, `where` being "file, line N" or "file, row N".


def iter_file_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (location, record) from a jsonl/json/csv/tsv/parquet file; malformed input raises."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such file")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    yield from _iter_jsonl(path)
  elif suffix in (".json", ".csv", ".tsv"):
    try:
      if suffix == ".json":
        yield from _iter_json(path)
      else:
        yield from _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 (byte {e.start} of the file); expected UTF-8 text") \
        from None
  elif suffix == ".parquet":
    yield from _iter_parquet(path)
  else:
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {FILE_FORMATS}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
  # Split on "\n" only (not str.splitlines): the files escape U+2028 and friends, and a raw one
  # inside a string must not end the line. Read as bytes so bad UTF-8 is reported by line.
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}, line {lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {e.start} of the line is "
                        f"{raw[e.start:e.start + 1]!r}); expected UTF-8 text") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
      yield where, record


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") \
        from None
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
  for i, record in enumerate(data):
    where = f"{path}, record {i}"
    if not isinstance(record, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    yield where, record


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    for record in reader:
      where = f"{path}, line {reader.line_num}"
      if None in record:  # more cells than header columns
        raise DataError(f"{where}: {len(record) - 1 + len(record[None])} cells for "
                        f"{len(reader.fieldnames or [])} header columns")
      yield where, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
  import pyarrow.parquet as pq  # a dependency of `datasets`

  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file
    raise DataError(f"{path}: unreadable parquet file ({e})") from None
  for i, record in enumerate(table.to_pylist()):
    yield f"{path}, row {i}", record


# ----------------------------------------------------------------------------------------------
# Records -> Examples


def _field_value(record: Mapping[str, Any], spec: FieldValue, where: str, field: str) -> Any:
  if isinstance(spec, Const):
    return spec.value
  if isinstance(spec, str):
    if spec not in record:
      raise DataError(f"{where}: missing field {spec!r} (for {field}; row has "
                      f"{sorted(record)})")
    return record[spec]
  try:
    return spec(record)
  except KeyError as e:
    raise DataError(f"{where}: missing field {e.args[0]!r} (for {field}; row has "
                    f"{sorted(record)})") from None
  except (TypeError, ValueError) as e:
    raise DataError(f"{where}: cannot compute {field} from the row ({e})") from None


def _spec_name(spec: FieldValue) -> str:
  """A short name for a field spec, for messages."""
  if isinstance(spec, Const):
    return f"const {spec.value!r}"
  if isinstance(spec, str):
    return spec
  return getattr(spec, "__name__", "computed")


def record_to_example(record: Mapping[str, Any], fields: FieldMap, *, where: str, example_id: str,
                      source: str) -> Example:
  """Maps one record through `fields`; a missing or mistyped field raises naming `where`."""
  values: dict[str, Any] = {}
  for name in ("instruction", "input", "response", "label"):
    spec = getattr(fields, name)
    if spec is None:
      continue
    value = _field_value(record, spec, where, name)
    if name == "label":
      if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
        raise DataError(f"{where}: field {_spec_name(spec)!r} (label) is "
                        f"{type(value).__name__}; expected a string, an integer or null")
      values[name] = None if value is None else str(value)
      continue
    if not isinstance(value, str):
      raise DataError(f"{where}: field {_spec_name(spec)!r} ({name}) is {type(value).__name__}; "
                      "expected a string")
    values[name] = value
  if not values["instruction"].strip():
    raise DataError(f"{where}: field {_spec_name(fields.instruction)!r} (instruction) is empty")
  return Example(id=example_id, source=source, **values)


def iter_examples(records: Iterable[tuple[str, Mapping[str, Any]]], fields: FieldMap, *,
                  id_prefix: str, source: str) -> Iterator[tuple[str, Example]]:
  """Lazily maps (where, record) pairs to (where, Example); ids must be unique."""
  seen_ids: dict[str, str] = {}
  use_id_keys: bool | None = None
  for row, (where, record) in enumerate(records):
    if use_id_keys is None:  # decided once, from the first row
      use_id_keys = bool(fields.id_keys) and all(k in record for k in fields.id_keys)
    if use_id_keys:
      missing = [k for k in fields.id_keys if k not in record]
      if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (the id; the first row has it)")
      key = "/".join(str(record[k]) for k in fields.id_keys)
    else:
      key = str(row)
    example_id = f"{id_prefix}:{key}"
    if example_id in seen_ids:
      raise DataError(f"{where}: id {example_id!r} repeats the one at {seen_ids[example_id]}")
    seen_ids[example_id] = where
    yield where, record_to_example(record, fields, where=where, example_id=example_id,
                                   source=source)


def select_examples(examples: Iterable[tuple[str, Example]], *, source: str, location: str,
                    backend: str, limit: int | None = None,
                    duplicates: DuplicatePolicy = "keep") -> tuple[list[Example], LoadReport]:
  """Keeps examples in order, applying the duplicate policy, until `limit` are kept.

  A duplicate is a row whose (instruction, input) appeared earlier; it is counted, then kept,
  dropped (the first occurrence stays) or raised, as `duplicates` says. Counts cover the rows
  scanned, which stop once `limit` examples are kept.
  """
  if duplicates not in DUPLICATE_POLICIES:
    raise ValueError(f"duplicates={duplicates!r}; expected one of {DUPLICATE_POLICIES}")
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
    raise ValueError(f"limit={limit!r}; expected a non-negative integer or None")
  kept: list[Example] = []
  seen_prompts: set[tuple[str, str]] = set()
  seen_rows: set[tuple[str, str, str, str | None]] = set()
  scanned = dup_prompts = dup_rows = dropped = 0
  iterator = iter(examples)
  while limit is None or len(kept) < limit:
    try:
      where, ex = next(iterator)
    except StopIteration:
      break
    scanned += 1
    prompt_key, row_key = (ex.instruction, ex.input), (ex.instruction, ex.input, ex.response,
                                                       ex.label)
    is_dup = prompt_key in seen_prompts
    if is_dup:
      dup_prompts += 1
      dup_rows += row_key in seen_rows
      if duplicates == "error":
        raise DataError(f"{where}: duplicate prompt (instruction + input) in source {source!r} "
                        f"(id {ex.id}); pass duplicates='keep' or 'drop'")
    seen_prompts.add(prompt_key)
    seen_rows.add(row_key)
    if is_dup and duplicates == "drop":
      dropped += 1
      continue
    kept.append(ex)
  short_by = max(0, limit - len(kept)) if limit is not None else 0
  report = LoadReport(source=source, backend=backend, location=location, rows_scanned=scanned,
                      returned=len(kept), duplicate_prompts=dup_prompts, duplicate_rows=dup_rows,
                      duplicates=duplicates, dropped=dropped, limit=limit, short_by=short_by)
  return kept, report


def read_examples(path: str | Path, fields: FieldMap, *, source: str,
                  id_prefix: str | None = None, limit: int | None = None,
                  duplicates: DuplicatePolicy = "keep", base_dir: Path | None = None
                  ) -> tuple[list[Example], LoadReport]:
  """Reads one file into Examples with a `LoadReport`.

  Ids are "<path relative to base_dir, without suffix>:<idx or row>" (e.g. "sst2/validation:17"),
  or "<id_prefix>:<idx or row>" when `id_prefix` is given.
  """
  path = Path(path)
  prefix = id_prefix or _file_id_prefix(path, base_dir)
  return select_examples(iter_examples(iter_file_records(path), fields, id_prefix=prefix,
                                       source=source),
                         source=source, location=str(path), backend="local", limit=limit,
                         duplicates=duplicates)


def _file_id_prefix(path: Path, base_dir: Path | None) -> str:
  """The id prefix of a file: its path under `base_dir` without the suffix. Symbolic links are not
  followed, so an id stays the same when a data file is a link to somewhere else."""
  if base_dir is not None:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))
    if not rel.startswith(".."):
      return Path(rel).with_suffix("").as_posix()
  return path.with_suffix("").name
