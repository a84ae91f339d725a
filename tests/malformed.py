"""A corpus of malformed inputs, generated on the fly for tests/test_reliability.py.

Every case is one way a scan, a label map or a manifest can be wrong, with the
file the error must name and a fragment of the reason it must give. The scan
and label cases are built around one good image (its grid gives the label
cases their shapes and affine), so each case is wrong in one respect only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np

# The unreadable case: root reads any file whatever its mode, so under root the
# permission check is simulated for this file name (see ``unreadable_paths``).
UNREADABLE = "unreadable.nii.gz"


@dataclasses.dataclass(frozen=True)
class Case:
  """One malformed scan or label map.

  Attributes:
    kind: short name of what is wrong.
    image: the scan to load.
    mask: the label map to load with it (label cases only).
    culprit: the file the error must name (``mask`` for label cases).
    reason: a fragment the error's reason must contain.
  """
  kind: str
  image: Path
  mask: Path | None
  culprit: Path
  reason: str


@dataclasses.dataclass(frozen=True)
class ManifestCase:
  """One malformed manifest: ``path`` must be named with ``reason``."""
  kind: str
  path: Path
  reason: str


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
  """Writes ``data`` with ``affine`` through nibabel; returns ``path``."""
  nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64)), path)
  return path


def _raw_nifti(path: Path, shape: tuple[int, ...],
               pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0),
               magic: bytes = b"n+1\0") -> Path:
  """A hand-written single-file NIfTI-1 header (+ 64 bytes of data), no fix-ups.

  nibabel rewrites zero/negative voxel sizes when saving, so such headers are
  written byte by byte; ``shape`` may declare far more voxels than the file holds.
  """
  header = nib.Nifti1Header()
  header.set_data_dtype(np.float32)
  header.set_data_shape(shape)
  header["pixdim"][1:4] = pixdim
  header["vox_offset"] = 352
  block = bytearray(header.binaryblock)
  block[344:348] = magic
  path.write_bytes(bytes(block) + b"\0" * 4 + np.ones(16, np.float32).tobytes())
  return path


def _with(data: np.ndarray, index: tuple[int, int, int], value: float) -> np.ndarray:
  """A float32 copy of ``data`` with one voxel set to ``value``."""
  out = np.array(data, np.float32)
  out[index] = value
  return out


def write_scan_corpus(directory: Path, good_image: Path) -> list[Case]:
  """Writes the malformed scans and label maps next to copies of ``good_image``.

  Args:
    directory: output folder (created).
    good_image: a valid 3D NIfTI scan; the label cases pair a bad label map
      with this scan.

  Returns:
    The cases in a fixed order: scan cases first, then label cases.
  """
  directory.mkdir(parents=True, exist_ok=True)
  img = nib.load(good_image)
  data = np.asarray(img.dataobj, np.float32)
  affine = img.affine
  shape = data.shape
  centre = tuple(s // 2 for s in shape)
  raw = good_image.read_bytes()
  d = directory
  (d / "folder.nii.gz").mkdir(exist_ok=True)
  unreadable = d / UNREADABLE
  unreadable.write_bytes(raw)
  os.chmod(unreadable, 0)
  sheared = np.array(affine, np.float64)
  sheared[0, 1] = 0.3
  singular = np.array(affine, np.float64)
  singular[:3, 1] = singular[:3, 0]
  (d / "truncated.nii.gz").write_bytes(raw[:len(raw) * 6 // 10])
  uncompressed = _save(d / "truncated.nii", data, affine).read_bytes()
  (d / "truncated.nii").write_bytes(uncompressed[:len(uncompressed) // 2])
  series = np.stack([data, data], -1)
  scans = {
      "truncated_gzip": (d / "truncated.nii.gz", "corrupt or truncated data"),
      "truncated_nii": (d / "truncated.nii", "corrupt or truncated data"),
      "wrong_magic": (_raw_nifti(d / "magic.nii", (16, 16, 8), magic=b"XYZ\0"),
                      "corrupt or not a NIfTI file"),
      "image_2d": (_save(d / "flat.nii.gz", data[..., 0], affine), "not a 3D volume"),
      "image_4d": (_save(d / "series.nii.gz", series, affine), "not a 3D volume"),
      "image_5d": (_save(d / "five.nii.gz", series[..., None, :], affine), "not a 3D volume"),
      "nan": (_save(d / "nan.nii.gz", _with(data, centre, np.nan), affine),
              "contains NaN or Inf values"),
      "inf": (_save(d / "inf.nii.gz", _with(data, centre, np.inf), affine),
              "contains NaN or Inf values"),
      "all_zero": (_save(d / "zero.nii.gz", np.zeros(shape, np.float32), affine),
                   "image is all zero"),
      "zero_spacing": (_raw_nifti(d / "spacing0.nii", (16, 16, 8), (0.0, 1.0, 1.0)),
                       "invalid voxel spacing"),
      "negative_spacing": (_raw_nifti(d / "spacingneg.nii", (16, 16, 8), (1.0, -1.0, 1.0)),
                           "invalid voxel spacing"),
      "sheared_affine": (_save(d / "sheared.nii.gz", data, sheared), "sheared affine"),
      "singular_affine": (_save(d / "singular.nii.gz", data, singular),
                          "degenerate (singular or non-finite) affine"),
      "huge_dimension": (_raw_nifti(d / "huge.nii", (32000, 32000, 32000)),
                         "absurd dimensions"),
      "folder": (d / "folder.nii.gz", "is a directory"),
      "missing": (d / "missing.nii.gz", "file not found"),
      "unreadable": (unreadable, "unreadable (permission denied)"),
  }
  cases = [Case(kind, path, None, path, reason) for kind, (path, reason) in scans.items()]
  labels = np.zeros(shape, np.float32)
  shifted = np.array(affine, np.float64)
  shifted[:3, 3] += 0.5
  masks = {
      "mask_shape": (_save(d / "mask_shape.nii.gz", labels[:, :, :-1], affine),
                     f"does not match image shape {shape}"),
      "mask_affine": (_save(d / "mask_affine.nii.gz", labels, shifted),
                      "label affine does not match the image affine"),
      "mask_value_3": (_save(d / "mask_three.nii.gz", _with(labels, centre, 3.0), affine),
                       "label values must be 0, 1 or 2; found [3.0]"),
      "mask_value_half": (_save(d / "mask_half.nii.gz", _with(labels, centre, 0.5), affine),
                          "label values must be 0, 1 or 2; found [0.5]"),
      "mask_nan": (_save(d / "mask_nan.nii.gz", _with(labels, centre, np.nan), affine),
                   "label values must be 0, 1 or 2; found [nan]"),
  }
  cases += [Case(kind, good_image, path, path, reason) for kind, (path, reason) in masks.items()]
  return cases


def unreadable_paths(cases: list[Case]) -> set[str]:
  """Paths that must not be readable; empty unless running as root (who can read them)."""
  if os.geteuid() != 0:
    return set()
  return {str(c.image) for c in cases if c.image.name == UNREADABLE}


def write_manifest_corpus(directory: Path, good_image: Path) -> list[ManifestCase]:
  """Writes malformed manifests (one problem each) that list ``good_image``."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "a_folder").mkdir(exist_ok=True)
  header = "subject_id,scan_id,image\n"
  row = f"s1,scan1,{good_image}\n"
  texts = {
      "empty_manifest": ("", "empty manifest (no header)"),
      "header_only": (header, "empty manifest (no data rows)"),
      "missing_column": (f"subject_id,image\ns1,{good_image}\n",
                         "column 'scan_id': missing required column"),
      "duplicate_ids": (header + row + f"s2,scan1,{good_image}\n",
                        "row 2, column 'scan_id': duplicate scan_id 'scan1' (first in row 1)"),
      "folder_in_manifest": (header + f"s1,scan1,{directory / 'a_folder'}\n",
                             "row 1, column 'image': not a regular file"),
  }
  cases = []
  for kind, (text, reason) in texts.items():
    path = directory / f"{kind}.csv"
    path.write_text(text)
    cases.append(ManifestCase(kind, path, reason))
  return cases
