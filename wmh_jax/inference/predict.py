"""Inference CLI: WMH volume (mL) and native-space maps for new FLAIR scans.

Reads NIfTI files, folders or manifests; preprocesses each scan exactly as in
training (:func:`wmh_jax.data.nifti.preprocess`, once per distinct grid); runs
every network of every group (:mod:`wmh_jax.inference.restore`; a seed sweep is an
ensemble); writes ``volumes.csv`` (:func:`csv_columns`), native-space NIfTI maps
(:func:`group_maps`, :func:`save_native`) and a per-scan ``done.json`` for
``--resume``. A bad scan gets its reason as ``status`` and the others carry on.
Usage, outputs and exit codes: README.md, "Prediction on new scans".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tqdm
from absl import flags
from jax.sharding import Mesh

from wmh_jax.data import bids, manifest, nifti
from wmh_jax.errors import InputError, WMHError
from wmh_jax.evaluation import attention as attention_lib, conformal, ood
from wmh_jax.inference import derivatives, qc, restore
from wmh_jax.models import kinds
from wmh_jax.runtime import cli, fileio, sharding

# Ensemble statistic column prefix of each volume output.
STAT_PREFIX = {"volume_ml": "", "seg_volume_ml": "seg_", "soft_volume_ml": "soft_"}
DONE = "done.json"
CSV_NAME = "volumes.csv"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ---------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class ScanInput:
  """One scan to predict.

  Attributes:
    scan_id: the manifest's scan_id, or the file name without .nii(.gz).
    path: the NIfTI file (may not exist; loading reports it).
    folder: unique, filesystem-safe output sub-folder name.
  """
  scan_id: str
  path: Path
  folder: str


def _stem(path: Path) -> str:
  """File name without ``.nii.gz`` / ``.nii``."""
  for suffix in _NIFTI_SUFFIXES:
    if path.name.endswith(suffix):
      return path.name[:-len(suffix)]
  return path.name


def _expand(arg: str) -> list[tuple[str, Path]]:
  """(scan_id, path) pairs of one positional argument: file, folder or manifest."""
  path = Path(arg)
  if path.is_dir():
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.name.endswith(_NIFTI_SUFFIXES))
    return [(_stem(p), p) for p in files]
  if path.suffix.lower() == ".csv":
    return [(row["scan_id"], Path(row["image"])) for row in manifest.read_manifest(path)]
  return [(_stem(path), path)]


def collect_inputs(args: Sequence[str]) -> list[ScanInput]:
  """Expands files, folders and manifests into scans, in argument order.

  Output folders are the scan ids with characters other than letters,
  digits, ``.``, ``_`` and ``-`` replaced by ``_``; repeated names get a
  ``_2``, ``_3``... suffix.

  Raises:
    ManifestError: for an invalid manifest.
  """
  scans, used = [], set()
  for arg in args:
    for scan_id, path in _expand(arg):
      base = re.sub(r"[^A-Za-z0-9._-]", "_", scan_id).lstrip(".") or "scan"
      folder, n = base, 1
      while folder in used:
        n += 1
        folder = f"{base}_{n}"
      used.add(folder)
      scans.append(ScanInput(scan_id, path, folder))
  return scans


# ---------------------------------------------------------------------------
# Ensembles


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
  """Ensemble mean and sample SD (ddof=1) over seeds; the SD is NaN for one seed."""
  values = np.asarray(values, np.float64)
  sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
  return float(values.mean()), sd


def majority_vote(classes: Sequence[int]) -> int:
  """The most frequent class; ties go to the lower class."""
  return int(np.bincount(np.asarray(classes, np.int64)).argmax())


def ensemble(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Aggregates one group's per-seed outputs for one scan.

  Args:
    outputs: :func:`wmh_jax.inference.restore.predict_image` results of the group's models.

  Returns:
    ``mean_ml``/``sd_ml`` of ``volume_ml`` (and ``seg_``/``soft_`` of the
    other volumes), see :func:`mean_sd`; ``severity_vote`` by
    :func:`majority_vote`; ``attention``/``seg_prob`` the voxel-wise mean
    ``(x, y, z)`` maps.
  """
  first = outputs[0]
  result: dict[str, Any] = {}
  for key, prefix in STAT_PREFIX.items():
    if key in first:
      result[f"{prefix}mean_ml"], result[f"{prefix}sd_ml"] = mean_sd([o[key] for o in outputs])
  if "severity" in first:
    result["severity_vote"] = majority_vote([o["severity"] for o in outputs])
  for key in ("attention", "seg_prob"):
    if key in first:
      result[key] = np.mean([o[key] for o in outputs], axis=0)
  return result


