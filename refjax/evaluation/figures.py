"""Every figure refjax draws, for the report and the notebook: matplotlib Figures on their own Agg
canvas (no pyplot, no global state); `save_figures` writes them as PNG files.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from refjax.evaluation.analysis import Projection, RocCurve
from refjax.files import write_bytes

# One colour per prompt set, shared by every figure (harmful red, harmless blue, tasks green...).
SET_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
  """A Figure on its own Agg canvas (pyplot's global figure list is never touched)."""
  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def cosine_box_plot(sets: Mapping[str, np.ndarray], title: str, *,
                    ylim: tuple[float, float] | None = None) -> Figure:
  """Box plot of cos(f_l(x), R_l), one box per prompt set (the paper's figures A3/A4)."""
  if not sets:
    raise ValueError("cosine_box_plot got no prompt sets")
  names = list(sets)
  data = [np.asarray(sets[n], np.float64).reshape(-1) for n in names]
  fig = new_figure(1.6 + 1.3 * len(names), 4.0)
  ax = fig.add_subplot()
  box = ax.boxplot(data, patch_artist=True, widths=0.6)
  ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(d)})" for n, d in zip(names, data)],
                fontsize=8)
  for patch, colour in zip(box["boxes"], _colours(len(names))):
    patch.set_facecolor(colour)
    patch.set_alpha(0.5)
  ax.axhline(0.0, color="grey", lw=0.8, ls=":")
  ax.set_ylabel("cosine with the refusal feature")
  ax.set_title(title)
  if ylim is not None:
    ax.set_ylim(*ylim)
  return fig


def auroc_by_layer_plot(auroc_json: Mapping[str, Any]) -> Figure:
  """AUROC of each layer's cosine score (harmful vs harmless), base vs teacher; the chosen
  layer marked."""
  base = np.asarray(auroc_json["layer_auroc_base"], np.float64)
  teacher = np.asarray(auroc_json["layer_auroc_teacher"], np.float64)
  layer = int(auroc_json["layer"])
  fig = new_figure()
  ax = fig.add_subplot()
  ax.plot(np.arange(len(base)), base, "o-", ms=3, label="base model", color="#7f7f7f")
  ax.plot(np.arange(len(teacher)), teacher, "o-", ms=3, label="Ref-Teacher", color="#d62728")
  ax.axvline(layer, color="black", ls="--", lw=1,
             label=f"chosen layer {layer}: {base[layer]:.3f} -> {teacher[layer]:.3f}")
  ax.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("hidden-state index (0 = embeddings)")
  ax.set_ylabel("AUROC, harmful vs harmless")
  ax.set_ylim(min(0.0, float(np.nanmin(np.r_[base, teacher]))) - 0.02, 1.02)
  ax.set_title("refusal feature quality by layer")
  ax.legend(fontsize=8, loc="lower right")
  return fig


def projection_plot(proj: Projection, title: str = "") -> Figure:
  """Scatter of a Projection, one colour per label."""
  fig = new_figure(5.6, 4.6)
  ax = fig.add_subplot()
  names = list(dict.fromkeys(proj.labels.tolist()))
  for name, colour in zip(names, _colours(len(names))):
    m = proj.labels == name
    ax.scatter(proj.coords[m, 0], proj.coords[m, 1], s=14, alpha=0.75, color=colour,
               label=f"{name} (n={int(m.sum())})")
  ax.set_xlabel(f"{proj.axis_names[0]} ({100 * proj.explained[0]:.0f}% var)")
  ax.set_ylabel(f"{proj.axis_names[1]} ({100 * proj.explained[1]:.0f}% var)")
  ax.set_title(title)
  ax.legend(fontsize=8)
  return fig


def filter_roc_plot(roc: RocCurve, title: str = "filter ROC on the user data") -> Figure:
  """The ROC curve with the chance line and the filter's chosen operating point."""
  fig = new_figure(4.8, 4.4)
  ax = fig.add_subplot()
  ax.plot(roc.fpr, roc.tpr, "-", color="#d62728",
          label=f"teacher score (AUROC {roc.auc:.3f})")
  ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8, label="chance")
  if roc.point is not None:
    thr = "" if roc.threshold is None or not math.isfinite(roc.threshold) else (
        f"threshold {roc.threshold:.3f}: ")
    ax.plot(*roc.point, "k*", ms=12,
            label=f"{thr}FPR {roc.point[0]:.2f}, recall {roc.point[1]:.2f}")
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel(f"false positive rate (benign dropped, n={roc.n_benign})")
  ax.set_ylabel(f"true positive rate (harmful dropped, n={roc.n_harmful})")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="lower right")
  return fig


