"""The `arg` mini-language of config files: `--config=configs/llama.py:task=gsm8k,size=13b`.

`get_config(arg)` receives the text after the colon and calls `parse_arg` (big_vision's pattern).
A bare word (`quick`) means `quick=True`. With `defaults`, unknown keys are an error naming the
allowed ones and each value is converted to its default's type; with `choices`, a value outside
them is an error.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_arg(arg: str | None, defaults: Mapping[str, Any] | None = None,
              choices: Mapping[str, Sequence[Any]] | None = None, *,
              where: str = "config") -> dict[str, Any]:
  """`"k=v,k2=v2,flag"` -> {k: v, k2: v2, flag: True}, merged over `defaults`.

  Raises ValueError naming `where`, the bad key or value, and what was expected.
  """
  out: dict[str, Any] = dict(defaults or {})
  seen: set[str] = set()
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    key, value = key.strip(), value.strip()
    if not key:
      raise ValueError(f"{where}: empty key in arg {arg!r}; expected key=value,key2=value2")
    if key in seen:
      raise ValueError(f"{where}: {key!r} given twice in arg {arg!r}")
    seen.add(key)
    if defaults is not None and key not in defaults:
      raise ValueError(f"{where}: unknown variant key {key!r} in arg {arg!r}; expected some of "
                       f"{sorted(defaults)}")
    default = None if defaults is None else defaults[key]
    out[key] = _convert(key, value if eq else None, default, where)
  for key, allowed in (choices or {}).items():
    if out.get(key) not in allowed:
      raise ValueError(f"{where}: {key}={out.get(key)!r}; expected one of {list(allowed)}")
  return out


def _convert(key: str, value: str | None, default: Any, where: str) -> Any:
  """The text of one value as the type of its default (a bare key is True)."""
  if value is None:
    if default is None or isinstance(default, bool):
      return True
    raise ValueError(f"{where}: {key!r} needs a value ({key}=...)")
  if isinstance(default, bool):
    if value.lower() in _TRUE:
      return True
    if value.lower() in _FALSE:
      return False
    raise ValueError(f"{where}: {key}={value!r}; expected true or false")
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ValueError(f"{where}: {key}={value!r}; expected a {type(default).__name__}") from None
  return value