def group_maps(ens: dict[str, Any], spacing_mm: tuple[float, float, float]
               ) -> dict[str, tuple[np.ndarray, int]]:
  """Model-grid maps to write for a group: name -> (array (x,y,z), to_native order).

  The attention mask keeps the ``round(mean_ml * 1000 / voxel mm³)``
  highest-attention voxels (paper §2.2); the segmentation mask is p > 0.5.
  """
  maps: dict[str, tuple[np.ndarray, int]] = {}
  if "attention" in ens:
    count = attention_lib.predicted_voxels(ens["mean_ml"], spacing_mm)
    maps["attention"] = (ens["attention"], 1)
    maps["attention_mask"] = (attention_lib.threshold_to_volume(ens["attention"], count), 0)
  if "seg_prob" in ens:
    maps["prob"] = (ens["seg_prob"], 1)
    maps["mask"] = (ens["seg_prob"] > 0.5, 0)
  return maps


# ---------------------------------------------------------------------------
# Writing


def save_native(path: Path, model_map: np.ndarray, geometry: nifti.Geometry, order: int) -> None:
  """Writes a model-grid map on the scan's native grid with its original affine.

  Args:
    path: ``.nii.gz`` output (written atomically).
    model_map: ``geometry.shape`` (x, y, z) map on the model grid.
    geometry: the scan's :class:`~wmh_jax.data.nifti.Geometry`.
    order: 1 continuous map (float32, trilinear); 0 binary mask (uint8,
      volume-preserving), see :func:`wmh_jax.data.nifti.to_native`.
  """
  native = nifti.to_native(model_map, geometry, order=order)
  if order == 0:
    native = native.astype(np.uint8)
  nifti.save_nifti(path, native, geometry.native_affine)


def csv_columns(groups: dict[str, list[restore.Network]]) -> list[str]:
  """volumes.csv header for these model groups (see module docstring)."""
  columns = ["scan_id", "path", "status"]
  for group, models in groups.items():
    kind = models[0].kind
    columns += [f"{m.name}_{key}" for m in models for key in kinds.get(kind).predict_columns]
    columns += [f"{group}_{key}" for key in _group_keys(kind)]
    columns += [f"{group}_model_spacing_mm", f"{group}_model_shape"]
  return columns + ["native_spacing_mm", "native_shape"]


def _group_keys(kind: str) -> list[str]:
  """Ensemble columns (keys of :func:`ensemble`, then the interval of ``mean_ml``) of a kind."""
  keys = []
  for key in kinds.get(kind).predict_columns:
    if key == "severity":
      keys.append("severity_vote")
    else:
      keys += [f"{STAT_PREFIX[key]}mean_ml", f"{STAT_PREFIX[key]}sd_ml"]
    if key == "volume_ml":
      keys += ["lo_ml", "hi_ml"]
  if kinds.get(kind).volume_head:
    keys += ["ood_score", "ood_flag"]
  return keys


def group_ood(models: Sequence[restore.Network], outputs: Sequence[dict[str, Any]]
              ) -> dict[str, Any]:
  """A group's out-of-distribution score of one scan (`evaluation.ood`): the mean over its
  runs of each run's score, flagged (1) above the mean of their thresholds; blank where
  a run has no stored reference (trained before they were stored, or without a refit)."""
  references = [m.ood_reference for m in models]
  if None in references:
    return {"ood_score": "", "ood_flag": ""}
  score = float(np.mean([r.scores(o["pooled"][None])[0] for r, o in zip(references, outputs)]))
  return {"ood_score": score, "ood_flag": int(score > ood.ensemble_threshold(references))}


def _triple(values: Sequence[float]) -> str:
  """``1.4x1.4x4.2`` / ``112x128x32``."""
  return "x".join(f"{float(v):g}" for v in values)


# ---------------------------------------------------------------------------
# One scan


def _base_row(item: ScanInput, groups: dict[str, list[restore.Network]]) -> dict[str, Any]:
  """Row fields known before the scan is read."""
  row: dict[str, Any] = {"scan_id": item.scan_id, "path": os.path.abspath(item.path)}
  for group, models in groups.items():
    row[f"{group}_model_spacing_mm"] = _triple(models[0].spec.spacing_mm)
    row[f"{group}_model_shape"] = _triple(models[0].spec.shape)
  return row


