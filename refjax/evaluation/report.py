"""The evaluation report a person reads: `eval.json`, `report.md` (method x HS/FA) and PNG plots.

`results` layout (every key optional except `methods`):

    {"methods": {"sft": {"harmful_score": 41.2 or harmful_score(...) dict,
                         "finetune_accuracy": 92.1 or task_accuracy(...) dict, ...}, ...},
     "refusal_cosine": {"harmful": [...], "harmless": [...], "sst2": [...]}
                       or {method: {data set: [...]}},
     ...anything else, copied to eval.json}

Per-example `records` lists (they hold response text) go to `records/<method>.<metric>.jsonl`,
not into eval.json or report.md. Plots come from `refjax.evaluation.figures`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from refjax.evaluation import qa_judge
from refjax.evaluation.figures import cosine_box_plot, hs_fa_plot, save_figures
from refjax.evaluation.harmful_score import wilson
from refjax.files import write_json, write_jsonl, write_text

HS_KEY, FA_KEY, COSINE_KEY = "harmful_score", "finetune_accuracy", "refusal_cosine"
EVAL_JSON, REPORT_MD, RECORDS_DIR, HS_FA_PNG = "eval.json", "report.md", "records", "hs_fa.png"


def _hs(entry: Mapping[str, Any]) -> dict[str, Any]:
  """The headline HS of one method's entry, its interval and n, and every other judge's HS."""
  value = entry.get(HS_KEY)
  if not isinstance(value, Mapping):
    return {"hs": math.nan if value is None else float(value), "judge": str(entry.get("judge", "")),
            "hs_ci": None, "n": None, "others": {}}
  judge = str(value.get("judge", ""))
  others = {name: (v["harmful_score"], v.get("ci95")) for name, v in
            value.get("by_judge", {}).items() if name != judge}
  return {"hs": float(value[HS_KEY]), "judge": judge, "hs_ci": value.get("ci95"),
          "n": value.get("n"), "others": others}


def _fa(entry: Mapping[str, Any]) -> tuple[float, str, int | None]:
  value = entry.get(FA_KEY)
  if isinstance(value, Mapping):
    return float(value["accuracy"]), str(value.get("task", "")), value.get("n")
  return (math.nan if value is None else float(value)), str(entry.get("task", "")), None


def method_table(results: Mapping[str, Any]) -> list[dict[str, Any]]:
  """One row per method: hs, judge, fa, task (nan where a metric is missing)."""
  methods = results.get("methods")
  if not isinstance(methods, Mapping) or not methods:
    raise ValueError("results['methods'] must map method names to their metrics; got "
                     f"{type(methods).__name__}")
  rows = []
  for name, entry in methods.items():
    if not isinstance(entry, Mapping):
      raise ValueError(f"results['methods'][{name!r}] is {type(entry).__name__}; expected a dict")
    fa, task, fa_n = _fa(entry)
    rows.append({"method": str(name), **_hs(entry), "fa": fa, "task": task, "fa_n": fa_n})
  return rows


def _cosine_groups(results: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """{group: {data set: cosines}}; a flat mapping is one group named ""."""
  cos = results.get(COSINE_KEY)
  if cos is None:
    return {}
  if not isinstance(cos, Mapping):
    raise ValueError(f"results[{COSINE_KEY!r}] is {type(cos).__name__}; expected a dict")
  kinds = {isinstance(v, Mapping) for v in cos.values()}
  if len(kinds) > 1:
    raise ValueError(f"results[{COSINE_KEY!r}] mixes data sets and groups of data sets; expected "
                     "{data set: cosines} or {group: {data set: cosines}}")
  nested = kinds == {True}
  groups = cos if nested else {"": cos}
  out: dict[str, dict[str, np.ndarray]] = {}
  for group, sets in groups.items():
    out[str(group)] = {}
    for name, values in sets.items():
      arr = np.asarray(values, dtype=np.float64).reshape(-1)
      if arr.size == 0:
        raise ValueError(f"refusal cosines of data set {name!r} are empty")
      out[str(group)][str(name)] = arr
  return out


def _file_safe(name: Any) -> str:
  return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "unnamed"


def _split_records(results: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
  """Copies results, writing each method metric's `records` to records/<method>.<metric>.jsonl."""
  out = dict(results)
  methods = {}
  for name, entry in results.get("methods", {}).items():
    entry = dict(entry)
    for metric, value in list(entry.items()):
      if isinstance(value, Mapping) and "records" in value:
        path = workdir / RECORDS_DIR / f"{_file_safe(name)}.{_file_safe(metric)}.jsonl"
        write_jsonl(path, value["records"])
        entry[metric] = {k: v for k, v in value.items() if k != "records"}
        entry[metric]["records_file"] = str(path.relative_to(workdir))
    methods[name] = entry
  out["methods"] = methods
  return out


