"""Writing the study's outputs: tables (CSV + Markdown), figures (PNG) and REPORT.md.

:mod:`wmh_jax.study.analysis` computes the statistics and hands over per-scan rows
and finished :class:`~wmh_jax.study.results.Table` objects; this module lays them
out (the only arithmetic here is presentational: Bland–Altman bias and limits, and
the mean of the tabulated weak − strong differences quoted in the text).
Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered by the
Agg backend (no pyplot, no display). CSV files are written atomically by
:func:`wmh_jax.runtime.fileio.write_csv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wmh_jax.models import kinds
from wmh_jax.runtime import fileio
from wmh_jax.study.results import Curve, Panel, Table

DPI = 90
# Fig. 2: colour by label type (as in the paper), marker by run; baselines in grey.
MARKERS = "osD^v<>"
# Learning curves: metrics.jsonl key -> (label, line style).
CURVE_STYLES = {"val_icc": ("ICC(2,1)", "-"), "val_dice": ("Dice", "--")}


# ---------------------------------------------------------------------------
# Tables


def format_cell(value: Any) -> str:
  """Markdown cell: 3 decimals (scientific below 1e-3), ``n/a`` for None/NaN."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if isinstance(value, (float, np.floating)):
    value = float(value)
    if value != 0 and abs(value) < 1e-3:
      return f"{value:.2e}"
    return f"{value:.3f}"
  return str(value)


def markdown_table(table: Table) -> str:
  """The table as GitHub Markdown (header, rows, then the note in italics)."""
  lines = ["| " + " | ".join(table.columns) + " |",
           "|" + "|".join("---" for _ in table.columns) + "|"]
  lines += ["| " + " | ".join(format_cell(row.get(c)) for c in table.columns) + " |"
            for row in table.rows]
  if not table.rows:
    lines = ["*(no rows)*"]
  if table.note:
    lines.append(f"\n*{table.note}*")
  return "\n".join(lines)


def write_table(folder: Path, table: Table) -> tuple[Path, Path]:
  """Writes ``<name>.csv`` and ``<name>.md`` under ``folder``; returns both paths."""
  folder.mkdir(parents=True, exist_ok=True)
  csv_path, md_path = folder / f"{table.name}.csv", folder / f"{table.name}.md"
  fileio.write_csv(csv_path, table.columns, table.rows)
  fileio.atomic_write_text(md_path, f"## {table.title}\n\n{markdown_table(table)}\n")
  return csv_path, md_path


# ---------------------------------------------------------------------------
# Figures


def _save(fig: Figure, path: Path) -> Path:
  """Renders ``fig`` with the Agg backend to a PNG at ``path`` (atomically)."""
  FigureCanvasAgg(fig)
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=DPI)
  return path


def _column(rows: Sequence[dict], name: str) -> np.ndarray:
  return np.array([row[name] for row in rows], np.float64)


def _color(kind: str) -> str:
  """A model kind's colour (`Kind.color`); grey for the baselines."""
  return kinds.get(kind).color if kind in kinds.REGISTRY else "gray"


