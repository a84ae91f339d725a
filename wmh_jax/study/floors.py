"""The floor: two non-deep baselines fitted per grid and training split, scored per scan.

:class:`~wmh_jax.evaluation.baselines.IntensityVolumeRegression` and
:class:`~wmh_jax.evaluation.baselines.ThresholdSegmentation` are fitted on the
training split of the networks' grid and predict the same test sets. Their
rows (:data:`BASELINES` run names, kind :data:`BASELINE_KIND`, no seed) go
through the same tables and statistics as the networks'.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

import ml_collections
import tqdm

from wmh_jax.data import records
from wmh_jax.evaluation import baselines
from wmh_jax.inference import restore
from wmh_jax.study import scans

# The non-deep baselines: kind, and run name per method.
BASELINE_KIND = "baseline"
BASELINES = {"intensity": "baseline: intensity-volume regression",
             "threshold": "baseline: intensity threshold"}


@dataclasses.dataclass(frozen=True, eq=False)
class Floor:
  """Both baselines fitted on one grid and training split, and their test sets.

  Attributes:
    runs: :data:`BASELINES` key → the baseline's run name in the rows and tables.
    regression: the fitted intensity-feature volume regression.
    threshold: the fitted intensity-threshold segmentation.
    sets: test sets (name → records), the union of its networks' sets.
  """
  runs: dict[str, str]
  regression: baselines.IntensityVolumeRegression
  threshold: baselines.ThresholdSegmentation
  sets: dict[str, list[dict]]


def _floor_key(config: ml_collections.ConfigDict) -> str:
  """What the baselines' fit depends on: the grid and the training split."""
  spec = records.preprocess_spec(config)
  return json.dumps([spec.shape, spec.spacing_mm, spec.percentiles,
                     str(records.training_manifest(config)), int(config.data.split_seed)])


def _fit_floor(config: ml_collections.ConfigDict, suffix: str) -> Floor:
  """Both baselines fitted on the training split of ``config``'s grid, no test sets yet.

  Args:
    suffix: appended to the :data:`BASELINES` run names.
  """
  train = records.split_records(records.load_records(records.training_manifest(config),
                                                     config))["train"]
  return Floor(runs={method: name + suffix for method, name in BASELINES.items()},
               regression=baselines.IntensityVolumeRegression().fit(train),
               threshold=baselines.ThresholdSegmentation().fit(train), sets={})


def fit_floors(networks: Sequence[restore.Network],
               sets: Sequence[dict[str, list[dict]]]) -> dict[str, Floor]:
  """The baselines of every run, fitted once per grid and training split.

  Run names get a `` (grid of <run>)`` suffix when the runs have several grids.

  Args:
    sets: the test sets of each network
      (:func:`wmh_jax.data.records.evaluation_sets`), parallel to ``networks``.

  Returns:
    network group (run) name → its floor (runs on one grid share one object, whose
    test sets are the union of theirs).
  """
  keys = [_floor_key(network.config) for network in networks]
  several_grids = len(set(keys)) > 1
  fitted: dict[str, Floor] = {}
  floors = {}
  for key, network, mine in zip(keys, networks, sets):
    if key not in fitted:
      fitted[key] = _fit_floor(network.config,
                               f" (grid of {network.group})" if several_grids else "")
    fitted[key].sets.update(mine)
    floors[network.group] = fitted[key]
  return floors


def baseline_rows(floor: Floor) -> list[dict]:
  """Per-scan rows of both baselines of one floor on each of its test sets, by
  baseline, then set, then record.

  The intensity-volume regression fills ``predicted_ml``; the intensity threshold
  fills ``predicted_ml`` (its segmentation's volume), ``dice`` (both NaN
  where it is not fitted) and the challenge metrics.
  """
  regression, threshold = floor.runs["intensity"], floor.runs["threshold"]
  rows = [{**scans.scan_fields(regression, BASELINE_KIND, None, dataset, record),
           "predicted_ml": float(volume)}
          for dataset, recs in floor.sets.items()
          for record, volume in zip(recs, floor.regression.predict(recs))]
  for dataset, recs in floor.sets.items():
    for record, seg in tqdm.tqdm(zip(recs, floor.threshold.predict(recs)), total=len(recs),
                                 desc=f"{threshold} {dataset}", unit="scan", file=sys.stderr,
                                 leave=False):
      row = {**scans.scan_fields(threshold, BASELINE_KIND, None, dataset, record),
             "predicted_ml": seg.volume_ml, "dice": seg.dice}
      if seg.mask is not None:
        row.update(scans.segmentation_metrics({"seg": seg.mask}, scans.load_reference(record)))
      rows.append(row)
  return rows

