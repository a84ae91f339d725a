"""Quality-control pictures of predictions: one montage per scan and an index (``predict --qc``).

Each scan gets ``<out>/<scan>/qc.png``: eight axial slices of the
preprocessed scan (model grid, radiological display: left on the right,
anterior up), spread over the slices that hold brain, with the predicted
lesion masks outlined (a segmentation group's p > 0.5 in red, a weak group's
attention mask in cyan), and a title with every group's volume, its interval
and its out-of-distribution flag. ``<out>/qc.md`` lists every scan
with its thumbnail, sorted by out-of-distribution score (highest first), so a
reader checks the least typical scans first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wmh_jax.runtime import fileio

SLICES = 8
DPI = 90


def montage_slices(image: np.ndarray, count: int = SLICES) -> list[int]:
  """``count`` axial slice indices evenly over the slices with nonzero (brain) voxels."""
  occupied = np.flatnonzero(np.asarray(image).reshape(-1, image.shape[2]).any(axis=0))
  if occupied.size == 0:
    occupied = np.arange(image.shape[2])
  positions = np.linspace(occupied[0], occupied[-1], min(count, occupied.size))
  return sorted({int(round(p)) for p in positions})


def write_montage(path: Path, image: np.ndarray,
                  outlines: Sequence[tuple[np.ndarray, str]], title: str) -> Path:
  """The montage PNG of one scan.

  Args:
    path: the PNG to write (atomically).
    image: (x, y, z) preprocessed scan, RAS.
    outlines: (mask (x, y, z) on the same grid, matplotlib colour) to outline.
    title: the figure's title (volumes, intervals, flags).
  """
  slices = montage_slices(image)
  columns = 4
  rows = math.ceil(len(slices) / columns)
  fig = Figure(figsize=(2.2 * columns, 2.2 * rows + 0.6), layout="constrained")
  fig.suptitle(title, fontsize=8)
  for i, z in enumerate(slices):
    ax = fig.add_subplot(rows, columns, i + 1)
    # Radiological convention: RAS x runs right-to-left on screen, y upwards.
    ax.imshow(image[::-1, :, z].T, origin="lower", cmap="gray")
    for mask, color in outlines:
      if mask[:, :, z].any():
        ax.contour(mask[::-1, :, z].T.astype(float), [0.5], colors=color, linewidths=0.7)
    ax.set_title(f"z = {z}", fontsize=7)
    ax.set_axis_off()
  FigureCanvasAgg(fig)
  path.parent.mkdir(parents=True, exist_ok=True)
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=DPI)
  return path


def title(scan_id: str, groups: Sequence[str], row: dict[str, Any]) -> str:
  """``scan: weak 4.2 mL [1.9, 9.0], OOD 0.8; strong ...`` from a volumes.csv row."""
  parts = []
  for group in groups:
    mean = row.get(f"{group}_mean_ml")
    if not isinstance(mean, (int, float)):
      continue
    text = f"{group} {mean:.1f} mL"
    low, high = row.get(f"{group}_lo_ml"), row.get(f"{group}_hi_ml")
    if isinstance(low, float) and isinstance(high, float):
      text += f" [{low:.1f}, {high:.1f}]"
    score = row.get(f"{group}_ood_score")
    if isinstance(score, float):
      text += f", OOD {score:.2f}" + (" FLAGGED" if row.get(f"{group}_ood_flag") == 1 else "")
    parts.append(text)
  return f"{scan_id}: " + "; ".join(parts)


def ood_order(row: dict[str, Any], groups: Sequence[str]) -> float:
  """The highest out-of-distribution score of a row over its groups; -inf without one."""
  scores = [row.get(f"{g}_ood_score") for g in groups]
  scores = [s for s in scores if isinstance(s, float)]
  return max(scores) if scores else -math.inf


def write_index(out_dir: Path, rows: Sequence[dict[str, Any]], groups: Sequence[str]) -> Path:
  """``out_dir/qc.md``: one entry per scan with a ``qc.png``, highest OOD score first."""
  with_pictures = [r for r in rows if (out_dir / r["folder"] / "qc.png").is_file()]
  ordered = sorted(with_pictures, key=lambda r: -ood_order(r, groups))
  lines = ["# Quality control", "",
           "Sorted by out-of-distribution score (highest first). Outlines on the first "
           "group's grid: red, a segmentation mask (p > 0.5); cyan, a weak group's "
           "attention mask (the attention map's top voxels, as many as its volume).", ""]
  for row in ordered:
    lines += [f"## {title(row['scan_id'], groups, row)}", "",
              f"![{row['scan_id']}]({row['folder']}/qc.png)", ""]
  path = out_dir / "qc.md"
  fileio.atomic_write_text(path, "\n".join(lines))
  return path