def icc_figure(icc_rows: Sequence[dict], datasets: Sequence[str], path: Path) -> Path:
  """Fig. 2 analogue: ICC(2,1) per dataset, one point per seed with its 5–95 % CI.

  Args:
    icc_rows: rows of the per-network ICC table (``run``, ``kind``, ``seed``,
      ``dataset``, ``icc_2_1``, ``icc_2_1_ci_low``, ``icc_2_1_ci_high``).
    datasets: x-axis order.
  """
  runs = list(dict.fromkeys((r["run"], r["kind"]) for r in icc_rows))
  fig = Figure(figsize=(max(5.0, 1.6 + 1.5 * len(datasets)), 4.0), layout="constrained")
  ax = fig.add_subplot()
  width = 0.7 / max(len(runs), 1)
  for k, (run, kind) in enumerate(runs):
    rows = [r for r in icc_rows if r["run"] == run and r["dataset"] in datasets]
    seeds = sorted({r["seed"] for r in rows})
    for r in rows:
      jitter = (seeds.index(r["seed"]) - (len(seeds) - 1) / 2) * width / max(len(seeds), 2)
      x = datasets.index(r["dataset"]) + (k - (len(runs) - 1) / 2) * width + jitter
      err = np.array([[r["icc_2_1"] - r["icc_2_1_ci_low"]], [r["icc_2_1_ci_high"] - r["icc_2_1"]]])
      ax.errorbar(x, r["icc_2_1"], yerr=np.clip(np.nan_to_num(err), 0, None),
                  fmt=MARKERS[k % len(MARKERS)],
                  color=_color(kind), capsize=3, ms=5,
                  label=f"{run} ({kind})" if r is rows[0] else None)
  ax.set_xticks(range(len(datasets)), datasets)
  ax.set_xlim(-0.5, len(datasets) - 0.5)
  ax.set_xlabel("test set")
  ax.set_ylabel("ICC(2,1) predicted vs annotated volume")
  ax.set_title("Volume agreement per dataset\n(one point per seed, 5–95 % bootstrap CI)",
               fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _run_panels(rows: Sequence[dict]) -> tuple[Figure, list[tuple[Any, list[dict], list]]]:
  """A figure with one axes per run, in row order.

  Returns:
    The figure and, per run, ``(axes, the run's rows, [(colour, dataset, rows)])``
    with one colour per dataset (the same in every panel), empty datasets left out.
  """
  runs = list(dict.fromkeys(r["run"] for r in rows))
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  fig = Figure(figsize=(4.0 * len(runs), 4.0), layout="constrained")
  panels = []
  for k, run in enumerate(runs):
    mine = [r for r in rows if r["run"] == run]
    parts = [(f"C{j}", dataset, [r for r in mine if r["dataset"] == dataset])
             for j, dataset in enumerate(datasets)]
    panels.append((fig.add_subplot(1, len(runs), k + 1), mine, [p for p in parts if p[2]]))
  return fig, panels


def scatter_figure(rows: Sequence[dict], path: Path) -> Path:
  """Predicted vs annotated volume (mL) per run, coloured by dataset, identity line."""
  fig, panels = _run_panels(rows)
  for ax, mine, parts in panels:
    for colour, dataset, part in parts:
      ax.scatter(_column(part, "annotated_ml"), _column(part, "predicted_ml"), s=12,
                 color=colour, label=dataset, alpha=0.7)
    values = np.concatenate([_column(mine, "annotated_ml"), _column(mine, "predicted_ml")])
    low, high = float(min(values.min(), 0.0)), float(values.max())
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low, high], [low, high], "k--", lw=0.8, label="identity")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("annotated volume (mL)")
    ax.set_ylabel("predicted volume (mL)")
    ax.set_title(f"{mine[0]['run']} ({mine[0]['kind']}), all seeds", fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


def bland_altman_figure(rows: Sequence[dict], path: Path) -> Path:
  """Bland–Altman per run: difference (predicted − annotated, mL) vs their mean.

  Lines: the mean difference (bias) and bias ± 1.96 SD (limits of agreement).
  """
  fig, panels = _run_panels(rows)
  for ax, mine, parts in panels:
    for colour, dataset, part in parts:
      a, p = _column(part, "annotated_ml"), _column(part, "predicted_ml")
      ax.scatter((a + p) / 2, p - a, s=12, color=colour, label=dataset, alpha=0.7)
    diff = _column(mine, "predicted_ml") - _column(mine, "annotated_ml")
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    ax.axhline(bias, color="k", lw=1, label=f"bias {bias:+.3g} mL")
    for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
      ax.axhline(limit, color="k", lw=0.8, ls="--")
    ax.set_xlabel("mean of annotated and predicted (mL)")
    ax.set_ylabel("predicted − annotated (mL)")
    ax.set_title(f"{mine[0]['run']} ({mine[0]['kind']}), limits ±1.96 SD", fontsize=9)
    ax.legend(fontsize=7)
  return _save(fig, path)


def learning_curves_figure(curves: Sequence[Curve], path: Path) -> Path:
  """Validation score against training step: one panel per run, one colour per
  seed, one line style per metric (:data:`CURVE_STYLES`)."""
  runs = list(dict.fromkeys((c.run, c.kind) for c in curves))
  fig = Figure(figsize=(4.0 * len(runs), 3.5), layout="constrained")
  for k, (run, kind) in enumerate(runs):
    ax = fig.add_subplot(1, len(runs), k + 1)
    mine = [c for c in curves if c.run == run]
    seeds = sorted({c.seed for c in mine})
    for curve in mine:
      label, style = CURVE_STYLES[curve.metric]
      ax.plot(curve.steps, curve.values, style, marker="o", ms=3,
              color=f"C{seeds.index(curve.seed)}", label=f"seed {curve.seed} {label}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation score")
    ax.set_title(f"{run} ({kind})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return _save(fig, path)


def examples_figure(examples: Sequence[tuple[str, Sequence[Panel]]], path: Path) -> Path:
  """Fig. 3 analogue: one row per scan, one column per :class:`Panel`."""
  columns = max(len(panels) for _, panels in examples)
  fig = Figure(figsize=(2.6 * columns, 2.6 * len(examples)), layout="constrained")
  for i, (scan_id, panels) in enumerate(examples):
    for j, panel in enumerate(panels):
      ax = fig.add_subplot(len(examples), columns, i * columns + j + 1)
      ax.imshow(panel.background.T, origin="lower", cmap=panel.cmap)
      if panel.fill is not None:
        ax.imshow(np.ma.masked_where(~panel.fill.T.astype(bool), panel.fill.T.astype(float)),
                  origin="lower", cmap="autumn", alpha=0.6, vmin=0, vmax=1)
      if panel.contour is not None and panel.contour.any():
        ax.contour(panel.contour.T.astype(float), [0.5], colors=panel.contour_color,
                   linewidths=0.8)
      ax.set_title(f"{scan_id}: {panel.title}" if j == 0 else panel.title, fontsize=8)
      ax.set_axis_off()
  return _save(fig, path)


# ---------------------------------------------------------------------------
# REPORT.md


def comparison_lines(comparison: Table) -> list[str]:
  """Plain statements from the weak-vs-strong table (numbers, no fixed verdicts).

  For each (weak run, strong run) pair: the datasets where the weak run's
  seed-mean ICC(2,1) is higher and lower, every difference, and the mean
  difference over the external (non-``local``) datasets with the largest one.
  """
  if not comparison.rows:
    return [comparison.note or "No weak-vs-strong comparison is possible."]
  lines = []
  for weak, strong in dict.fromkeys((r["weak_run"], r["strong_run"]) for r in comparison.rows):
    rows = [r for r in comparison.rows if (r["weak_run"], r["strong_run"]) == (weak, strong)]
    valid = [r for r in rows if not math.isnan(r["difference"])]
    higher = [r["dataset"] for r in valid if r["difference"] > 0]
    lower = [r["dataset"] for r in valid if r["difference"] < 0]
    diffs = ", ".join(f"{r['dataset']} {format_diff(r['difference'])}" for r in rows)
    lines.append(
        f"- Weak run `{weak}` vs strong run `{strong}`: the weak run's ICC(2,1) (mean over "
        f"seeds) is higher on {len(higher)} of {len(valid)} datasets "
        f"({', '.join(higher) or 'none'}) and lower on {len(lower)} "
        f"({', '.join(lower) or 'none'}). Difference weak − strong: {diffs}.")
    external = [r for r in valid if r["dataset"] != "local"]
    if external:
      largest = max(external, key=lambda r: r["difference"])
      mean = float(np.mean([r["difference"] for r in external]))
      lines.append(f"  Over the {len(external)} external dataset(s) the mean difference is "
                   f"{format_diff(mean)}; the largest is on {largest['dataset']} "
                   f"({format_diff(largest['difference'])}).")
    lines += poor_agreement_lines(rows, [("weak", weak), ("strong", strong)])
  return lines


POOR_ICC = 0.5  # below: "poor" reliability (Koo & Li 2016, J Chiropr Med 15:155)


def poor_agreement_lines(rows: Sequence[dict], runs: Sequence[tuple[str, str]]) -> list[str]:
  """Warnings for runs whose seed-mean ICC(2,1) is below :data:`POOR_ICC` everywhere.

  Args:
    rows: comparison rows of one (weak, strong) pair.
    runs: (column prefix of the comparison table, run name) of each side.
  """
  poor = {}
  for side, run in runs:
    iccs = [(r[f"{side}_icc_2_1"], r["dataset"]) for r in rows
            if not math.isnan(r[f"{side}_icc_2_1"])]
    if iccs and max(iccs)[0] < POOR_ICC:
      poor[run] = max(iccs)
  lines = [f"  Run `{run}` does not measure WMH volume here: its ICC(2,1) is below {POOR_ICC} "
           f"('poor') on every dataset (highest {icc:.3f}, on {dataset})."
           for run, (icc, dataset) in poor.items()]
  if len(poor) == len(runs):
    lines.append("  With neither network measuring volume, these differences say nothing "
                 "about weak vs strong labels; the networks need more training (see the "
                 "networks table for the steps).")
  return lines


def format_diff(value: float) -> str:
  """Signed difference with 3 decimals, ``n/a`` for NaN."""
  return "n/a" if math.isnan(value) else f"{value:+.3f}"


PAPER_NOTE = ("For reference, the paper reports on its local test set a mean ICC(2,1) of 0.99 "
              "(weak) vs 0.81 (strong) and a mean Dice of 0.08 vs 0.78, and weak ICCs similar "
              "to or higher than strong ones on all four public datasets.")


FLOOR_NOTE = ("Two non-deep baselines, fitted on the training split of the networks' grid "
              "and scored on the same test sets with the same statistics (their rows are in "
              "every table): `baseline: intensity-volume regression`, least squares of the WMH "
              "volume on global brain-intensity features, among them the brain volume (mL) above "
              "eight intensity levels (it sees no lesion shape or position), and "
              "`baseline: intensity threshold`, the brain voxels at or above one intensity, "
              "chosen for the best mean Dice on the training masks. A network that does not "
              "beat them is not measuring lesions.")


DOMAIN_NOTE = ("Runs trained with domain-randomised augmentation (`config.augment.domain`: "
               "random contrast curve, bias field, resolution, noise and normalisation "
               "percentiles on every training image) against the run of the same label type "
               "trained without it, on the same test sets; the figure above shows every seed.")


def sections(tables: dict[str, Table]) -> list[tuple[str, str, list[str], list[str]]]:
  """REPORT.md layout: ``(heading, text, table names, figure names)`` per section."""
  datasets = ", ".join(dict.fromkeys(r["dataset"] for r in tables["datasets"].rows))
  verdict = "\n".join(comparison_lines(tables["comparison"]))
  return [
      ("Runs and test sets", f"Datasets analysed: {datasets}.", ["networks", "datasets"], []),
      ("Learning curves", "Validation score at each evaluation during training (from each "
       "seed's `metrics.jsonl`): ICC(2,1) of the volume (severity: of the class), Dice of the "
       "segmentation head. The analysis uses each seed's best checkpoint.", [],
       ["learning_curves"]),
      ("Weak vs strong labels", f"{verdict}\n\n{PAPER_NOTE}", ["comparison"],
       ["icc_per_dataset"]),
      ("Baselines (the floor)", FLOOR_NOTE, ["baselines"], []),
      *([("Domain randomisation", DOMAIN_NOTE, ["domain_effect"], ["icc_per_dataset"])]
        if "domain_effect" in tables else []),
      ("Volume agreement", "ICC(2,1) (two-way random, absolute agreement, paper §2.4) of "
       "predicted vs annotated WMH volume; ICC(3,1) (consistency) for reference.",
       ["icc_mean", "icc"], ["scatter", "bland_altman"]),
      ("Segmentation", "Dice against the mask on each model's grid. Weak networks have no "
       "segmentation head: their attention map is thresholded to keep as many voxels as the "
       "predicted volume (paper §2.2).", ["challenge"], ["examples"]),
      ("Volume intervals", "How far to trust each volume: split-conformal intervals "
       "calibrated on the validation scans, their coverage and width on every test set.",
       ["coverage"], []),
      ("Out-of-distribution scans", "Which scans are unlike the training data, and are their "
       "volumes worse?", ["ood"], []),
      ("Confounders", "Paper §2.4/§3: does predicted volume explain annotated volume beyond "
       "ventricle, white-matter and CSF volume?", ["confounders"], []),
      ("Segmentation vs volume quality", "Paper §4: do networks that segment best also "
       "measure volume best?", ["dice_vs_icc"], []),
      ("Severity pilot", "", ["severity"], []),
  ]


def write_report(out: Path, tables: dict[str, Table], figures: dict[str, Path]) -> Path:
  """Writes ``out/REPORT.md`` (layout: :func:`sections`).

  Args:
    out: the study folder (figure links are relative to it).
    tables: name → table (at least ``datasets`` and ``comparison``), embedded
      as Markdown; absent tables are skipped.
    figures: name → PNG path under ``out``; absent figures are skipped.
  """
  parts = ["# WMH volume study: weak vs strong labels\n"]
  for heading, intro, table_names, figure_names in sections(tables):
    parts.append(f"## {heading}\n")
    if intro:
      parts.append(intro + "\n")
    for name in table_names:
      if name in tables:
        parts.append(f"**{tables[name].title}** (`tables/{name}.csv`)\n\n"
                     f"{markdown_table(tables[name])}\n")
    for name in figure_names:
      if name in figures:
        parts.append(f"![{name}]({figures[name].relative_to(out).as_posix()})\n")
  path = out / "REPORT.md"
  fileio.atomic_write_text(path, "\n".join(parts))
  return path
