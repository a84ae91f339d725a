"""Summaries of a generated cohort: a per-domain table, confounder correlations, an overview PNG."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wmh_jax.data import manifest, nifti
from wmh_jax.runtime import fileio


# ---------------------------------------------------------------------------
# Summary, overview figure, command line

CONFOUNDERS = manifest.CONFOUNDER_COLUMNS


def confounder_correlations(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Pearson r of ``wmh_volume_ml`` with each confounder volume (NaN if undefined)."""
  out = {}
  for column in CONFOUNDERS:
    pairs = np.array([(r["wmh_volume_ml"], r[column]) for r in rows
                      if r.get("wmh_volume_ml") is not None and r.get(column) is not None],
                     np.float64).reshape(-1, 2)
    ok = len(pairs) >= 3 and pairs.std(axis=0).min() > 0
    out[column] = float(np.corrcoef(pairs.T)[0, 1]) if ok else math.nan
  return out


def _spacings(rows: Sequence[Mapping[str, Any]]) -> str:
  """Distinct voxel sizes (mm) of the rows' images, from the NIfTI headers."""
  import nibabel as nib  # noqa: PLC0415
  seen = dict.fromkeys("x".join(f"{z:.2f}" for z in nib.load(r["image"]).header.get_zooms()[:3])
                       for r in rows)
  return ", ".join(seen)


def summarize(manifests: Mapping[str, str | os.PathLike]) -> str:
  """A text table: per domain the scan and subject counts, WMH volume median and
  range (mL), voxel sizes (mm) and Pearson r of WMH volume with the confounders."""
  header = (f"{'domain':<10} {'scans':>5} {'subj':>5} {'WMH median':>10} {'WMH range (mL)':>16}"
            f" {'r vent':>7} {'r WM':>7} {'r CSF':>7}  spacing (mm)")
  lines = [header, "-" * len(header)]
  for name, path in manifests.items():
    rows = manifest.read_manifest(path)
    vols = np.array([r["wmh_volume_ml"] for r in rows], np.float64)
    r = confounder_correlations(rows)
    lines.append(
        f"{name:<10} {len(rows):>5} {len({x['subject_id'] for x in rows}):>5} "
        f"{np.median(vols):>10.2f} {f'{vols.min():.2f}-{vols.max():.2f}':>16} "
        f"{r['ventricle_ml']:>7.2f} {r['white_matter_ml']:>7.2f} {r['csf_ml']:>7.2f}  "
        f"{_spacings(rows)}")
  return "\n".join(lines)


def _example_slice(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
  """(image, labels) axial slice with the most WMH, RAS, and the voxel size."""
  scan = nifti.load_image(row["image"])
  labels = nifti.load_labels(row["mask"], scan)
  z = int(np.argmax((labels == 1).sum(axis=(0, 1))))
  return scan.data[:, :, z], labels[:, :, z], scan.spacing_mm


def render_overview_png(manifests: Mapping[str, str | os.PathLike],
                        path: str | os.PathLike) -> None:
  """Writes a PNG with one axial slice per domain (the scan at the 75th volume
  percentile, the slice with most WMH), WMH contours red, other pathology cyan."""
  from matplotlib.figure import Figure  # noqa: PLC0415  (Agg, no pyplot state)
  fig = Figure(figsize=(4.2 * len(manifests), 5.2), layout="constrained")
  for k, (name, manifest_path) in enumerate(manifests.items()):
    rows = manifest.read_manifest(manifest_path)
    vols = np.array([r["wmh_volume_ml"] for r in rows])
    row = rows[int(np.argmin(np.abs(vols - np.quantile(vols, 0.75))))]
    image, labels, spacing = _example_slice(row)
    ax = fig.add_subplot(1, len(manifests), k + 1)
    ax.imshow(image.T, origin="lower", cmap="gray", aspect=spacing[1] / spacing[0],
              vmin=0, vmax=float(np.percentile(image[image > 0], 99.5)))
    for value, color in ((1, "red"), (2, "cyan")):
      if (labels == value).any():
        ax.contour((labels == value).T.astype(float), [0.5], colors=color, linewidths=0.7)
    ax.set_title(f"{name}: {row['scan_id']}\n{row['wmh_volume_ml']:.1f} mL, "
                 f"{row['site']}", fontsize=9)
    ax.set_axis_off()
  path = Path(path)
  fileio.atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=80))


def disk_mb(folders: Sequence[Path]) -> float:
  return sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file()) / 1e6
