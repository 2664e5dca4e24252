"""Where the shared data lives: `config.data.root`, else `$REFJAX_DATA`, else
`<checkout>/../shared/data`.

The data is read in place, never copied into the repository; every loader asks here for its
location. The pipeline hands `config.data.root` over with `set_data_root` before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "REFJAX_DATA"
CONFIG_KEY = "config.data.root"
_configured: Path | None = None  # set_data_root(config.data.root); None = env var or default


def repo_root() -> Path:
  """The checkout this package was imported from (`refjax/data/paths.py` -> two levels up)."""
  return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
  """`<checkout>/../shared/data`: the layout of a clone with the shared folder beside it."""
  return repo_root().parent / "shared" / "data"


def set_data_root(root: str | os.PathLike | None) -> None:
  """Makes `root` (config.data.root) the data folder for this process; "" or None = unset."""
  global _configured
  _configured = Path(root).expanduser() if root else None


def data_dir() -> Path:
  """The data folder (the jsonl files of shared/ASSETS.md); raises naming both settings if the
  folder it resolves to is missing."""
  if _configured is not None:
    path, origin = _configured, f"{CONFIG_KEY}={str(_configured)!r}"
  elif os.environ.get(ENV_VAR):
    path, origin = Path(os.environ[ENV_VAR]).expanduser(), f"${ENV_VAR}={os.environ[ENV_VAR]!r}"
  else:
    path, origin = default_data_dir(), "the default <checkout>/../shared/data"
  if not path.is_dir():
    raise FileNotFoundError(
        f"shared data folder {path} does not exist (from {origin}); point {CONFIG_KEY} "
        f"(--{CONFIG_KEY}=DIR) or ${ENV_VAR} at the folder holding the data files "
        "(sst2/, beavertails_refusals_spard/, ...)")
  return path.resolve()