def _fmt(x: float) -> str:
  return "–" if math.isnan(x) else f"{x:.2f}"


def _ci(x: float, ci) -> str:
  """A percentage with its interval: "57.0 [47.2, 66.3]"."""
  if math.isnan(x):
    return "–"
  return f"{x:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _wilson_pct(pct: float, n: int | None):
  if n is None or math.isnan(pct):
    return None
  return wilson(round(pct * n / 100), n)


def render_markdown(results: Mapping[str, Any], plots: Mapping[str, str]) -> str:
  """report.md: the method x HS/FA table, cosine quartiles per data set, links to the plots."""
  rows = method_table(results)
  others = list(dict.fromkeys(j for r in rows for j in r["others"]))
  lines = ["# refjax evaluation", "",
           "HS: harmful score, % of harmful-prompt responses judged harmful (lower is better), with "
           "its 95% Wilson interval, the judge and the prompt count. FA: finetuning accuracy on the "
           "task's test split, % (higher is better). A difference smaller than the intervals is "
           "not a result.", "",
           "| method | HS (%) [95% CI] | judge | " + "".join(f"HS, {j} (%) [95% CI] | "
                                                      for j in others)
           + "prompts | FA (%) [95% CI] | task |",
           "|---|---:|---|" + "---:|" * len(others) + "---:|---:|---|"]
  for r in rows:
    extra = "".join(f"{_ci(*r['others'][j])} | " if j in r["others"] else "– | " for j in others)
    fa_ci = _wilson_pct(r["fa"], r["fa_n"])
    lines.append(f"| {r['method']} | {_ci(r['hs'], r['hs_ci'])} | {r['judge'] or '–'} | {extra}"
                 f"{r['n'] or '–'} | {_ci(r['fa'], fa_ci)} | {r['task'] or '–'} |")
  lines += judge_and_filter_lines(results)
  lines += generalisation_lines(results.get("generalisation"))
  groups = _cosine_groups(results)
  if groups:
    lines += ["", "## Refusal-feature cosine per data set", "",
              "| group | data set | n | median | q25 | q75 |", "|---|---|---:|---:|---:|---:|"]
    for group, sets in groups.items():
      for name, arr in sets.items():
        q25, med, q75 = np.percentile(arr, [25, 50, 75])
        lines.append(f"| {group or '–'} | {name} | {arr.size} | {med:.3f} | {q25:.3f} | "
                     f"{q75:.3f} |")
  if results.get("cost"):
    lines += [""] + cost_lines(results["cost"])
  if plots:
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
  return "\n".join(lines) + "\n"


def judge_and_filter_lines(results: Mapping[str, Any]) -> list[str]:
  """The trained judge's validation and what each data filter dropped (teacher, judge screen)."""
  lines = []
  if results.get("judge_validation"):
    lines += [f"- The `{qa_judge.NAME}` judge (trained QA-moderation probe, never trained on these "
              f"prompts): {qa_judge.judge_line(results['judge_validation'])}."]
  for key, who in (("filter", "Teacher filter (reft, filter_only)"),
                   ("screen", "Judge screen (judge_filter)")):
    f = results.get(key)
    if not f:
      continue
    prov = f.get("by_provenance", {})
    parts = [f"{v['dropped']} of {v['n']} {k}" for k, v in sorted(prov.items())]
    lines.append(f"- {who}: drops {f['n_dropped']} of {f['n_examples']} user examples"
                 + (f" ({', '.join(parts)})" if parts else "")
                 + f"; threshold {f['threshold']:.3f} ({f['threshold_rule']}).")
  return ["", "## Judge and data filters", ""] + lines if lines else []


def _pct(x) -> str:
  return "–" if x is None or x != x else f"{100 * x:.1f}"


