"""Process-level settings that must be in place before XLA starts: glibc malloc tunables.

XLA:CPU allocates each step's temporaries (3.2 GB for a SmolLM2-135M train step at 8x128) as
one block, which glibc serves with a fresh `mmap` and returns with `munmap`: every step then
page-faults all of it again (about 2.5 s of a 9 s step on 2 cores). Keeping large blocks in
the one main heap, never trimmed, lets the next step reuse the same pages. glibc reads these
tunables only at process start, so the benchmarks (and the main job, with REFJAX_MALLOC_TUNING=1)
re-exec themselves once with them set.
"""

from __future__ import annotations

import os
import platform
import sys

# arena_max=1: worker threads allocate from the main heap (a thread arena cannot hold a
# multi-GB block, so glibc would mmap it); mmap_max=0: never mmap; trim_threshold: never give
# the heap's top back to the kernel between steps.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736")
OPT_OUT = "REFJAX_NO_MALLOC_TUNING"
# The main job tunes only when asked: a never-trimmed heap keeps every stage's freed temporaries,
# and one process runs all stages (default smollm run: 23.3 GB RSS in `finetune`, OOM-killed on a
# 24 GiB machine; the finetune stage alone peaks at 15.6 GB tuned vs 8.9 GB untuned).
OPT_IN_MAIN = "REFJAX_MALLOC_TUNING"


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


__all__ = ["MALLOC_TUNABLES", "OPT_OUT", "OPT_IN_MAIN", "malloc_tuning_applies",
           "reexec_with_malloc_tuning"]
