"""The study's figures: data from the networks and per-scan rows, drawn by
:mod:`wmh_jax.study.report`.

``icc_per_dataset.png`` (Fig. 2, baselines in grey), ``examples.png`` (Fig. 3),
``scatter.png``, ``bland_altman.png`` and ``learning_curves.png`` (validation
scores from each seed's ``metrics.jsonl``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from wmh_jax.data import pipeline, records
from wmh_jax.inference import restore
from wmh_jax.models import kinds
from wmh_jax.study import report
from wmh_jax.study.floors import BASELINE_KIND
from wmh_jax.study.results import Curve, Panel, Table
from wmh_jax.study.scans import segmentations
from wmh_jax.study.tables import is_number
from wmh_jax.training import logs




def _axial(array: np.ndarray, z: int) -> np.ndarray:
  return np.asarray(array)[:, :, z]


def _example_panels(network: restore.Network, record: dict, out: dict[str, Any],
                    with_image: bool) -> list[Panel]:
  """Panels of one network on one scan, at the axial slice with the most WMH."""
  loaded = pipeline.load_record(record)
  image, mask = loaded["image"][..., 0], loaded["mask"][..., 0] > 0
  z = int(np.argmax(mask.sum(axis=(0, 1))))
  segs = segmentations(out, network.spec.spacing_mm)
  panels = [Panel("FLAIR + annotation", _axial(image, z), contour=_axial(mask, z))
            ] if with_image else []
  if "attention" in segs:
    panels += [Panel(f"{network.group} attention", _axial(out["attention"], z), cmap="inferno",
                     contour=_axial(loaded["brain"], z), contour_color="cyan"),
               Panel(f"{network.group} thresholded", _axial(image, z),
                     fill=_axial(segs["attention"], z))]
  if kinds.get(network.kind).segmentation_head and "seg" in segs:
    panels.append(Panel(f"{network.group} p>0.5", _axial(image, z), fill=_axial(segs["seg"], z)))
  return panels


def example_figure_data(networks: Sequence[restore.Network],
                        sets: Sequence[dict[str, list[dict]]], mesh: Mesh, count: int = 3
                        ) -> list[tuple[str, list[Panel]]]:
  """Fig. 3 panels for the ``count`` local test scans with the largest annotated volume.

  Uses the first seed of the first weak (else joint) run for the attention
  panels and of the first strong (else joint) run for the segmentation; each
  on its own grid, matched by ``scan_id``.

  Args:
    sets: the test sets of each network
      (:func:`wmh_jax.data.records.evaluation_sets`), parallel to ``networks``.
  """
  names = [n.kind for n in networks]
  attention = kinds.first_of(names, lambda kind: "attention" in kind.maps)
  segmentation = kinds.first_of(names, lambda kind: kind.segmentation_head)
  chosen = list(dict.fromkeys(i for i in (attention, segmentation) if i is not None))
  if not chosen or records.LOCAL not in sets[chosen[0]]:
    return []
  local = [r for r in sets[chosen[0]][records.LOCAL] if r["has_mask"]]
  scan_ids = [r["scan_id"] for r in sorted(local, key=lambda r: -r["wmh_volume_ml"])[:count]]
  examples = {scan_id: [] for scan_id in scan_ids}
  for k, i in enumerate(chosen):
    mine = [r for r in sets[i].get(records.LOCAL, []) if r["scan_id"] in examples]
    for record, out in restore.predict_records(networks[i], mine, mesh):
      examples[record["scan_id"]] += _example_panels(networks[i], record, out,
                                                     with_image=k == 0)
  return [(scan_id, panels) for scan_id, panels in examples.items() if panels]


def learning_curves(networks: Sequence[restore.Network]) -> list[Curve]:
  """Validation curves (`Kind.curves`) of every network, from its ``metrics.jsonl``.

  A network without a log, or a metric never logged, gives no curve.
  """
  curves = []
  for network in networks:
    evals = logs.validation_records(network.workdir / "metrics.jsonl")
    for metric in kinds.get(network.kind).curves:
      points = [(int(r["step"]), float(r[metric])) for r in evals if metric in r]
      if points:
        steps, values = zip(*points)
        curves.append(Curve(network.group, network.kind, network.seed, metric,
                            np.array(steps, np.int64), np.array(values, np.float64)))
  return curves


def write_figures(out: Path, rows: Sequence[dict], icc: Table,
                  examples: Sequence[tuple[str, list[Panel]]], curves: Sequence[Curve]
                  ) -> dict[str, Path]:
  """Writes the PNG figures under ``out/figures``; returns name → path.

  The scatter and Bland–Altman plots show the networks only.
  """
  folder = out / "figures"
  volume_rows = [r for r in rows if r["kind"] != BASELINE_KIND and
                 is_number(r["annotated_ml"]) and is_number(r["predicted_ml"])]
  datasets = list(dict.fromkeys(r["dataset"] for r in icc.rows))
  external = [d for d in datasets if d != records.LOCAL] or datasets
  figures = {}
  if icc.rows:
    figures["icc_per_dataset"] = report.icc_figure(icc.rows, external,
                                                   folder / "icc_per_dataset.png")
  if examples:
    figures["examples"] = report.examples_figure(examples, folder / "examples.png")
  if volume_rows:
    figures["scatter"] = report.scatter_figure(volume_rows, folder / "scatter.png")
    figures["bland_altman"] = report.bland_altman_figure(volume_rows,
                                                         folder / "bland_altman.png")
  if curves:
    figures["learning_curves"] = report.learning_curves_figure(curves,
                                                               folder / "learning_curves.png")
  return figures
