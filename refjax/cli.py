"""What every refjax command shares: its logging, how user errors are told (one line naming the
file, line, key or path; REFJAX_TRACEBACK=1 shows the traceback) and absl flag parsing with a bad
--config file or --config.KEY explained."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from refjax import config as config_lib
from refjax.data.records import DataError
from refjax.files import CorruptFile
from refjax.models.shipped import FetchError
from refjax.stages.lock import WorkdirBusy
from refjax.training.loop import NonFiniteLoss


def setup_logging() -> None:
  """refjax's own progress at INFO; the libraries' chatter (Orbax logs every file) at WARNING."""
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("refjax").setLevel(logging.INFO)
  logging.getLogger("jax").setLevel(logging.WARNING)


# Errors that are the user's input or the run's state, each with a message naming the file, line,
# key or path: printed as one line, no traceback (REFJAX_TRACEBACK=1 shows it).
USER_ERRORS = (config_lib.ConfigError, DataError, CorruptFile, FileNotFoundError, FetchError,
               WorkdirBusy, NonFiniteLoss, ValueError, KeyError)


def fail(message: str, code: int = 2):
  print(f"refjax: error: {message}", file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def user_errors():
  """A user error inside becomes one line on stderr and exit status 1."""
  try:
    yield
  except USER_ERRORS as e:
    if os.environ.get("REFJAX_TRACEBACK"):
      raise
    fail(e.args[0] if isinstance(e, KeyError) and e.args else str(e), code=1)


def parse_flags(flag_values: Any, argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file or --config.KEY told in one line (the file
  that is missing; the full dotted key and the nearest valid one)."""
  try:
    rest = flag_values(argv)
    flag_values.config.get("method")  # the config file loads lazily: surface its errors here
    return rest
  except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many types here
    if os.environ.get("REFJAX_TRACEBACK"):
      raise
    fail(explain_flag_error(argv, e))


def explain_flag_error(argv: Sequence[str], error: Exception) -> str:
  spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)
  spec = spec if spec is not None else "configs/smollm.py"
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    return f"--config: config file {path} does not exist (relative to {os.getcwd()})"
  try:
    module_spec = importlib.util.spec_from_file_location("refjax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
  except Exception as e:  # noqa: BLE001 - the config file's own error, told as such
    return f"--config={spec}: {type(e).__name__}: {e}"
  keys = set(config_lib.dotted_keys(cfg))
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      key = a[len("--config."):].split("=", 1)[0]
      if key not in keys and not any(k.startswith(key + ".") for k in keys):
        near = config_lib.nearest_key(cfg, key)
        hint = f"; did you mean config.{near}?" if near else ""
        return f"--config.{key}: config.{key} is not a field of {path}{hint}"
  return f"{type(error).__name__}: {error}"


__all__ = ["setup_logging", "USER_ERRORS", "fail", "user_errors", "parse_flags",
           "explain_flag_error"]
