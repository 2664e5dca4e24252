"""The one home of file I/O: atomic JSON/JSONL/NPZ/text writes, an atomic directory, and reads that
name the file when it is missing or corrupt.

A write goes to a temp file beside the target and is renamed over it, so a reader (or a run
killed mid-write) never sees half a file. Reports, artifacts, markers and caches all go through
here; nothing else in the package opens a file for writing JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


class CorruptFile(ValueError):
  """A file that exists but cannot be parsed; the message names it and what was wrong."""


def jsonable(obj: Any) -> Any:
  """Plain JSON values: mappings (ConfigDict too) become dicts, numpy/jax scalars and arrays numbers
  and lists, NaN/inf None."""
  if isinstance(obj, dict) or (hasattr(obj, "items") and hasattr(obj, "keys")):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, Path):
    return str(obj)
  if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array__"):
    return jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[Any]:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> Path:
  with _atomic_file(Path(path), "w") as f:
    f.write(text)
  return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  with _atomic_file(Path(path), "wb") as f:
    f.write(data)
  return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
  """Pretty JSON (NaN/inf as null), written atomically."""
  return write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=sort_keys,
                                     ensure_ascii=True) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
  """One JSON object per line (ASCII-escaped, so no raw U+2028 splits a line), atomically."""
  with _atomic_file(Path(path), "w") as f:
    for row in rows:
      f.write(json.dumps(jsonable(row), ensure_ascii=True) + "\n")
  return Path(path)


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
  with _atomic_file(Path(path), "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  return Path(path)


def read_json(path: str | os.PathLike) -> Any:
  """The parsed file; a missing file raises FileNotFoundError, a corrupt one CorruptFile (both
  naming the path)."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist") from None
  except UnicodeDecodeError as e:
    raise CorruptFile(f"{path}: not UTF-8 text (byte {e.start})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise CorruptFile(f"{path}: corrupt JSON at line {e.lineno}, column {e.colno} ({e.msg})") \
      from None


def read_jsonl(path: str | os.PathLike, *, torn_tail_ok: bool = False) -> list[Any]:
  """Every line's object; a bad line raises CorruptFile naming the file and the line. With
  `torn_tail_ok`, an unterminated last line (an append cut short by a kill) is dropped instead."""
  path = Path(path)
  rows = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          if torn_tail_ok and not line.endswith("\n"):
            break
          raise CorruptFile(f"{path}, line {lineno}: corrupt JSON ({e.msg})") from None
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist") from None
  except UnicodeDecodeError as e:
    raise CorruptFile(f"{path}: not UTF-8 text (byte {e.start})") from None
  return rows


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist")
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile/numpy raise several types on a truncated file
    raise CorruptFile(f"{path}: corrupt NPZ ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields an empty temp dir beside `target`; renames it to `target` only if the block succeeds.

  On any error the temp dir is removed, so no half-written `target` is ever visible.
  """
  target = Path(target).expanduser().absolute()
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the final dir should read like any other
  try:
    yield tmp
    old = None
    if target.exists():  # move the old one aside first: rename cannot replace a non-empty dir
      old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
      os.replace(target, old / "dir")
    os.replace(tmp, target)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


__all__ = ["CorruptFile", "jsonable", "write_text", "write_bytes", "write_json", "write_jsonl", "write_npz",
           "read_json", "read_jsonl", "read_npz", "atomic_dir"]
