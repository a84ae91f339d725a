"""Per-scan evaluation: one ``predictions.csv`` row from a network's outputs on one scan.

The annotated volume (the record's ``wmh_volume_ml``), the predicted volumes
(:data:`VOLUMES`), the Dice of the model's segmentation against the mask on the
model grid (strong/joint: p > 0.5; weak: the attention map thresholded to the
predicted volume, paper §2.2, which is also ``attention_dice``), the
WMH-challenge metrics of that segmentation (:data:`CHALLENGE`; label 2 removed,
HD95 in mm on the model grid's affine) and, for severity models, the true and
predicted class.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from wmh_jax.data import manifest, nifti
from wmh_jax.evaluation import attention, metrics, ood
from wmh_jax.inference import restore

# challenge_metrics key -> predictions.csv column
CHALLENGE = {"dice": "challenge_dice", "hd95_mm": "hd95_mm", "avd_percent": "avd_percent",
             "log_volume_difference": "log_volume_difference",
             "lesion_recall": "lesion_recall", "lesion_f1": "lesion_f1"}
# physical_outputs key -> predictions.csv column
VOLUMES = {"volume_ml": "predicted_ml", "soft_volume_ml": "predicted_soft_ml",
           "seg_volume_ml": "predicted_seg_ml"}
COLUMNS = (["run", "kind", "seed", "dataset", "scan_id", "subject_id", "annotated_ml",
            *VOLUMES.values(), "dice", "attention_dice", *CHALLENGE.values(),
            "severity", "predicted_severity", "ood_score", *manifest.CONFOUNDER_COLUMNS,
            "tiv_ml"])


@dataclasses.dataclass(frozen=True)
class Reference:
  """A scan's annotation on the model grid.

  Attributes:
    labels: int ``(x, y, z)``: 0 background, 1 WMH, 2 other pathology.
    affine: 4x4 voxel → world (mm) of the model grid.
    spacing_mm: model-grid voxel size (mm).
  """
  labels: np.ndarray
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]


def load_reference(record: dict) -> Reference | None:
  """The cached annotation of a record; None for a scan without a mask."""
  if not record["has_mask"]:
    return None
  with np.load(record["path"]) as data:
    mask, label2 = data["mask"] > 0, data["label2"] > 0
    geometry = nifti.Geometry.from_dict(json.loads(str(data["geometry_json"])))
    spacing = tuple(float(s) for s in data["spacing_mm"])
  return Reference(np.where(mask, 1, np.where(label2, 2, 0)), geometry.model_affine, spacing)


def segmentations(out: dict[str, Any], spacing_mm: tuple[float, float, float]
                  ) -> dict[str, np.ndarray]:
  """The model's bool ``(x, y, z)`` segmentations of one scan.

  ``attention``: the attention map thresholded to the predicted volume (the
  ``round(volume_ml / voxel mL)`` highest voxels, paper §2.2); ``seg``:
  p > 0.5. Either is absent when the model has no such output.
  """
  segs = {}
  if "attention" in out:
    count = attention.predicted_voxels(out["volume_ml"], spacing_mm)
    segs["attention"] = attention.threshold_to_volume(out["attention"], count)
  if "seg_prob" in out:
    segs["seg"] = out["seg_prob"] > 0.5
  return segs


def segmentation_metrics(segs: dict[str, np.ndarray], reference: Reference | None
                         ) -> dict[str, float]:
  """Dice, attention-map Dice and challenge metrics of one scan.

  The model's segmentation is ``seg`` when present, else the thresholded
  attention map; its Dice is ``dice`` and its challenge metrics the
  :data:`CHALLENGE` columns. NaN without a reference mask; empty without a
  segmentation.
  """
  if not segs:
    return {}
  model_seg = segs.get("seg", segs.get("attention"))
  columns = ["dice", *CHALLENGE.values()] + (["attention_dice"] if "attention" in segs else [])
  if reference is None:
    return dict.fromkeys(columns, math.nan)
  wmh = reference.labels == 1
  row = {"dice": metrics.dice(wmh, model_seg)}
  if "attention" in segs:
    row["attention_dice"] = metrics.dice(wmh, segs["attention"])
  challenge = metrics.challenge_metrics(reference.labels, model_seg.astype(np.float32),
                                        reference.affine, reference.spacing_mm)
  row.update({column: float(challenge[key]) for key, column in CHALLENGE.items()})
  return row


def _optional(value: Any) -> float | None:
  return None if value is None else float(value)


def scan_fields(run: str, kind: str, seed: int | None, dataset: str, record: dict
                ) -> dict[str, Any]:
  """The cells of a ``predictions.csv`` row that do not depend on the model:
  identity, annotated volume (mL) and confounder volumes (mL)."""
  return {"run": run, "kind": kind, "seed": seed, "dataset": dataset,
          "scan_id": record["scan_id"], "subject_id": record["subject_id"],
          "annotated_ml": float(record["wmh_volume_ml"]),
          **{name: _optional(record.get(name)) for name in manifest.CONFOUNDER_COLUMNS}}


def intracranial_ml(record: dict, voxel_ml: float) -> float | None:
  """Total intracranial volume (mL) of a cached record: its nonzero voxels on the model grid
  (the scan is skull-stripped, so they are the intracranial content) x ``voxel_ml``; None
  for a record without a cached array."""
  if not record.get("path"):
    return None
  with np.load(record["path"]) as data:
    return float(data["brain"].sum()) * voxel_ml


def scan_row(network: restore.Network, dataset: str, record: dict,
             out: dict[str, Any], ood_reference: ood.Reference | None = None) -> dict:
  """The ``predictions.csv`` row of one scan (see :data:`COLUMNS`).

  Args:
    out: the network's outputs on the scan
      (:func:`wmh_jax.inference.restore.predict_records`).
    ood_reference: the network's training feature distribution; gives ``ood_score``.
  """
  row = scan_fields(network.group, network.kind, network.seed, dataset, record)
  row["predicted_ml"] = math.nan
  row.update({column: float(out[key]) for key, column in VOLUMES.items() if key in out})
  segs = segmentations(out, network.spec.spacing_mm)
  row.update(segmentation_metrics(segs, load_reference(record)))
  if "severity" in out:
    row["severity"] = record["severity"] if record["severity"] >= 0 else None
    row["predicted_severity"] = int(out["severity"])
  row["tiv_ml"] = intracranial_ml(record, network.voxel_ml)
  if ood_reference is not None and "pooled" in out:
    row["ood_score"] = float(ood_reference.scores(out["pooled"][None])[0])
  return row



def present_columns(rows: Sequence[dict]) -> list[str]:
  """:data:`COLUMNS` that at least one row fills."""
  return [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
