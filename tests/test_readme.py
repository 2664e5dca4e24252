"""The README's set-up commands are exactly what CI runs (`.ci/run`), character for character."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)]


def test_ci_runs_the_readme_commands_verbatim():
  commands = _readme_commands()
  assert len(commands) == 3, commands  # main job, its smoke run, the tests
  ci = (ROOT / ".ci" / "run").read_text()
  main, quick, tests = commands
  assert "--config=configs/smollm.py " in main and ":quick" in quick
  assert tests in ci.splitlines()  # the test command is a line of its own
  assert f"bash -c '{quick}'" in ci  # the smoke run, in the fresh venv's clean environment
  assert "pip install -e . &&" in quick and "[test]" not in quick  # no extras: no torch