def _predict_scan(item: ScanInput, groups: dict[str, list[restore.Network]], mesh: Mesh, tta: bool,
                  timing: dict[str, float],
                  calibrations: dict[str, conformal.Calibration | None]
                  ) -> tuple[dict[str, Any], dict[str, dict],
                             dict[nifti.PreprocessSpec, nifti.Preprocessed]]:
  """Loads, preprocesses (once per grid) and runs every model on one scan.

  Returns (row values, ensemble of each group, the scan on each grid); sets
  seconds in ``timing["preprocess"]`` and ``timing["model"]``. A group's
  ``lo_ml``/``hi_ml`` are its calibration's interval around ``mean_ml``
  (blank without a calibration).
  """
  start = time.perf_counter()
  scan = nifti.load_image(item.path)
  specs = {m.spec for models in groups.values() for m in models}
  pre = {spec: nifti.preprocess(scan, None, spec) for spec in specs}
  timing["preprocess"] = time.perf_counter() - start
  start = time.perf_counter()
  row: dict[str, Any] = {}
  ensembles = {}
  for group, models in groups.items():
    outputs = [restore.predict_image(m, pre[m.spec].image, mesh, tta) for m in models]
    for model, out in zip(models, outputs):
      row.update({f"{model.name}_{k}": out[k] for k in kinds.get(model.kind).predict_columns})
    ensembles[group] = ensemble(outputs)
    if "mean_ml" in ensembles[group]:
      calibration = calibrations.get(group)
      low, high = (conformal.interval(calibration, ensembles[group]["mean_ml"])
                   if calibration is not None else ("", ""))
      ensembles[group].update(lo_ml=float(low) if calibration else "",
                              hi_ml=float(high) if calibration else "")
    if kinds.get(models[0].kind).volume_head:
      ensembles[group].update(group_ood(models, outputs))
    row.update({f"{group}_{k}": ensembles[group][k] for k in _group_keys(models[0].kind)})
  timing["model"] = time.perf_counter() - start
  native_spacing = np.linalg.norm(scan.native_affine[:3, :3], axis=0)
  row.update(native_spacing_mm=_triple(native_spacing),
             native_shape=_triple(scan.native_shape))
  return row, ensembles, pre


def _write_maps(folder: Path, groups: dict[str, list[restore.Network]], ensembles: dict[str, dict],
                geometries: dict[nifti.PreprocessSpec, nifti.Geometry]) -> list[str]:
  """Writes every group's native-space maps; returns the file names."""
  names = []
  for group, models in groups.items():
    spec = models[0].spec
    for suffix, (array, order) in group_maps(ensembles[group], spec.spacing_mm).items():
      name = f"{group}_{suffix}.nii.gz"
      save_native(folder / name, array, geometries[spec], order)
      names.append(name)
  return names


def _write_qc(folder: Path, groups: dict[str, list[restore.Network]], ensembles: dict[str, dict],
              grids: dict[nifti.PreprocessSpec, nifti.Preprocessed], row: dict[str, Any],
              scan_id: str) -> str:
  """``qc.png`` of one scan: the masks of the groups on the first group's grid (red:
  segmentation, cyan: attention), over that grid's scan."""
  spec = next(iter(groups.values()))[0].spec
  outlines = []
  for group, members in groups.items():
    if members[0].spec != spec:
      continue
    maps = group_maps(ensembles[group], spec.spacing_mm)
    outlines += [(maps[name][0], color) for name, color in (("mask", "red"),
                                                            ("attention_mask", "cyan"))
                 if name in maps]
  qc.write_montage(folder / "qc.png", grids[spec].image, outlines,
                   qc.title(scan_id, list(groups), row))
  return "qc.png"


def _finished(folder: Path, signature: dict) -> tuple[dict, list[str]] | None:
  """(stored row, file names) of a completed scan with the same signature, else None."""
  try:
    done = json.loads((folder / DONE).read_text())
  except (OSError, ValueError):
    return None
  complete = all((folder / name).is_file() for name in done.get("files", []))
  return (done["row"], done["files"]) if done.get("signature") == signature and complete else None


def bids_names(inputs: Sequence[ScanInput]) -> tuple[dict[str, bids.BidsName], dict[str, str]]:
  """Parsed BIDS names of the inputs by output folder, and the reason for each input
  without a usable one (not a BIDS name, or the same entities as an earlier input)."""
  names: dict[str, bids.BidsName] = {}
  errors: dict[str, str] = {}
  seen: dict[str, Path] = {}
  for item in inputs:
    try:
      name = bids.parse_name(item.path)
    except InputError as err:
      errors[item.folder] = err.reason + " (needed by --bids_out)"
      continue
    stem = name.stem(name.source_entities())
    if stem in seen:
      errors[item.folder] = f"same BIDS entities as {seen[stem]} (needed by --bids_out)"
      continue
    seen[stem] = item.path
    names[item.folder] = name
  return names, errors


