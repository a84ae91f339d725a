"""Study analysis: trained runs → per-scan predictions → tables, figures, REPORT.md.

Usage::

  python -m wmh_jax.analysis --runs=runs/weak,runs/strong[,...] --out=reports/study \\
      [--datasets=local,wmhseg,...] [--seeds=0,1,2] [--n_boot=1000] [--boot_seed=0]

Runs. Each ``--runs`` entry is a training workdir: a seed sweep (its
``seed_*/`` children) or a single run. Every seed is restored from its best
checkpoint alone (:func:`wmh_jax.checkpoint.restore_for_inference`; the config
comes from the checkpoint). A run is named after its workdir (``weak``), or
``<parent>_<seed dir>`` when a single ``seed_*`` folder is given; the seed is the
checkpoint config's ``seed``.

Test sets, per network, on its own model grid (:func:`evaluation_sets`):

* ``local``: the ``test`` split of the run's training manifest
  (``config.data.manifest``, or the built-in cohort's ``local`` domain);
* external sets (every row is a test scan): the ``config.data.external_manifests``
  CSVs, each named after its folder when the file is ``manifest.csv`` and after
  its file stem otherwise; with the built-in cohort and no external manifests,
  its four external domains (``wmhseg``, ``longmsles``, ``msseg``, ``msles``).

Per scan (:func:`predict_network`): the annotated volume (the record's
``wmh_volume_ml``), the predicted volume (:func:`wmh_jax.inference.physical_outputs`),
the Dice of the model's segmentation against the mask on the model grid
(strong/joint: p > 0.5; weak: the attention map thresholded to the predicted
volume, paper §2.2, which is also ``attention_dice``), the WMH-challenge metrics of
that segmentation (label 2 removed, HD95 in mm on the model grid's affine) and,
for severity models, the true and predicted severity class.

Outputs under ``--out``:

Baselines, the floor (:func:`fit_floors`): per distinct model grid and
training split, :class:`~wmh_jax.evaluation.baselines.HistogramVolumeRegression`
and :class:`~wmh_jax.evaluation.baselines.ThresholdSegmentation` are fitted on
the training split and predict the same test sets. Their rows (:data:`BASELINES`
run names, kind ``baseline``, no seed) go through the same tables and
statistics as the networks'.

Outputs under ``--out``:

* ``predictions.csv``: one row per run x seed x dataset x scan (:data:`COLUMNS`),
  baselines included;
* ``tables/<name>.csv`` and ``.md``: ``networks``, ``datasets``, ``icc``
  (ICC(2,1) with its 5–95 % bootstrap CI, ICC(3,1), mean Dice per network and
  dataset), ``icc_mean`` (over seeds), ``comparison`` (weak − strong ICC),
  ``baselines`` (does each network beat the floor?), ``challenge``,
  ``confounders``, ``dice_vs_icc``, ``severity``;
* ``figures/``: ``icc_per_dataset.png`` (Fig. 2, baselines in grey),
  ``examples.png`` (Fig. 3), ``scatter.png``, ``bland_altman.png``,
  ``learning_curves.png`` (validation scores from each seed's ``metrics.jsonl``);
* ``REPORT.md`` tying them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from wmh_jax import checkpoint, inference, logs, models, predict, report, sharding
from wmh_jax.data import cohort, nifti, pipeline, records
from wmh_jax.errors import CheckpointError, WMHError
from wmh_jax.evaluation import attention, baselines, metrics, stats
from wmh_jax.report import Curve, Panel, Table

LOCAL = "local"
EXTERNAL_DOMAINS = tuple(name for name in cohort.DOMAINS if name != LOCAL)
# challenge_metrics key -> predictions.csv column
CHALLENGE = {"dice": "challenge_dice", "hd95_mm": "hd95_mm", "avd_percent": "avd_percent",
             "log_volume_difference": "log_volume_difference",
             "lesion_recall": "lesion_recall", "lesion_f1": "lesion_f1"}
# physical_outputs key -> predictions.csv column
VOLUMES = {"volume_ml": "predicted_ml", "soft_volume_ml": "predicted_soft_ml",
           "seg_volume_ml": "predicted_seg_ml"}
COLUMNS = (["run", "kind", "seed", "dataset", "scan_id", "subject_id", "annotated_ml",
            *VOLUMES.values(), "dice", "attention_dice", *CHALLENGE.values(),
            "severity", "predicted_severity", *cohort.CONFOUNDERS])
# Model kinds with a segmentation head (their Dice is that of p > 0.5).
SEGMENTATION_KINDS = ("strong", "joint")
# The non-deep baselines: kind, and run name per method.
BASELINE_KIND = "baseline"
BASELINES = {"histogram": "baseline: histogram regression",
             "threshold": "baseline: intensity threshold"}
# metrics.jsonl validation keys drawn as learning curves, per model kind.
CURVE_METRICS = {"weak": ("val_icc",), "strong": ("val_dice",), "joint": ("val_icc", "val_dice"),
                 "severity": ("val_icc",)}


# ---------------------------------------------------------------------------
# Networks and test sets


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """One restored seed of a run.

  Attributes:
    run: the run's name (its workdir name).
    seed: the training seed (``config.seed``).
    kind: weak | strong | joint | severity.
    workdir: the seed's workdir.
    step: the restored (best) checkpoint step.
    config: the run's config, from the checkpoint.
    variables: Flax variables replicated over the mesh.
    forward: compiled ``variables, images (B,x,y,z,1) -> outputs``.
  """
  run: str
  seed: int
  kind: str
  workdir: Path
  step: int
  config: ml_collections.ConfigDict
  variables: Any
  forward: inference.ForwardFn


def run_name(path: str | Path) -> str:
  """``runs/weak`` → ``weak``; a single ``runs/weak/seed_0`` → ``weak_seed_0``."""
  path = Path(path).absolute()
  return f"{path.parent.name}_{path.name}" if path.name.startswith("seed_") else path.name


def load_run(path: str | Path, mesh: Mesh,
             forwards: dict[str, inference.ForwardFn] | None = None,
             seeds: Collection[int] | None = None) -> list[Network]:
  """Restores every seed of one run from its workdir alone.

  Args:
    path: a seed-sweep workdir or a single-run workdir.
    forwards: compiled forwards by model-config JSON, shared between calls so
      that seeds (and runs) with one architecture compile once.
    seeds: keep only these seeds (the checkpoint config's ``seed``); None: all.

  Raises:
    CheckpointError: no readable checkpoint, or none of ``seeds`` in the run.
  """
  forwards = {} if forwards is None else forwards
  networks = []
  for workdir in checkpoint.run_dirs(path):
    restored = checkpoint.restore_for_inference(workdir, "best")
    config = restored.config
    if seeds is not None and int(config.seed) not in seeds:
      continue
    arch = config.model.to_json(sort_keys=True)
    if arch not in forwards:
      forwards[arch] = inference.make_forward(models.build_model(config.model), mesh)
    networks.append(Network(run=run_name(path), seed=int(config.seed), kind=config.model.kind,
                            workdir=workdir, step=restored.step, config=config,
                            variables=sharding.replicate(restored.variables, mesh),
                            forward=forwards[arch]))
  if not networks:
    raise CheckpointError(path, f"no run with seed in {sorted(seeds or ())}")
  return networks


def dataset_name(manifest_path: str | Path) -> str:
  """``data/wmhseg/manifest.csv`` → ``wmhseg``; ``lists/msseg.csv`` → ``msseg``."""
  path = Path(manifest_path)
  return path.parent.absolute().name if path.name == cohort.MANIFEST_NAME else path.stem


def external_manifests(config: ml_collections.ConfigDict,
                       keep: Callable[[str], bool] = lambda name: True) -> dict[str, Path]:
  """External test manifests of a run, name → path, in configured order.

  ``keep`` filters names before the built-in cohort generates any domain.

  Raises:
    WMHError: two external manifests with the same name, or one named ``local``.
  """
  if config.data.external_manifests:
    named: dict[str, Path] = {}
    for item in (p for p in config.data.external_manifests.split(",") if p.strip()):
      path = Path(item.strip())
      name = dataset_name(path)
      if name in named or name == LOCAL:
        raise WMHError(path, f"external dataset name {name!r} is taken; give the manifest "
                       "its own folder or file name")
      named[name] = path
    return {name: path for name, path in named.items() if keep(name)}
  if config.data.manifest:
    return {}
  names = [name for name in EXTERNAL_DOMAINS if keep(name)]
  return records.cohort_manifests(config, names) if names else {}


def evaluation_sets(config: ml_collections.ConfigDict,
              datasets: Sequence[str] | None = None) -> dict[str, list[dict]]:
  """Preprocessed (cached) test records of a run, dataset name → records.

  Args:
    config: the run's config (its grid, manifests, cache and split seed).
    datasets: names to keep (None: all).
  """
  keep = (lambda name: True) if datasets is None else (lambda name: name in datasets)
  sets = {}
  if keep(LOCAL):
    local = records.load_records(records.training_manifest(config), config)
    sets[LOCAL] = records.split_records(local)["test"]
  for name, path in external_manifests(config, keep).items():
    sets[name] = records.load_records(path, config, assign=False)
  return sets


# ---------------------------------------------------------------------------
# Per-scan predictions


def _batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """The training batch rounded up to a multiple of the device count."""
  return -(-int(config.train.batch_size) // mesh.size) * mesh.size


def scan_outputs(network: Network, recs: Sequence[dict], mesh: Mesh
                 ) -> Iterator[tuple[dict, dict[str, Any]]]:
  """Runs the network over ``recs``; yields ``(record, outputs)`` per scan, in order.

  Outputs are :func:`wmh_jax.inference.physical_outputs` without the batch
  axis: volumes (mL), ``severity`` (class), maps ``(x, y, z)``.

  Raises:
    WMHError: a non-finite model output.
  """
  size = _batch_size(network.config, mesh)
  scale, voxel = float(network.config.data.volume_scale_ml), records.voxel_ml(network.config)
  for start, batch in zip(range(0, len(recs), size), pipeline.eval_batches(recs, size)):
    raw = inference.run_batches(network.forward, network.variables, [batch], mesh, keep_maps=True)
    if not all(np.isfinite(v).all() for v in raw.values()):
      raise WMHError(network.workdir, f"non-finite model output on {batch['scan_id']}")
    out = inference.physical_outputs(raw, volume_scale_ml=scale, voxel_ml=voxel)
    for i, record in enumerate(recs[start:start + size]):
      yield record, {key: value[i] for key, value in out.items()}


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
          **{name: _optional(record.get(name)) for name in cohort.CONFOUNDERS}}


def scan_row(network: Network, dataset: str, record: dict, out: dict[str, Any]) -> dict:
  """The ``predictions.csv`` row of one scan (see :data:`COLUMNS`)."""
  spacing = records.preprocess_spec(network.config).spacing_mm
  row = scan_fields(network.run, network.kind, network.seed, dataset, record)
  row["predicted_ml"] = math.nan
  row.update({column: float(out[key]) for key, column in VOLUMES.items() if key in out})
  row.update(segmentation_metrics(segmentations(out, spacing), load_reference(record)))
  if "severity" in out:
    row["severity"] = record["severity"] if record["severity"] >= 0 else None
    row["predicted_severity"] = int(out["severity"])
  return row


def predict_network(network: Network, sets: dict[str, list[dict]], mesh: Mesh) -> list[dict]:
  """Per-scan rows of one network on each test set, in set and record order."""
  rows = []
  for dataset, recs in sets.items():
    for record, out in tqdm.tqdm(scan_outputs(network, recs, mesh), total=len(recs),
                                 desc=f"{network.run} seed {network.seed} {dataset}",
                                 unit="scan", file=sys.stderr, leave=False):
      rows.append(scan_row(network, dataset, record, out))
  return rows


# ---------------------------------------------------------------------------
# Baselines (the floor)


@dataclasses.dataclass(frozen=True, eq=False)
class Floor:
  """Both baselines fitted on one grid and training split, and their test sets.

  Attributes:
    runs: :data:`BASELINES` key → the baseline's run name in the rows and tables.
    regression: the fitted histogram-feature volume regression.
    threshold: the fitted intensity-threshold segmentation.
    sets: test sets (name → records), the union of its networks' sets.
  """
  runs: dict[str, str]
  regression: baselines.HistogramVolumeRegression
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
               regression=baselines.HistogramVolumeRegression().fit(train),
               threshold=baselines.ThresholdSegmentation().fit(train), sets={})


def fit_floors(networks: Sequence[Network], sets: Sequence[dict[str, list[dict]]]
               ) -> dict[str, Floor]:
  """The baselines of every run, fitted once per grid and training split.

  Run names get a `` (grid of <run>)`` suffix when the runs have several grids.

  Args:
    sets: the test sets of each network (:func:`evaluation_sets`), parallel to ``networks``.

  Returns:
    Network run name → its floor (runs on one grid share one object, whose
    test sets are the union of theirs).
  """
  keys = [_floor_key(network.config) for network in networks]
  several_grids = len(set(keys)) > 1
  fitted: dict[str, Floor] = {}
  floors = {}
  for key, network, mine in zip(keys, networks, sets):
    if key not in fitted:
      fitted[key] = _fit_floor(network.config,
                               f" (grid of {network.run})" if several_grids else "")
    fitted[key].sets.update(mine)
    floors[network.run] = fitted[key]
  return floors


def baseline_rows(floor: Floor) -> list[dict]:
  """Per-scan rows of both baselines of one floor on each of its test sets, by
  baseline, then set, then record.

  The histogram regression fills ``predicted_ml``; the intensity threshold
  fills ``predicted_ml`` (its segmentation's volume), ``dice`` (both NaN
  where it is not fitted) and the challenge metrics.
  """
  regression, threshold = floor.runs["histogram"], floor.runs["threshold"]
  rows = [{**scan_fields(regression, BASELINE_KIND, None, dataset, record),
           "predicted_ml": float(volume)}
          for dataset, recs in floor.sets.items()
          for record, volume in zip(recs, floor.regression.predict(recs))]
  for dataset, recs in floor.sets.items():
    for record, seg in tqdm.tqdm(zip(recs, floor.threshold.predict(recs)), total=len(recs),
                                 desc=f"{threshold} {dataset}", unit="scan", file=sys.stderr,
                                 leave=False):
      row = {**scan_fields(threshold, BASELINE_KIND, None, dataset, record),
             "predicted_ml": seg.volume_ml, "dice": seg.dice}
      if seg.mask is not None:
        row.update(segmentation_metrics({"seg": seg.mask}, load_reference(record)))
      rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# Summaries


def _groups(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
  """Rows grouped by the values of ``keys``, groups in order of first appearance."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return groups


def _is_number(value: Any) -> bool:
  return value is not None and math.isfinite(float(value))


def _values(rows: Sequence[dict], column: str) -> np.ndarray:
  """``(n,)`` float64 of a column over ``rows`` (None → NaN)."""
  return np.array([math.nan if r.get(column) is None else float(r[column]) for r in rows],
                  np.float64)


def _mean(values: Sequence[float] | np.ndarray) -> float:
  """Mean of the finite values; NaN when there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def _agreement(fn: Callable, a: np.ndarray, b: np.ndarray) -> float:
  """``fn(a, b)`` (an ICC) over the scans where both are finite; NaN below 2 scans."""
  ok = np.isfinite(a) & np.isfinite(b)
  return float(fn(a[ok], b[ok])) if ok.sum() >= 2 else math.nan


def _icc_row(group: Sequence[dict], n_boot: int, seed: int) -> dict[str, Any]:
  annotated, predicted = _values(group, "annotated_ml"), _values(group, "predicted_ml")
  ok = np.isfinite(annotated) & np.isfinite(predicted)
  low = high = math.nan
  if ok.sum() >= 2:
    low, high = stats.bootstrap_ci(metrics.icc_2_1, annotated[ok], predicted[ok],
                                   n_boot=n_boot, seed=seed, vectorized=True)
  return {"n": int(ok.sum()),
          "icc_2_1": _agreement(metrics.icc_2_1, annotated, predicted),
          "icc_2_1_ci_low": low, "icc_2_1_ci_high": high,
          "icc_3_1": _agreement(metrics.icc_3_1, annotated, predicted),
          "icc_2_1_soft": _agreement(metrics.icc_2_1, annotated,
                                     _values(group, "predicted_soft_ml")),
          "mean_dice": _mean(_values(group, "dice")),
          "mean_attention_dice": _mean(_values(group, "attention_dice"))}


def icc_table(rows: Sequence[dict], n_boot: int, seed: int) -> Table:
  """ICC(2,1) (5–95 % bootstrap CI), ICC(3,1) and mean Dice per network and dataset.

  Severity models (no volume) are left out. ``icc_2_1_soft`` uses the soft
  (summed probability) volume of segmentation models.
  """
  table = []
  for (run, kind, seed_, dataset), group in _groups(rows, ("run", "kind", "seed", "dataset")
                                                    ).items():
    if kind != "severity":
      table.append({"run": run, "kind": kind, "seed": seed_, "dataset": dataset,
                    **_icc_row(group, n_boot, seed)})
  columns = ["run", "kind", "seed", "dataset", "n", "icc_2_1", "icc_2_1_ci_low",
             "icc_2_1_ci_high", "icc_3_1", "icc_2_1_soft", "mean_dice", "mean_attention_dice"]
  return Table("icc", "Volume agreement and Dice per network (seed) and dataset", columns,
               table, note=f"CI: 5th–95th percentile of {n_boot} bootstrap resamples of "
               f"the scans (seed {seed}). Dice on the model grid; for weak networks the "
               "Dice is that of the thresholded attention map.")


def icc_mean_table(icc: Table) -> Table:
  """The per-network ICC table averaged over seeds (``icc_2_1_sd``: SD over seeds)."""
  table = []
  for (run, kind, dataset), group in _groups(icc.rows, ("run", "kind", "dataset")).items():
    values = _values(group, "icc_2_1")
    table.append({"run": run, "kind": kind, "dataset": dataset, "seeds": len(group),
                  "icc_2_1": float(values.mean()),
                  "icc_2_1_sd": float(values.std(ddof=1)) if len(group) > 1 else math.nan,
                  "icc_3_1": float(_values(group, "icc_3_1").mean()),
                  "mean_dice": float(_values(group, "mean_dice").mean()),
                  "mean_attention_dice": float(_values(group, "mean_attention_dice").mean())})
  columns = ["run", "kind", "dataset", "seeds", "icc_2_1", "icc_2_1_sd", "icc_3_1",
             "mean_dice", "mean_attention_dice"]
  return Table("icc_mean", "Volume agreement and Dice, mean over seeds", columns, table)


def comparison_table(icc_mean: Table) -> Table:
  """Weak − strong seed-mean ICC(2,1) for every (weak run, strong run) pair and dataset."""
  by_run = _groups(icc_mean.rows, ("run", "kind"))
  weak = [run for run, kind in by_run if kind == "weak"]
  strong = [run for run, kind in by_run if kind == "strong"]
  table = []
  for w in weak:
    for s in strong:
      strong_icc = {r["dataset"]: r["icc_2_1"] for r in by_run[(s, "strong")]}
      for r in by_run[(w, "weak")]:
        if r["dataset"] in strong_icc:
          table.append({"dataset": r["dataset"], "weak_run": w, "strong_run": s,
                        "weak_icc_2_1": r["icc_2_1"], "strong_icc_2_1": strong_icc[r["dataset"]],
                        "difference": r["icc_2_1"] - strong_icc[r["dataset"]]})
  note = "" if table else "Needs at least one weak and one strong run on a common dataset."
  return Table("comparison", "Weak vs strong labels: ICC(2,1), mean over seeds",
               ["dataset", "weak_run", "strong_run", "weak_icc_2_1", "strong_icc_2_1",
                "difference"], table, note=note)


def challenge_table(rows: Sequence[dict]) -> Table:
  """Means of the challenge metrics per network and dataset (scans with a mask).

  Means are over the scans where a metric is finite (HD95 is NaN for an
  empty segmentation, AVD infinite for an empty reference); ``n`` counts the
  scans with a mask.
  """
  table = []
  for (run, kind, seed, dataset), group in _groups(rows, ("run", "kind", "seed", "dataset")
                                                   ).items():
    scored = [r for r in group if _is_number(r.get("challenge_dice"))]
    if scored:
      table.append({"run": run, "kind": kind, "seed": seed, "dataset": dataset,
                    "n": len(scored), **{c: _mean(_values(scored, c)) for c in CHALLENGE.values()}})
  return Table("challenge", "WMH-challenge metrics of the model segmentations (means)",
               ["run", "kind", "seed", "dataset", "n", *CHALLENGE.values()], table,
               note="Weak networks are scored on their thresholded attention map.")


def confounder_table(rows: Sequence[dict]) -> Table:
  """Paper §2.4: OLS of annotated on predicted volume, without/with confounders.

  For every weak network on the local test set whose scans all carry the
  same (non-empty) set of confounder volumes; ``r_<name>`` is the Pearson r of
  the annotated volume with each confounder, ``p_<name>`` its coefficient's
  p-value in the full model.
  """
  table, notes = [], []
  for (run, seed), group in _groups([r for r in rows if r["kind"] == "weak"
                                     and r["dataset"] == LOCAL], ("run", "seed")).items():
    group = [r for r in group if _is_number(r["annotated_ml"]) and _is_number(r["predicted_ml"])]
    present = [c for c in cohort.CONFOUNDERS if all(_is_number(r.get(c)) for r in group)]
    if not present or len(group) < len(present) + 3:
      notes.append(f"{run} seed {seed}: " + ("no confounder volumes in the manifest" if not
                   present else f"{len(group)} scans are too few for {len(present)} confounders"))
      continue
    confounders = {c: _values(group, c) for c in present}
    annotated = _values(group, "annotated_ml")
    fit = stats.confounder_regression(annotated, _values(group, "predicted_ml"), confounders)
    pearson = stats.pearson_with_confounders(annotated, confounders)
    table.append({"run": run, "seed": seed,
                  **{k: v for k, v in fit.items() if k != "confounder_p"},
                  **{f"r_{c}": pearson[c] for c in present},
                  **{f"p_{c}": fit["confounder_p"][c] for c in present}})
  columns = (["run", "seed", "n", "r2_base", "r2_full", "coef_base", "coef_full", "p_base",
              "p_full", "f_confounders", "p_f_confounders", "df_confounders"]
             + [f"r_{c}" for c in cohort.CONFOUNDERS] + [f"p_{c}" for c in cohort.CONFOUNDERS])
  note = "; ".join(notes) or ("" if table else "No weak run on the local test set.")
  return Table("confounders", "Weak networks, local test set: annotated ~ predicted "
               "(+ confounders)", columns, table, note=note)


def dice_vs_icc_table(icc: Table) -> Table:
  """Pearson/Spearman of mean Dice vs ICC(2,1) across networks, per dataset.

  Baselines are left out. Scope ``all`` pools every network with a Dice; with several model kinds,
  each kind also gets its own row. Needs at least 3 networks, else n/a.
  """
  table = []
  for (dataset,), group in _groups(icc.rows, ("dataset",)).items():
    group = [r for r in group if r["kind"] != BASELINE_KIND and _is_number(r["mean_dice"])
             and _is_number(r["icc_2_1"])]
    kinds = list(dict.fromkeys(r["kind"] for r in group))
    for scope in ["all"] + (kinds if len(kinds) > 1 else []):
      nets = [r for r in group if scope in ("all", r["kind"])]
      row = {"dataset": dataset, "scope": scope, "networks": len(nets)}
      if len(nets) >= 3:
        row.update(stats.correlation(_values(nets, "mean_dice"), _values(nets, "icc_2_1")))
      table.append(row)
  return Table("dice_vs_icc", "Segmentation (mean Dice) vs volume (ICC(2,1)) across networks",
               ["dataset", "scope", "networks", "pearson_r", "pearson_p", "spearman_rho",
                "spearman_p"], table, note="n/a: fewer than 3 networks.")


def _beats(network: float | None, baseline: float | None) -> str | None:
  """``yes`` when the network's value is higher, ``no`` when not, None when either is missing."""
  if not (_is_number(network) and _is_number(baseline)):
    return None
  return "yes" if network > baseline else "no"


def floor_table(icc_mean: Table, floors: Mapping[str, Floor]) -> Table:
  """Does each network beat its baselines? Per dataset and network run, seed means.

  ICC(2,1) against both baselines; mean Dice, for networks with a
  segmentation head (:data:`SEGMENTATION_KINDS`), against the intensity
  threshold.

  Args:
    icc_mean: the seed-mean table (:func:`icc_mean_table`), baselines included.
    floors: network run name → its baselines (:func:`fit_floors`).
  """
  by_run = {(r["run"], r["dataset"]): r for r in icc_mean.rows}
  table = []
  for (dataset,), group in _groups(icc_mean.rows, ("dataset",)).items():
    for network in (r for r in group if r["run"] in floors):
      runs = floors[network["run"]].runs
      histogram = by_run.get((runs["histogram"], dataset), {})
      threshold = by_run.get((runs["threshold"], dataset), {})
      row = {"dataset": dataset, "run": network["run"], "kind": network["kind"],
             "icc_2_1": network["icc_2_1"], "histogram_icc_2_1": histogram.get("icc_2_1"),
             "beats_histogram_icc": _beats(network["icc_2_1"], histogram.get("icc_2_1")),
             "threshold_icc_2_1": threshold.get("icc_2_1"),
             "beats_threshold_icc": _beats(network["icc_2_1"], threshold.get("icc_2_1"))}
      if network["kind"] in SEGMENTATION_KINDS:
        row.update({"mean_dice": network["mean_dice"], "threshold_dice": threshold.get("mean_dice"),
                    "beats_threshold_dice": _beats(network["mean_dice"],
                                                   threshold.get("mean_dice"))})
      table.append(row)
  fits = [f"`{floor.runs[method]}`: {model.describe()}"
          for floor in dict.fromkeys(floors.values())
          for method, model in (("histogram", floor.regression), ("threshold", floor.threshold))]
  return Table("baselines", "Does each network beat the non-deep baselines? (mean over seeds)",
               ["dataset", "run", "kind", "icc_2_1", "histogram_icc_2_1", "beats_histogram_icc",
                "threshold_icc_2_1", "beats_threshold_icc", "mean_dice", "threshold_dice",
                "beats_threshold_dice"], table,
               note="yes: the network's value is higher than the baseline's. Dice only for "
               "networks with a segmentation head. " + "; ".join(fits) + ".")


def severity_table(rows: Sequence[dict]) -> Table:
  """Severity pilot: ICC(2,1) and accuracy of predicted vs true class (0–4)."""
  table = []
  for (run, seed, dataset), group in _groups([r for r in rows if r["kind"] == "severity"],
                                             ("run", "seed", "dataset")).items():
    truth, pred = _values(group, "severity"), _values(group, "predicted_severity")
    ok = np.isfinite(truth)
    table.append({"run": run, "seed": seed, "dataset": dataset, "n": int(ok.sum()),
                  "icc_2_1": _agreement(metrics.icc_2_1, truth, pred),
                  "accuracy": float(np.mean(truth[ok] == pred[ok])) if ok.any() else math.nan})
  return Table("severity", "Severity pilot: predicted vs true severity class",
               ["run", "seed", "dataset", "n", "icc_2_1", "accuracy"], table,
               note="" if table else "No severity run was given.")


def datasets_table(rows: Sequence[dict]) -> Table:
  """Scans per dataset and network: all, with an annotated volume, with a Dice."""
  table = []
  for (dataset, run, seed), group in _groups(rows, ("dataset", "run", "seed")).items():
    table.append({"dataset": dataset, "run": run, "seed": seed, "scans": len(group),
                  "annotated_volume": sum(_is_number(r["annotated_ml"]) for r in group),
                  "dice_scored": sum(_is_number(r.get("dice")) for r in group)})
  return Table("datasets", "Test sets", ["dataset", "run", "seed", "scans", "annotated_volume",
                                         "dice_scored"], table)


def summarise(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, Table]:
  """Every summary table of the study from the per-scan rows (name → table)."""
  icc = icc_table(rows, n_boot, seed)
  icc_mean = icc_mean_table(icc)
  tables = [datasets_table(rows), icc, icc_mean, comparison_table(icc_mean),
            challenge_table(rows), confounder_table(rows), dice_vs_icc_table(icc),
            severity_table(rows)]
  return {table.name: table for table in tables}


def networks_table(networks: Sequence[Network]) -> Table:
  """Which checkpoint of which run was analysed."""
  return Table("networks", "Networks (best checkpoint of each seed)",
               ["run", "kind", "seed", "step", "workdir"],
               [{"run": n.run, "kind": n.kind, "seed": n.seed, "step": n.step,
                 "workdir": str(n.workdir)} for n in networks])


# ---------------------------------------------------------------------------
# Figures


def _axial(array: np.ndarray, z: int) -> np.ndarray:
  return np.asarray(array)[:, :, z]


def _example_panels(network: Network, record: dict, out: dict[str, Any],
                    with_image: bool) -> list[Panel]:
  """Panels of one network on one scan, at the axial slice with the most WMH."""
  loaded = pipeline.load_record(record)
  image, mask = loaded["image"][..., 0], loaded["mask"][..., 0] > 0
  z = int(np.argmax(mask.sum(axis=(0, 1))))
  segs = segmentations(out, records.preprocess_spec(network.config).spacing_mm)
  panels = [Panel("FLAIR + annotation", _axial(image, z), contour=_axial(mask, z))
            ] if with_image else []
  if "attention" in segs:
    panels += [Panel(f"{network.run} attention", _axial(out["attention"], z), cmap="inferno",
                     contour=_axial(loaded["brain"], z), contour_color="cyan"),
               Panel(f"{network.run} thresholded", _axial(image, z),
                     fill=_axial(segs["attention"], z))]
  if network.kind in SEGMENTATION_KINDS and "seg" in segs:
    panels.append(Panel(f"{network.run} p>0.5", _axial(image, z), fill=_axial(segs["seg"], z)))
  return panels


def example_figure_data(networks: Sequence[Network], sets: Sequence[dict[str, list[dict]]],
                        mesh: Mesh, count: int = 3) -> list[tuple[str, list[Panel]]]:
  """Fig. 3 panels for the ``count`` local test scans with the largest annotated volume.

  Uses the first seed of the first weak (else joint) run for the attention
  panels and of the first strong (else joint) run for the segmentation; each
  on its own grid, matched by ``scan_id``.

  Args:
    sets: the test sets of each network (:func:`evaluation_sets`), parallel to ``networks``.
  """
  def first(*kinds: str) -> int | None:
    return next((i for kind in kinds for i, n in enumerate(networks) if n.kind == kind), None)
  chosen = list(dict.fromkeys(i for i in (first("weak", "joint"), first("strong", "joint"))
                              if i is not None))
  if not chosen or LOCAL not in sets[chosen[0]]:
    return []
  local = [r for r in sets[chosen[0]][LOCAL] if r["has_mask"]]
  scan_ids = [r["scan_id"] for r in sorted(local, key=lambda r: -r["wmh_volume_ml"])[:count]]
  examples = {scan_id: [] for scan_id in scan_ids}
  for k, i in enumerate(chosen):
    mine = [r for r in sets[i].get(LOCAL, []) if r["scan_id"] in examples]
    for record, out in scan_outputs(networks[i], mine, mesh):
      examples[record["scan_id"]] += _example_panels(networks[i], record, out,
                                                     with_image=k == 0)
  return [(scan_id, panels) for scan_id, panels in examples.items() if panels]


def learning_curves(networks: Sequence[Network]) -> list[Curve]:
  """Validation curves (:data:`CURVE_METRICS`) of every network, from its ``metrics.jsonl``.

  A network without a log, or a metric never logged, gives no curve.
  """
  curves = []
  for network in networks:
    evals = logs.validation_records(network.workdir / "metrics.jsonl")
    for metric in CURVE_METRICS[network.kind]:
      points = [(int(r["step"]), float(r[metric])) for r in evals if metric in r]
      if points:
        steps, values = zip(*points)
        curves.append(Curve(network.run, network.kind, network.seed, metric,
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
                 _is_number(r["annotated_ml"]) and _is_number(r["predicted_ml"])]
  datasets = list(dict.fromkeys(r["dataset"] for r in icc.rows))
  external = [d for d in datasets if d != LOCAL] or datasets
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


# ---------------------------------------------------------------------------
# The study


def load_networks(run_paths: Sequence[str | Path], mesh: Mesh,
                  seeds: Collection[int] | None = None) -> list[Network]:
  """Every seed (or each of ``seeds``) of every run, in order; one compiled
  forward per architecture.

  Raises:
    WMHError: unreadable runs, or two runs with one name.
  """
  forwards: dict[str, inference.ForwardFn] = {}
  networks: list[Network] = []
  for path in run_paths:
    if any(n.run == run_name(path) for n in networks):
      raise WMHError(path, f"a second run named {run_name(path)!r}; rename one workdir")
    networks += load_run(path, mesh, forwards, seeds)
  return networks


def network_evaluation_sets(networks: Sequence[Network], datasets: Sequence[str] | None
                      ) -> list[dict[str, list[dict]]]:
  """:func:`evaluation_sets` of each network (resolved once per data config).

  Raises:
    WMHError: a requested dataset that no run has.
  """
  cached: dict[str, dict[str, list[dict]]] = {}
  sets = []
  for network in networks:
    key = network.config.data.to_json(sort_keys=True)
    if key not in cached:
      cached[key] = evaluation_sets(network.config, datasets)
    sets.append(cached[key])
  missing = [d for d in datasets or [] if not any(d in s for s in sets)]
  if missing:
    raise WMHError(None, f"no run has the dataset(s) {missing}")
  return sets


def run_analysis(run_paths: Sequence[str | Path], out: str | Path,
                 datasets: Sequence[str] | None = None, n_boot: int = 1000,
                 boot_seed: int = 0, seeds: Collection[int] | None = None
                 ) -> dict[str, Path]:
  """Restores every run (only ``seeds``, if given), predicts every test set and
  writes the study to ``out``.

  Returns:
    Name → path of every written file (``predictions``, ``report``, tables
    as ``table:<name>``, figures as ``figure:<name>``).

  Raises:
    WMHError: see :func:`load_networks` and :func:`network_evaluation_sets`.
  """
  mesh = sharding.make_mesh()
  networks = load_networks(run_paths, mesh, seeds)
  sets = network_evaluation_sets(networks, datasets)
  floors = fit_floors(networks, sets)
  rows = [row for network, mine in zip(networks, sets)
          for row in predict_network(network, mine, mesh)]
  rows += [row for floor in dict.fromkeys(floors.values()) for row in baseline_rows(floor)]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = {"predictions": out / "predictions.csv"}
  predict.write_csv(written["predictions"], _present_columns(rows), rows)
  tables = {"networks": networks_table(networks), **summarise(rows, n_boot, boot_seed)}
  tables["baselines"] = floor_table(tables["icc_mean"], floors)
  for table in tables.values():
    written[f"table:{table.name}"] = report.write_table(out / "tables", table)[0]
  figures = write_figures(out, rows, tables["icc"], example_figure_data(networks, sets, mesh),
                          learning_curves(networks))
  written.update({f"figure:{name}": path for name, path in figures.items()})
  written["report"] = report.write_report(out, tables, figures)
  return written


def _present_columns(rows: Sequence[dict]) -> list[str]:
  """:data:`COLUMNS` that at least one row fills."""
  return [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m wmh_jax.analysis",
      description="Evaluate trained runs on their test sets; write tables, figures, REPORT.md.")
  parser.add_argument("--runs", required=True,
                      help="comma-separated training workdirs (seed sweeps or single runs)")
  parser.add_argument("--out", required=True, type=Path, help="output folder")
  parser.add_argument("--datasets", default="",
                      help=f"comma-separated test sets (default: all; e.g. {LOCAL},"
                      f"{','.join(EXTERNAL_DOMAINS)})")
  parser.add_argument("--seeds", default="",
                      help="comma-separated seeds to analyse (default: every seed_* run)")
  parser.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples per CI")
  parser.add_argument("--boot_seed", type=int, default=0, help="bootstrap seed")
  return parser.parse_args(argv)


def _seeds(flag: str) -> list[int] | None:
  try:
    return [int(s) for s in flag.split(",") if s] or None
  except ValueError:
    raise WMHError(None, f"--seeds={flag!r}: expected comma-separated integers") from None


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns the exit code (0 ok, 2 bad runs or datasets)."""
  args = parse_args(argv)
  runs = [p for p in args.runs.split(",") if p]
  datasets = [d for d in args.datasets.split(",") if d] or None
  try:
    if not runs:
      raise WMHError(None, "--runs is empty")
    seeds = _seeds(args.seeds)
    written = run_analysis(runs, args.out, datasets, args.n_boot, args.boot_seed, seeds)
  except WMHError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"analysis: {len(written)} files under {args.out}; see {written['report']}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
