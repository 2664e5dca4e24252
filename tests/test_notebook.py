"""notebooks/refusal_direction.ipynb runs against the tiny run's workdir and writes its figures;
the refjax.evaluation.analysis helpers it calls give the same numbers as the pipeline's own metrics."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from refjax import config as config_lib
from refjax.config_json import from_dict, to_dict
from refjax.evaluation import analysis, figures
from refjax.method.refusal import auroc
from refjax.stages.workdir import Workdir, load_run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "refusal_direction.ipynb"
FIGURES = {"cosine_box_base", "cosine_box_teacher", "auroc_by_layer", "teacher_refusal_updates",
           "projection_base", "projection_teacher", "pca_teacher", "filter_roc",
           "filter_generalisation"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk."""
  assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def output_texts(nb) -> list[str]:
  """Every printed or plain-text output of the notebook (images left out)."""
  texts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        texts.append(out.get("text", ""))
      else:
        texts.append(out.get("data", {}).get("text/plain", ""))
        texts.append(out.get("evalue", ""))
  return texts


@pytest.fixture(scope="module")
def executed_notebook(tiny_workdir):
  """The notebook executed with WORKDIR = the tiny run (its figures land in that workdir)."""
  import os

  import nbformat
  from nbclient import NotebookClient

  workdir = tiny_workdir[0]
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # as nbconvert
  client.execute(env={**os.environ, "WORKDIR": str(workdir), "N_PROMPTS": "24",
                      "JAX_PLATFORMS": "cpu"})
  return nb, workdir


def test_notebook_is_saved_without_outputs():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5  # every figure is explained
  assert nb.metadata["kernelspec"]["name"] == "python3"