def refusal_updates_plot(updates: Sequence[Mapping[str, Any]]) -> Figure:
  """Teacher training: mean probe cosine per class and validation AUROC at each refusal update."""
  steps = [int(u["step"]) for u in updates]
  fig = new_figure()
  ax = fig.add_subplot()
  for key, colour, name in (("probe_cos_harmful", SET_COLOURS[0], "harmful probe, mean cos"),
                            ("probe_cos_harmless", SET_COLOURS[1], "harmless probe, mean cos"),
                            ("val_auroc", "black", "validation AUROC")):
    if all(key in u for u in updates):
      ax.plot(steps, [float(u[key]) for u in updates], "o-", ms=3, color=colour, label=name)
  ax.set_xlabel("teacher step")
  ax.set_title("dynamic refusal-feature updates during teacher preparation")
  ax.legend(fontsize=8)
  return fig


def generalisation_plot(g: Mapping[str, Any]) -> Figure:
  """refusal/generalisation.json: recall at the run's threshold per unseen harmful source and
  per wrapper family (left, with the recall goals) and FPR per benign set (right)."""
  fig = new_figure(9.6, 4.6)
  left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  ind = g["in_distribution"]
  rows = ([(s, v["recall"], SET_COLOURS[0]) for s, v in g["sources"].items()]
          + [(f"{ind['source']} (in dist.)", ind["recall"], "grey")]
          + [(f"wrapped: {f}", v["recall"], SET_COLOURS[2])
             for f, v in g["wrapped_recall"].items()])
  y = np.arange(len(rows))
  left.barh(y, [0 if r[1] is None else r[1] for r in rows], color=[r[2] for r in rows])
  left.set_yticks(y, [r[0] for r in rows], fontsize=7)
  for goal, style in ((g["goals"]["recall_at_threshold"]["min"], "--"),
                      (g["goals"]["wrapped_recall"]["min"], ":")):
    left.axvline(goal, color="black", ls=style, lw=0.8)
  left.set_xlim(0, 1.02)
  left.invert_yaxis()
  left.set_xlabel("recall at the run's threshold (dashed: goals)")
  benign = list(g["benign_fpr"].items())
  yb = np.arange(len(benign))
  right.barh(yb, [v["fpr"] for _, v in benign], color=SET_COLOURS[1])
  right.set_yticks(yb, [s for s, _ in benign], fontsize=7)
  right.axvline(g["goals"]["fpr_generic_harmless"]["max"], color="black", ls="--", lw=0.8)
  right.set_xlim(0, 1.02)
  right.invert_yaxis()
  right.set_xlabel("benign rows dropped (FPR)")
  fig.suptitle(f"filter generalisation: {g['scorer']} scorer, layer {g['layer']}, threshold "
               f"{g['threshold']:.3f}", fontsize=10)
  fig.tight_layout()
  return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
  """The figure rendered as PNG bytes (what the notebook displays and save_figures writes)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def save_figures(figs: Mapping[str, Figure], out_dir: str | Path, dpi: int = 100) -> list[Path]:
  """Writes each figure as `<name>.png` into out_dir (created); returns the paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, fig in figs.items():
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"
    path = out / f"{safe}.png"
    write_bytes(path, figure_png(fig, dpi))
    paths.append(path)
  return paths


def _colours(n: int) -> list[str]:
  return [SET_COLOURS[i % len(SET_COLOURS)] for i in range(n)]


def hs_fa_plot(rows: Sequence[Mapping[str, Any]]) -> Figure:
  """Side-by-side bars of HS and FA per method (rows: method, hs, fa; NaN = not measured)."""
  fig = new_figure(max(6.0, 1.2 * len(rows) + 3), 4.0)
  names = [r["method"] for r in rows]
  x = np.arange(len(rows))
  for ax, key, title, color in ((fig.add_subplot(1, 2, 1), "hs", "Harmful score (%) ↓", "#c0392b"),
                                (fig.add_subplot(1, 2, 2), "fa", "Finetune accuracy (%) ↑",
                                 "#2874a6")):
    values = np.array([r[key] for r in rows], dtype=float)
    bars = ax.bar(x, np.nan_to_num(values), color=color)
    for bar, v in zip(bars, values):
      ax.annotate("n/a" if np.isnan(v) else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2,
                  bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_title(title)
  return fig


__all__ = ["new_figure", "cosine_box_plot", "auroc_by_layer_plot", "projection_plot",
           "filter_roc_plot", "refusal_updates_plot", "hs_fa_plot", "figure_png", "save_figures",
           "SET_COLOURS"]