def generalisation_lines(g: Mapping[str, Any] | None) -> list[str]:
  """The filter's generalisation section (refusal/generalisation.json): per unseen source AUROC
  and recall, recall per wrapper family, FPR per benign set, and the goals."""
  if not g:
    return []
  lines = ["", "## Filter generalisation (sources and wordings the teacher never saw)", "",
           f"Scorer `{g['scorer']}` at layer {g['layer']}, the run's threshold "
           f"{g['threshold']:.3f}; AUROC against {g['reference_benign']} (generic harmless "
           f"instructions). Seen harmful sources: {', '.join(g['seen_sources'])}.", "",
           "| unseen harmful source | n | AUROC | recall (%) |", "|---|---:|---:|---:|"]
  lines += [f"| {s} | {v['n']} | {_num(v['auroc'])} | {_pct(v['recall'])} |"
            for s, v in g["sources"].items()]
  ind = g["in_distribution"]
  lines += [f"| {ind['source']} (in distribution) | {ind['n']} | – | {_pct(ind['recall'])} |", "",
            "| wrapped held-out prompts | n | recall (%) |", "|---|---:|---:|"]
  lines += [f"| {f} | {v['n']} | {_pct(v['recall'])} |" for f, v in g["wrapped_recall"].items()]
  lines += ["", "| benign set | n | dropped (FPR, %) |", "|---|---:|---:|"]
  lines += [f"| {s} | {v['n']} | {_pct(v['fpr'])} |" for s, v in g["benign_fpr"].items()]
  lines += ["", "| goal | bound | value | met |", "|---|---:|---:|---|"]
  for name, v in g["goals"].items():
    kind = "min" if "min" in v else "max"
    met = "–" if v["met"] is None else ("yes" if v["met"] else "**no**")
    value = "–" if v["value"] is None else f"{v['value']:.3f}"
    lines.append(f"| {name} | {kind} {v[kind]} | {value} | {met} |")
  return lines


# What Ref-Teacher runs besides its own finetune: teacher preparation, its feature, the filter and
# the cached teacher targets (plain SFT runs none of them).
REFT_STAGES = ("teacher", "refusal", "filter", "distill")


def cost_lines(costs: list[Mapping[str, Any]]) -> list[str]:
  """The cost table (wall time, peak memory per stage and method) and Ref-Teacher's overhead
  against plain SFT in time and memory."""
  lines = ["## Cost per stage and method", "",
           "| stage | method | wall time (s) | peak RSS (GiB) | device peak (GiB) |",
           "|---|---|---:|---:|---:|"]
  for c in costs:
    lines.append(f"| {c['stage']} | {c.get('method') or '–'} | {c['seconds']:.0f} | "
                 f"{_num(c.get('peak_rss_gib'))} | {_num(c.get('device_peak_gib'))} |")
  unit = {(c["stage"], c.get("method")): c for c in costs}
  reft, sft = unit.get(("finetune", "reft")), unit.get(("finetune", "sft"))
  if reft and sft:
    extra = [unit[(s, None)] for s in REFT_STAGES if (s, None) in unit]
    t_reft = sum(c["seconds"] for c in extra) + reft["seconds"]
    lines += ["", f"Ref-Teacher costs {t_reft:.0f} s ({', '.join(c['stage'] for c in extra)} and "
              f"its finetune) against {sft['seconds']:.0f} s for plain SFT's finetune: "
              f"{t_reft / max(sft['seconds'], 1e-9):.2f}x the time."]
    mems = [c.get("peak_rss_gib") for c in extra + [reft]]
    if sft.get("peak_rss_gib") and all(m is not None for m in mems):
      lines.append(f"Peak RSS {max(mems):.2f} GiB against {sft['peak_rss_gib']:.2f} GiB: "
                   f"{max(mems) / sft['peak_rss_gib']:.2f}x the memory.")
  return lines


def _num(x) -> str:
  return "–" if x is None else f"{x:.2f}"


def write_report(results: Mapping[str, Any], workdir: str | Path) -> dict[str, Path]:
  """Writes eval.json, report.md, the PNG plots and the per-example records into `workdir`."""
  workdir = Path(workdir)
  rows = method_table(results)
  figs: dict[str, Any] = {HS_FA_PNG.removesuffix(".png"): hs_fa_plot(rows)}
  titles = {"HS and FA per method": HS_FA_PNG}
  for group, sets in _cosine_groups(results).items():
    stem = "refusal_cosine" + (f"_{_file_safe(group)}" if group else "")
    title = "Refusal-feature cosine" + (f" ({group})" if group else "")
    figs[stem] = cosine_box_plot(sets, title)
    titles[title] = f"{stem}.png"
  written = {p.stem + "_png": p for p in save_figures(figs, workdir, dpi=120)}
  clean = _split_records(results, workdir)
  written["eval_json"] = write_json(workdir / EVAL_JSON, clean, sort_keys=False)
  written["report_md"] = write_text(workdir / REPORT_MD, render_markdown(results, titles))
  return written


__all__ = ["write_report", "render_markdown", "method_table", "EVAL_JSON", "REPORT_MD",
           "RECORDS_DIR", "HS_FA_PNG"]