def test_notebook_runs_and_writes_every_figure(executed_notebook):
  nb, workdir = executed_notebook
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == len(FIGURES)
  out_dir = Workdir(workdir).notebook_figures
  assert {p.stem for p in out_dir.glob("*.png")} == FIGURES
  for name in FIGURES:
    data = (out_dir / f"{name}.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE), name
    assert len(data) > 8_000, (name, len(data))  # axes, labels and data, not a blank canvas
    width, height = png_size(data)
    assert width >= 300 and height >= 250, (name, width, height)


def test_notebook_prints_numbers_not_prompts(executed_notebook, tiny_workdir):
  """The outputs hold ids and numbers only: no prompt text of any set the notebook reads."""
  nb, _ = executed_notebook
  cfg = tiny_workdir[1]
  text = "\n".join(output_texts(nb))
  sets = analysis.prompt_sets(cfg, 24)
  prompts = [e.instruction for exs in sets.values() for e in exs if len(e.instruction) >= 20]
  assert prompts
  leaked = sum(p in text or p[:40] in text for p in prompts)
  assert leaked == 0, f"{leaked} prompts appear in the notebook's outputs"
  assert "validation AUROC" in text and "filter:" in text


# --- refjax.evaluation.analysis on the tiny run's artifacts -------------------------------------------


def test_load_run(tiny_workdir):
  workdir, cfg, _ = tiny_workdir
  art = load_run(workdir)
  assert art.config["model"]["name"] == cfg.model.name
  layer = art.auroc["layer"]
  assert art.refusal_teacher.layer == art.refusal_base.layer == layer
  n_hidden = art.refusal_teacher.feature.shape[0]
  assert len(art.auroc["layer_auroc_base"]) == len(art.auroc["layer_auroc_teacher"]) == n_hidden
  assert analysis.cosine_tags(art.cosine_sets) == ["teacher", "base"]
  assert {"teacher/harmful", "teacher/harmless", f"teacher/{cfg.data.task}", "base/harmful"} <= (
      set(art.cosine_sets))
  # The stored cosine sets reproduce the stored AUROC of the harmful-vs-harmless validation split.
  for tag in ("base", "teacher"):
    h, n = art.cosine_sets[f"{tag}/harmful"], art.cosine_sets[f"{tag}/harmless"]
    got = auroc(np.r_[h, n], np.r_[np.ones(len(h)), np.zeros(len(n))])
    assert got == pytest.approx(art.auroc[f"auroc_{tag}"], abs=1e-6)
  assert len(art.filter_rows) == art.filter_summary["n_examples"] == cfg.data.user_n
  lo, hi = analysis.cosine_range(art.cosine_sets)
  assert lo < min(v.min() for v in art.cosine_sets.values()) <= hi


def test_load_run_needs_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_run(tmp_path)


def test_load_config_round_trip(tiny_workdir):
  workdir, cfg, _ = tiny_workdir
  loaded = from_dict(load_run(workdir).config)
  config_lib.validate(loaded)
  dump = lambda c: json.dumps(to_dict(c), sort_keys=True)  # noqa: E731
  assert dump(loaded) == dump(cfg)
  assert isinstance(loaded.stages, tuple) and isinstance(loaded.refusal.layer_range, tuple)


def test_filter_roc_matches_auroc_and_the_summary(tiny_workdir):
  art = load_run(tiny_workdir[0])
  roc = analysis.filter_roc(art.filter_rows, art.filter_summary)
  scores = [r["score"] for r in art.filter_rows]
  harmful = [r.get("provenance") == "harmful" for r in art.filter_rows]
  assert 0.0 <= roc.auc <= 1.0
  assert roc.auc == pytest.approx(auroc(scores, harmful), abs=1e-12)
  assert roc.auc == pytest.approx(art.filter_summary["auroc"], abs=1e-9)
  assert roc.n_harmful == sum(harmful) and roc.n_benign == len(harmful) - sum(harmful)
  assert (roc.fpr[0], roc.tpr[0], roc.fpr[-1], roc.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
  # The marked point is the filter's own decision: its recall and FPR as the summary has them.
  assert roc.point == pytest.approx((art.filter_summary["fpr"], art.filter_summary["recall"]))
  assert roc.threshold == pytest.approx(art.filter_summary["threshold"])
  # ... and it lies on the curve at the threshold's own step.
  i = int(np.searchsorted(-roc.thresholds, -roc.threshold, side="right")) - 1
  assert (roc.fpr[i], roc.tpr[i]) == pytest.approx(roc.point)


def test_roc_curve_by_hand():
  # pos {0.9, 0.8}, neg {0.8, 0.1}: pairs won 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
  fpr, tpr, thr = analysis.roc_curve([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
  assert thr[0] == np.inf and list(thr[1:]) == [0.9, 0.8, 0.1]
  rows = [{"score": s, "provenance": p, "kept": k} for s, p, k in
          ((0.9, "harmful", False), (0.8, "benign", True), (0.8, "harmful", True),
           (0.1, "benign", True))]
  roc = analysis.filter_roc(rows)
  assert roc.auc == pytest.approx(0.875) and roc.point == (0.0, 0.5) and roc.threshold is None
  with pytest.raises(ValueError, match="both classes"):
    analysis.roc_curve([0.1, 0.2], [1, 1])


def test_projection_2d():
  rng = np.random.default_rng(0)
  d, n = 16, 40
  direction = rng.normal(size=d)
  unit = direction / np.linalg.norm(direction)
  labels = np.array(["harmful"] * n + ["harmless"] * n)
  side = np.where(labels == "harmful", 3.0, -3.0)[:, None]
  features = rng.normal(size=(2 * n, d)) * 0.1 + side * unit

  pca = analysis.projection_2d(features, labels)
  assert pca.coords.shape == (2 * n, 2) and pca.axis_names == ("PC 1", "PC 2")
  assert abs(pca.axes[0] @ unit) > 0.99  # the planted direction is the first PC
  np.testing.assert_allclose(pca.axes @ pca.axes.T, np.eye(2), atol=1e-8)
  assert 0.9 < pca.explained[0] <= 1.0 and pca.explained[0] + pca.explained[1] <= 1.0 + 1e-9

  proj = analysis.projection_2d(features, labels, direction=5.0 * direction)
  np.testing.assert_allclose(proj.coords[:, 0], features @ unit)  # x: on the normalised feature
  assert abs(proj.axes[1] @ unit) < 1e-8  # y: a direction of the residual
  assert proj.coords[labels == "harmful", 0].min() > proj.coords[labels == "harmless", 0].max()
  for bad in (dict(features=features[:, :3], labels=labels, direction=direction),
              dict(features=features, labels=labels[:5]),
              dict(features=features, labels=labels, direction=np.zeros(d))):
    with pytest.raises(ValueError):
      analysis.projection_2d(**bad)


def test_plots_are_figures_outside_pyplot(tiny_workdir, tmp_path):
  from matplotlib import _pylab_helpers
  from matplotlib.figure import Figure

  art = load_run(tiny_workdir[0])
  before = _pylab_helpers.Gcf.get_num_fig_managers()
  rng = np.random.default_rng(1)
  figs = {
      "box": figures.cosine_box_plot(analysis.cosine_sets_of(art.cosine_sets, "teacher"), "t",
                                     ylim=analysis.cosine_range(art.cosine_sets)),
      "layers": figures.auroc_by_layer_plot(art.auroc),
      "projection": figures.projection_plot(
          analysis.projection_2d(rng.normal(size=(12, 5)), ["a"] * 6 + ["b"] * 6), "t"),
      "roc": figures.filter_roc_plot(analysis.filter_roc(art.filter_rows, art.filter_summary)),
      "updates / teacher": figures.refusal_updates_plot(art.refusal_updates),
  }
  assert all(isinstance(f, Figure) for f in figs.values())
  assert _pylab_helpers.Gcf.get_num_fig_managers() == before  # no pyplot figure was made
  ax = figs["layers"].axes[0]
  assert len(ax.lines) >= 3  # base, teacher, the chosen layer's marker
  with pytest.raises(ValueError, match="no cosine sets"):
    analysis.cosine_sets_of(art.cosine_sets, "student")
  paths = figures.save_figures(figs, tmp_path / "figs")
  assert [p.name for p in paths] == ["box.png", "layers.png", "projection.png", "roc.png",
                                     "updates_teacher.png"]
  assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in paths)
