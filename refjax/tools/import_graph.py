"""The package's import graph, read from the source (imports at any depth, lazy ones too): prints
each module's refjax imports and every cycle; exits 1 when there is a cycle or a production module
imports test code.

  python -m refjax.tools.import_graph [--quiet]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "refjax"
ROOT = Path(__file__).resolve().parents[1]  # refjax/


def module_name(path: Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def modules() -> dict[str, Path]:
  """{dotted name: file} of every module of the package."""
  return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
  """The package module an imported name refers to (`a.b.c` -> `a.b` when c is an attribute)."""
  while name:
    if name in known:
      return name
    name = name.rpartition(".")[0]
  return None


def imports(path: Path, known: set[str]) -> dict[str, list[int]]:
  """{imported package module: [line, ...]} for one file, every import statement included."""
  tree = ast.parse(path.read_text(), str(path))
  out: dict[str, list[int]] = {}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    for n in names:
      if n.split(".")[0] in (PACKAGE, "tests", "conftest", "refusal_fixtures"):
        target = _resolve(n, known) or n
        out.setdefault(target, []).append(node.lineno)
  return out


def graph() -> dict[str, dict[str, list[int]]]:
  mods = modules()
  known = set(mods)
  g = {}
  for name, path in mods.items():
    edges = imports(path, known)
    # a submodule import also runs its package's __init__, which is a face with no imports
    g[name] = {t: lines for t, lines in edges.items() if t != name and not name.startswith(t + ".")}
  return g


def cycles(g: dict[str, dict[str, list[int]]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in g.get(v, {}):
      if w not in g:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in g:
    if v not in index:
      visit(v)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quiet", action="store_true", help="print only problems")
  args = p.parse_args(argv)
  g = graph()
  if not args.quiet:
    for name, edges in g.items():
      print(f"{name} -> {', '.join(sorted(edges)) or '-'}")
  problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(g)]
  for name, edges in g.items():
    for target, lines in edges.items():
      if not target.startswith(PACKAGE):
        problems.append(f"{name} imports test code {target} (line {lines[0]})")
  for line in problems:
    print(line)
  print(f"{len(g)} modules, {sum(len(e) for e in g.values())} imports, {len(problems)} problems")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
