"""The package's shape: no import cycles, no production import of test code, every module imports
first (in a fresh set of refjax modules) and in random orders, and modules stay small."""

import random
import subprocess
import sys
import textwrap

from refjax.tools import import_graph

MAX_LINES = 360  # "small modules named for what they do"


def test_no_import_cycles_or_test_imports():
  g = import_graph.graph()
  assert len(g) > 50
  assert import_graph.cycles(g) == []
  assert import_graph.main(["--quiet"]) == 0
  # the layers' direction: training knows nothing of the method, method nothing of stages
  for name, edges in g.items():
    if name.startswith("refjax.training"):
      assert not any(t.startswith(("refjax.method", "refjax.stages")) for t in edges), name
    if name.startswith(("refjax.method", "refjax.models", "refjax.data", "refjax.evaluation")):
      assert not any(t.startswith("refjax.stages") for t in edges), name


def test_cycle_finder_finds_a_cycle():
  g = {"a": {"b": [1]}, "b": {"c": [1]}, "c": {"a": [1]}, "d": {"a": [1]}}
  assert import_graph.cycles(g) == [["a", "b", "c"]]


def test_every_module_imports_first_and_in_random_orders():
  names = sorted(import_graph.modules())
  orders = [names[:]] + [random.Random(seed).sample(names, len(names)) for seed in (1, 2)]
  code = textwrap.dedent("""
      import importlib, json, sys
      names, orders = json.loads(sys.argv[1]), json.loads(sys.argv[2])
      def fresh():  # the tfds builder registers itself globally: it is imported once only
        for m in [m for m in sys.modules if (m == "refjax" or m.startswith("refjax."))
                  and m != "refjax.data.tfds_builder"]:
          del sys.modules[m]
      for name in names:  # each module as the first refjax module imported
        fresh()
        importlib.import_module(name)
      for order in orders:
        fresh()
        for name in order:
          importlib.import_module(name)
      print("IMPORTS_OK", len(names))
  """)
  import json
  r = subprocess.run([sys.executable, "-c", code, json.dumps(names), json.dumps(orders)],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "IMPORTS_OK" in r.stdout, r.stderr[-3000:]


def test_modules_are_small():
  big = {name: n for name, path in import_graph.modules().items()
         if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not big, big
