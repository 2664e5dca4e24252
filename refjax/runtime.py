"""Process-level settings that must be in place before XLA starts: glibc malloc tunables.

XLA:CPU allocates each step's temporaries (3.2 GB for a SmolLM2-135M train step at 8x128) as
one block, which glibc serves with a fresh `mmap` and returns with `munmap`: every step then
page-faults all of it again (about 2.5 s of a 9 s step on 2 cores). Keeping large blocks in
the one main heap, never trimmed, lets the next step reuse the same pages. That alone held only
when the process was started from a shell: re-executed by Python (as the entry points do) the heap
still grew by a fresh 3.7 GB block on some steps, 0.9 M page faults a step; with the heap backed
by transparent huge pages (`hugetlb=1`) no step faults either way (`benchmarks/train_step.py`
prints faults per step: a LoRA step at 6x256, 11.1 s against 14.8 s). glibc reads these
tunables only at process start, so the main job and the benchmarks re-exec themselves once with
them set (REFJAX_NO_MALLOC_TUNING=1 opts out). A never-trimmed heap would keep every stage's freed
temporaries, and one process runs all stages (an earlier default run reached 23.3 GB and was
OOM-killed on a 24 GiB machine), so the pipeline gives the heap's free pages back between its
units of work (`release_free_memory`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# arena_max=1: worker threads allocate from the main heap (a thread arena cannot hold a
# multi-GB block, so glibc would mmap it); mmap_max=0: never mmap; trim_threshold: never give
# the heap's top back to the kernel between steps; hugetlb=1: the heap is madvised for
# transparent huge pages (glibc >= 2.35; older ones ignore the name).
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1")
OPT_OUT = "REFJAX_NO_MALLOC_TUNING"


def malloc_tuning_applies(env=None) -> bool:
  """True on glibc when neither the user's own GLIBC_TUNABLES nor the opt-out is set."""
  env = os.environ if env is None else env
  return (platform.libc_ver()[0] == "glibc" and "GLIBC_TUNABLES" not in env
          and not env.get(OPT_OUT))


def reexec_with_malloc_tuning() -> None:
  """Re-runs this same command with MALLOC_TUNABLES set (once; keeps the PID and arguments).

  Call first thing in an entry point, before any JAX computation. A no-op when the tunables do
  not apply (see `malloc_tuning_applies`), so the re-executed process continues normally.
  """
  if not malloc_tuning_applies():
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_free_memory() -> bool:
  """Gives the heap's free pages back to the kernel (glibc `malloc_trim(0)`): between a run's
  units of work, so a never-trimmed heap holds one unit's temporaries, not every unit's. False
  where there is no glibc."""
  if platform.libc_ver()[0] != "glibc":
    return False
  ctypes.CDLL(None).malloc_trim(0)
  return True


__all__ = ["MALLOC_TUNABLES", "OPT_OUT", "malloc_tuning_applies",
           "reexec_with_malloc_tuning", "release_free_memory"]