# ---------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class BidsOutput:
  """Where and how ``predict`` writes BIDS derivatives (`wmh_jax.inference.derivatives`).

  Attributes:
    folder: the derivative dataset, e.g. ``<bids root>/derivatives/wmh_jax``.
    command: the command line, for ``dataset_description.json``.
  """
  folder: Path
  command: str


@dataclasses.dataclass
class Summary:
  """What a run did; ``timings`` holds per-scan seconds of processed scans."""
  processed: int = 0
  failed: int = 0
  skipped: int = 0
  timings: list[dict[str, float]] = dataclasses.field(default_factory=list)

  def line(self) -> str:
    """One-line summary with median seconds per scan by stage."""
    def median(stage: str) -> str:
      values = [t[stage] for t in self.timings]
      return f"{statistics.median(values):.3f}" if values else "n/a"
    return (f"predict: {self.processed} scans processed, {self.failed} failed, "
            f"{self.skipped} skipped (resume); median s/scan: preprocessing "
            f"{median('preprocess')}, model {median('model')}, writing {median('write')}")


def _report_failure(item: ScanInput, reason: str, row: dict[str, Any], rows: list[dict],
                    summary: Summary, out_dir: Path, columns: Sequence[str]) -> None:
  """One line on stderr; the scan's row gets ``reason`` as its status; volumes.csv rewritten."""
  tqdm.tqdm.write(f"{item.path}: {reason}", file=sys.stderr)
  rows.append({**row, "status": reason})
  fileio.write_csv(out_dir / CSV_NAME, columns, rows)
  summary.failed += 1


