"""Preprocess every manifest row once; keep the model-grid arrays as ``.npz``.

NIfTI loading and resampling (:func:`wmh_jax.data.nifti.preprocess`) is the
slow part of the input pipeline, so it runs once per scan, here, and training
epochs only read the cached arrays.

Cache entry: ``cache_dir/<scan_id>-<key>.npz`` where ``key`` hashes the
absolute path, size and ``mtime_ns`` of the image and mask files, the
:class:`~wmh_jax.data.nifti.PreprocessSpec` and :data:`CACHE_VERSION`; editing
a file or changing the grid makes a new entry. Entries are written atomically
(temporary file, then rename), so an interrupted run leaves no partial entry.

Arrays in an entry:
  image: float32 ``spec.shape`` in [0, 1].
  brain: uint8 ``spec.shape`` in {0, 1}.
  mask: uint8 ``spec.shape`` WMH mask in {0, 1} (only with a mask file).
  label2: uint8 ``spec.shape`` other-pathology mask (only with a mask file).
  spacing_mm: float64 ``(3,)`` model-grid voxel size.
  geometry_json: str, :meth:`Geometry.to_dict` as JSON (for ``to_native``).
  native_mask_volume_ml: float64 scalar, WMH volume of the mask file on its own
    grid (only with a mask file).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tqdm

from wmh_jax.data import nifti
from wmh_jax.errors import WMHError
from wmh_jax.runtime import fileio

CACHE_VERSION = 1


def cache_key(row: dict, spec: nifti.PreprocessSpec) -> str:
  """Hash of the image/mask file identities (path, size, mtime_ns) and ``spec``.

  A file that cannot be stat'ed contributes only its path; preprocessing it
  then fails with a readable error, and nothing is cached under that key.
  """
  parts: list = [CACHE_VERSION, dataclasses.asdict(spec)]
  for column in ("image", "mask"):
    path = row.get(column)
    if not path:
      parts.append(None)
      continue
    path = os.path.abspath(path)
    try:
      stat = os.stat(path)
      parts.append([path, stat.st_size, stat.st_mtime_ns])
    except OSError:
      parts.append([path])
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _entry_path(row: dict, spec: nifti.PreprocessSpec, cache_dir: Path) -> Path:
  """``cache_dir/<scan_id, filesystem-safe>-<key>.npz``."""
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(row["scan_id"]))[:80]
  return cache_dir / f"{name}-{cache_key(row, spec)}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes an uncompressed ``.npz`` atomically (temp file in the same folder, rename)."""
  with fileio.atomic_path(path) as tmp, tmp.open("wb") as f:
    np.savez(f, **arrays)


def _build_entry(row: dict, spec: nifti.PreprocessSpec, out: Path) -> str | None:
  """Preprocesses one row into ``out``; returns the one-line error, or None.

  Runs in a worker process. A :class:`WMHError` (bad input) is returned as
  text; any other exception is a bug and propagates.
  """
  try:
    scan = nifti.load_image(row["image"])
    labels = nifti.load_labels(row["mask"], scan) if row.get("mask") else None
    pre = nifti.preprocess(scan, labels, spec)
  except WMHError as err:
    return str(err)
  arrays = {"image": pre.image.astype(np.float32),
            "brain": pre.brain.astype(np.uint8),
            "spacing_mm": np.asarray(spec.spacing_mm, np.float64),
            "geometry_json": np.asarray(json.dumps(pre.geometry.to_dict()))}
  if labels is not None:
    arrays["mask"] = pre.mask.astype(np.uint8)
    arrays["label2"] = pre.label2.astype(np.uint8)
    arrays["native_mask_volume_ml"] = np.float64(
        nifti.volume_ml(nifti.wmh_mask(labels), scan.spacing_mm))
  _save_npz(out, arrays)
  return None


def _optional_number(value) -> float | None:
  """A manifest cell as a float; None for a missing, empty or NaN cell."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  number = float(value)
  return None if math.isnan(number) else number


def _record(row: dict, entry: Path) -> dict:
  """The record of a cached row: the row's fields plus the canonical ones.

  ``wmh_volume_ml`` is the manifest's value, else the mask file's volume, else
  NaN (no volume label).
  """
  has_mask = bool(row.get("mask"))
  volume = _optional_number(row.get("wmh_volume_ml"))
  if volume is None and has_mask:
    with np.load(entry) as data:
      volume = float(data["native_mask_volume_ml"])
  severity = _optional_number(row.get("severity"))
  return {**row,
          "path": str(entry),
          "scan_id": str(row["scan_id"]),
          "subject_id": str(row["subject_id"]),
          "dataset": str(row.get("dataset") or ""),
          "split": str(row.get("split") or ""),
          "wmh_volume_ml": math.nan if volume is None else volume,
          "severity": -1 if severity is None else int(severity),
          "has_mask": has_mask}


def preprocessed_records(rows: Sequence[dict], spec: nifti.PreprocessSpec,
                         cache_dir: str | os.PathLike, workers: int = 2
                         ) -> tuple[list[dict], list[str]]:
  """Preprocesses (or reuses) every manifest row and returns its record.

  Rows not yet cached are preprocessed in a pool of ``workers`` spawned
  processes (in-process when ``workers <= 1`` or only one row is missing)
  behind a tqdm progress bar. A scan whose loading or preprocessing raises a
  :class:`WMHError` is reported on stderr (one line: file and reason) and
  skipped; the other scans carry on.

  Args:
    rows: manifest rows (``subject_id``, ``scan_id``, ``image`` and optionally
      ``mask``, ``wmh_volume_ml``, ``severity``, ``dataset``, ``split``, ...).
    spec: the model grid.
    cache_dir: folder of the ``.npz`` entries (created if missing).
    workers: preprocessing processes.
  Returns:
    ``(records, failures)``. Records, in row order, are the row's fields plus
    ``path`` (the ``.npz``), ``scan_id``, ``subject_id``, ``dataset``,
    ``split`` (str, "" when absent), ``wmh_volume_ml`` (float mL: the
    manifest's value, else the mask's, else NaN), ``severity`` (int, -1 when
    absent) and ``has_mask`` (bool). Failures are ``"<file>: <reason>"`` lines.
  """
  cache_dir = Path(cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  entries = [_entry_path(row, spec, cache_dir) for row in rows]
  todo = {entry: row for row, entry in zip(rows, entries) if not entry.exists()}
  errors: dict[Path, str] = {}
  with tqdm.tqdm(total=len(todo), desc="preprocess", unit="scan",
                 disable=not todo) as bar:
    if workers <= 1 or len(todo) <= 1:
      for entry, row in todo.items():
        error = _build_entry(row, spec, entry)
        if error is not None:
          errors[entry] = error
        bar.update()
    else:
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_build_entry, row, spec, entry): entry
                   for entry, row in todo.items()}
        for future in concurrent.futures.as_completed(futures):
          error = future.result()
          if error is not None:
            errors[futures[future]] = error
          bar.update()
  for error in errors.values():
    tqdm.tqdm.write(f"skipped {error}", file=sys.stderr)
  records = [_record(row, entry) for row, entry in zip(rows, entries)
             if entry not in errors]
  return records, list(errors.values())
