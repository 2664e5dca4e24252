"""The malloc re-exec: applies on glibc unless the user set GLIBC_TUNABLES or opted out, re-runs
the same command once with the tunables, and the re-run proceeds."""

import os
import platform
import subprocess
import sys

import pytest

from refjax import runtime

SCRIPT = ("import os, sys; from refjax.runtime import reexec_with_malloc_tuning; "
          "print('start', flush=True); reexec_with_malloc_tuning(); "
          "print('tunables', os.environ.get('GLIBC_TUNABLES', '-'), sys.argv[1:])")


def _run(env_extra, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.splitlines()


def test_applies_only_without_user_tunables_or_opt_out():
  on_glibc = platform.libc_ver()[0] == "glibc"
  assert runtime.malloc_tuning_applies({}) is on_glibc
  assert not runtime.malloc_tuning_applies({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert not runtime.malloc_tuning_applies({runtime.OPT_OUT: "1"})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables only")
def test_reexec_runs_the_same_command_once_with_the_tunables():
  lines = _run({}, "--flag=x")
  # 'start' twice: the original process, then the re-executed one, which does not re-exec again.
  assert lines == ["start", "start", f"tunables {runtime.MALLOC_TUNABLES} ['--flag=x']"]


def test_user_tunables_and_opt_out_are_left_alone():
  assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[-1].startswith(
      "tunables glibc.malloc.arena_max=2")
  assert _run({runtime.OPT_OUT: "1"}) == ["start", "tunables - []"]


RELEASE = ("import numpy as np; from refjax.runtime import release_free_memory\n"
           "def rss():\n"
           "  return next(int(l.split()[1]) for l in open('/proc/self/status')\n"
           "              if l.startswith('VmRSS:')) // 1024\n"
           "a = np.ones(2**27); before = rss(); del a; freed = rss()\n"
           "print(before, freed, release_free_memory(), rss())")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc_trim only")
def test_release_free_memory_returns_a_never_trimmed_heap_to_the_kernel():
  """Under the tunables a freed 1 GiB block stays resident (that is the point: the next step
  reuses it); release_free_memory, run between units of work, gives it back."""
  env = {k: v for k, v in os.environ.items() if k != runtime.OPT_OUT}
  env["GLIBC_TUNABLES"] = runtime.MALLOC_TUNABLES
  out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  before, freed, released, after = int(out[0]), int(out[1]), out[2], int(out[3])
  assert released == "True"
  assert freed > before - 100, (before, freed)  # the free left the 1 GiB resident
  assert after < freed - 900, (freed, after)  # the trim returned it