def predict(inputs: Sequence[ScanInput], models: Sequence[restore.Network], out_dir: Path,
            mesh: Mesh, *, tta: bool = False, resume: bool = False,
            interval_level: float = conformal.DEFAULT_LEVEL, qc_pictures: bool = False,
            bids_output: BidsOutput | None = None) -> Summary:
  """Predicts every scan, writing maps, ``done.json`` and volumes.csv as it goes.

  A scan that raises a :class:`WMHError` (or any other error) is reported on
  stderr and recorded with its reason as ``status``; the others carry on.
  Volume groups get split-conformal intervals at ``interval_level``, calibrated
  on their runs' stored validation predictions (`conformal.ensemble_calibration`).
  With ``qc_pictures``, each scan also gets ``qc.png`` and the run a ``qc.md``
  index (`wmh_jax.inference.qc`). With ``bids_output``, the maps and volumes are also laid out
  as a BIDS derivative dataset (`wmh_jax.inference.derivatives`); an input whose file name
  is not a BIDS name fails with that reason.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  groups = restore.group_networks(models)
  columns = csv_columns(groups)
  calibrations = {group: conformal.ensemble_calibration(
      [m.val_predictions for m in members], interval_level) for group, members in groups.items()}
  for group, calibration in calibrations.items():
    if calibration is None and "mean_ml" in _group_keys(groups[group][0].kind):
      tqdm.tqdm.write(f"{group}: no stored validation predictions (trained by an older "
                      "wmh-jax): volumes without intervals", file=sys.stderr)
  signature = {"models": [m.source for m in models], "tta": tta,
               "interval_level": interval_level, "qc": qc_pictures}
  names, name_errors = bids_names(inputs) if bids_output else ({}, {})
  rows: list[dict[str, Any]] = []
  summary = Summary()
  for item in tqdm.tqdm(inputs, desc="predict", unit="scan", file=sys.stderr):
    folder = out_dir / item.folder
    row, timing = _base_row(item, groups), {}
    if item.folder in name_errors:
      _report_failure(item, name_errors[item.folder], row, rows, summary, out_dir, columns)
      continue
    stored = _finished(folder, signature) if resume else None
    if stored is not None:
      if bids_output:
        try:
          derivatives.export_scan(bids_output.folder, names[item.folder], item.path, folder,
                                  stored[1], list(groups))
        except OSError as err:
          _report_failure(item, f"could not write its BIDS derivatives: {err.strerror or err}",
                          stored[0], rows, summary, out_dir, columns)
          continue
      rows.append(stored[0])
      summary.skipped += 1
      continue
    (folder / DONE).unlink(missing_ok=True)
    try:
      values, ensembles, grids = _predict_scan(item, groups, mesh, tta, timing, calibrations)
      start = time.perf_counter()
      folder.mkdir(exist_ok=True)
      files = _write_maps(folder, groups, ensembles,
                          {spec: p.geometry for spec, p in grids.items()})
      row.update(values, status="ok")
      if qc_pictures:
        files.append(_write_qc(folder, groups, ensembles, grids, row, item.scan_id))
      if bids_output:
        derivatives.export_scan(bids_output.folder, names[item.folder], item.path, folder,
                                files, list(groups))
      fileio.atomic_write_text(folder / DONE, json.dumps(
          {"row": row, "files": files, "signature": signature}, indent=1))
      rows.append(row)
      fileio.write_csv(out_dir / CSV_NAME, columns, rows)
      timing["write"] = time.perf_counter() - start
      summary.processed += 1
      summary.timings.append(timing)
    except Exception as err:  # pylint: disable=broad-except  # batch jobs carry on
      reason = (err.reason if isinstance(err, WMHError)
                else f"could not write its outputs: {err.strerror or err} (nothing half-written "
                     f"is left; rerun with --resume)" if isinstance(err, OSError)
                else f"unexpected error: {err!r}")
      _report_failure(item, reason, row, rows, summary, out_dir, columns)
  fileio.write_csv(out_dir / CSV_NAME, columns, rows)
  if bids_output:
    derivatives.write_volumes(bids_output.folder, columns, rows,
                              [names.get(item.folder) for item in inputs])
    roots = {derivatives.raw_root(names[item.folder], item.path) for item in inputs
             if item.folder in names}
    derivatives.write_description(bids_output.folder, bids_output.command,
                                  roots.pop() if len(roots) == 1 else None)
  if qc_pictures:
    qc.write_index(out_dir, [{**r, "folder": item.folder} for r, item in zip(rows, inputs)],
                   list(groups))
  return summary


def define_flags(values: flags.FlagValues) -> None:
  """The command's flags (on its own ``FlagValues``: `runtime.cli.parse_command`)."""
  flags.DEFINE_string("checkpoints", None, "comma-separated training workdirs (seed sweeps = "
                      "ensembles)", required=True, flag_values=values)
  flags.DEFINE_string("out", None, "output folder", required=True, flag_values=values)
  flags.DEFINE_bool("tta", False, "left-right flip test-time augmentation", flag_values=values)
  flags.DEFINE_bool("resume", False, "skip scans already finished", flag_values=values)
  flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint step to restore (default: "
                    "best validation score)", flag_values=values)
  flags.DEFINE_bool("qc", False, "also write <scan>/qc.png (slices with the predicted mask) and "
                    "a qc.md index sorted by out-of-distribution score", flag_values=values)
  flags.DEFINE_float("interval_level", conformal.DEFAULT_LEVEL, "nominal coverage of the "
                     "<group>_lo_ml/_hi_ml volume intervals (split-conformal, calibrated on the "
                     "run's validation scans)", flag_values=values)
  flags.DEFINE_string("bids_out", None, "also write a BIDS derivative dataset in this folder "
                      "(e.g. <bids root>/derivatives/wmh_jax): inputs must have BIDS names",
                      flag_values=values)
  flags.DEFINE_alias("bids-out", "bids_out", flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns the exit code (0 ok, 1 some scan failed, 2 usage error)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args, paths = cli.parse_command(
      "python -m wmh_jax.predict", "Predict WMH volume (mL) and native-space maps for FLAIR "
      "scans.", define_flags, argv, arguments="INPUT [INPUT ...]  (NIfTI files, folders of "
      "*.nii(.gz) or manifest CSVs)")
  out = Path(args.out)
  try:
    inputs = collect_inputs(paths)
    workdirs = [p for p in args.checkpoints.split(",") if p]
    if not inputs or not workdirs:
      raise WMHError(None, "no input scans found" if not inputs else "--checkpoints is empty")
    mesh = sharding.make_mesh()
    models = restore.load_networks(workdirs, mesh, args.which)
    restore.group_networks(models, same_grid=True)
  except WMHError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if not 0.0 < args.interval_level < 1.0:
    print(f"error: --interval_level must be in (0, 1), got {args.interval_level}",
          file=sys.stderr)
    return 2
  summary = predict(inputs, models, out, mesh, tta=args.tta, resume=args.resume,
                    interval_level=args.interval_level, qc_pictures=args.qc,
                    bids_output=None if args.bids_out is None else BidsOutput(
                        Path(args.bids_out),
                        shlex.join(["python", "-m", "wmh_jax.predict", *argv])))
  print(summary.line() + f" -> {out / CSV_NAME}", flush=True)
  return 1 if summary.failed else 0

