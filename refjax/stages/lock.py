"""One writer per workdir: an exclusive `flock` on `<workdir>/.lock`, holding the owner's PID and
host, taken before anything is written and released when the run ends (or its process dies)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir; the message names its PID and host."""


@contextlib.contextmanager
def workdir_lock(root: str | os.PathLike) -> Iterator[Path]:
  """Holds the workdir's lock for the block; raises WorkdirBusy at once if another run has it."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  path = root / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
      raise WorkdirBusy(f"workdir {root} is in use by {holder} (lock {path}); wait for that run "
                        "to end, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # closing releases the lock
