"""What a unit of work cost: wall time and peak memory (resident set on the host; device memory
where the backend reports it), recorded in its marker and tabled in the report."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import jax

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _hwm_kib() -> int | None:
  """The process's peak resident set since the last reset (Linux VmHWM), KiB."""
  try:
    for line in _STATUS.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  except OSError:
    return None
  return None


def _reset_hwm() -> bool:
  """Resets VmHWM to the current RSS (Linux: "5" > clear_refs); False where it cannot."""
  try:
    _CLEAR.write_text("5")
    return True
  except OSError:
    return False


def _device_peak() -> int | None:
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


@contextlib.contextmanager
def metered() -> Iterator[dict]:
  """Yields a dict filled on exit with seconds, peak_rss_gib (None where unmeasurable) and
  device_peak_gib (None on CPU)."""
  out: dict = {}
  reset = _reset_hwm()
  t0 = time.perf_counter()
  try:
    yield out
  finally:
    hwm = _hwm_kib() if reset else None
    dev = _device_peak()
    out.update(seconds=round(time.perf_counter() - t0, 2),
               peak_rss_gib=None if hwm is None else round(hwm / 2**20, 3),
               device_peak_gib=None if dev is None else round(dev / 2**30, 3))
