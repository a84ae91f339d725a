"""NIfTI I/O and the single preprocessing function shared by every stage.

Loading validates a scan and reorients it to the closest canonical RAS voxel
order. :func:`preprocess` then takes the RAS scan to the model grid:

1. resample to ``spec.spacing_mm`` (image: trilinear; masks: volume-preserving),
2. crop/pad to ``spec.shape`` centred on the bounding box of the brain,
3. percentile-normalise (1 %/99 % over brain voxels) to [0, 1].

Every step is recorded in a :class:`Geometry`, so that :func:`to_native` can
take model-grid maps back to the voxel grid of the input file.

Resampling geometry (used both ways): the target grid has
``round(ras_shape * ras_spacing / target_spacing)`` voxels per axis and shares
its centre with the RAS grid, so that both grids cover the same field of view
(voxel centres, not corners, at integer indices). Target voxel ``j`` sits at
continuous RAS voxel index ``offset + j * zoom`` with
``zoom = target_spacing / ras_spacing``.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage
import scipy.sparse

from wmh_jax.errors import InputError
from wmh_jax.runtime import fileio

MAX_DIM = 2048                 # voxels along one axis
MAX_VOXELS = 512 * 1024 ** 2   # voxels in one volume (2 GiB as float32); see max_voxels()
MAX_VOXELS_ENV = "WMH_JAX_MAX_VOXELS"
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
AFFINE_ORTHO_TOL = 1e-3        # |cos| between affine axes (shear check)
AFFINE_MATCH_TOL_MM = 1e-3     # image vs label affine agreement
_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
                gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError)


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
  """A validated scan in closest-canonical RAS voxel order.

  Attributes:
    data: float32 ``(x, y, z)`` intensities, RAS voxel order.
    affine: 4x4 voxel → world (mm) of ``data``.
    spacing_mm: voxel size along x, y, z of ``data`` in mm.
    path: the source file ("" for in-memory scans).
    native_shape: shape of the file's own voxel grid (defaults to ``data.shape``).
    native_affine: affine of the file's own voxel grid (defaults to ``affine``).
  """
  data: np.ndarray
  affine: np.ndarray
  spacing_mm: tuple[float, float, float]
  path: str = ""
  native_shape: tuple[int, int, int] | None = None
  native_affine: np.ndarray | None = None

  def __post_init__(self):
    if self.native_shape is None:
      object.__setattr__(self, "native_shape", tuple(self.data.shape))
    if self.native_affine is None:
      object.__setattr__(self, "native_affine", np.asarray(self.affine, np.float64))


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """The model grid.

  The default 112x128x32 voxels at 1.4x1.4x4.2 mm cover 157x179x134 mm (x, y, z),
  a whole adult cerebrum, with the paper's 112x128x32 input size.

  Attributes:
    shape: model-grid voxels (x, y, z).
    spacing_mm: model-grid voxel size in mm.
    percentiles: lower/upper intensity percentiles mapped to 0 and 1.
  """
  shape: tuple[int, int, int] = (112, 128, 32)
  spacing_mm: tuple[float, float, float] = (1.4, 1.4, 4.2)
  percentiles: tuple[float, float] = (1.0, 99.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
  """Everything needed to map model-grid arrays back to the file's grid.

  Attributes:
    native_shape: the file's voxel grid shape.
    native_affine: 4x4 affine of the file's grid.
    ornt: (3, 2) nibabel orientation transform native → RAS voxel order.
    ras_shape: shape after reorientation.
    ras_spacing_mm: voxel size (mm) after reorientation.
    ras_affine: 4x4 affine after reorientation.
    resampled_shape: shape after resampling to ``target_spacing_mm``.
    resample_offset: continuous RAS voxel index of resampled voxel 0.
    target_spacing_mm: model-grid voxel size (mm).
    crop_start: resampled-grid index of model voxel 0 (negative = padding).
    shape: model-grid shape.
    model_affine: 4x4 affine of the model grid.
  """
  native_shape: tuple[int, int, int]
  native_affine: np.ndarray
  ornt: np.ndarray
  ras_shape: tuple[int, int, int]
  ras_spacing_mm: tuple[float, float, float]
  ras_affine: np.ndarray
  resampled_shape: tuple[int, int, int]
  resample_offset: tuple[float, float, float]
  target_spacing_mm: tuple[float, float, float]
  crop_start: tuple[int, int, int]
  shape: tuple[int, int, int]
  model_affine: np.ndarray

  @property
  def zoom(self) -> np.ndarray:
    """RAS voxels per resampled voxel along each axis, (3,)."""
    return np.asarray(self.target_spacing_mm) / np.asarray(self.ras_spacing_mm)

  def to_dict(self) -> dict:
    """Plain JSON-serialisable dict (lists, ints, floats)."""
    out = {}
    for field in dataclasses.fields(self):
      value = np.asarray(getattr(self, field.name))
      out[field.name] = value.tolist()
    return out

  @classmethod
  def from_dict(cls, d: dict) -> Geometry:
    """Inverse of :meth:`to_dict`."""
    ints = ("native_shape", "ras_shape", "resampled_shape", "crop_start", "shape")
    floats = ("ras_spacing_mm", "resample_offset", "target_spacing_mm")
    kwargs = {}
    for name in ints:
      kwargs[name] = tuple(int(v) for v in d[name])
    for name in floats:
      kwargs[name] = tuple(float(v) for v in d[name])
    for name in ("native_affine", "ras_affine", "model_affine"):
      kwargs[name] = np.asarray(d[name], np.float64)
    kwargs["ornt"] = np.asarray(d["ornt"], np.float64)
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessed:
  """A scan on the model grid.

  Attributes:
    image: float32 ``spec.shape`` in [0, 1]; 0 outside the brain.
    mask: float32 ``spec.shape`` WMH mask in {0, 1}, or None without labels.
    label2: bool ``spec.shape`` other-pathology mask, or None without labels.
    brain: bool ``spec.shape`` brain (nonzero-intensity) mask.
    geometry: how to go back to the file's grid.
  """
  image: np.ndarray
  mask: np.ndarray | None
  label2: np.ndarray | None
  brain: np.ndarray
  geometry: Geometry


# ---------------------------------------------------------------------------
# Loading and validation


def _one_line(error: Exception) -> str:
  """``Type: message`` of an exception, whitespace collapsed to one line."""
  return " ".join(f"{type(error).__name__}: {error}".split())


def _check_file(path: Path) -> None:
  """Raises InputError unless ``path`` is an existing, readable regular file."""
  if not path.exists():
    raise InputError(path, "file not found")
  if path.is_dir():
    raise InputError(path, "is a directory, not a NIfTI file")
  if not os.access(path, os.R_OK):
    raise InputError(path, "unreadable (permission denied)")


def max_voxels() -> int:
  """The largest volume (voxels) a header may declare: ``$WMH_JAX_MAX_VOXELS``, else
  :data:`MAX_VOXELS`. A small ``.nii.gz`` can declare tens of GB; the check reads the header
  only, so such a file is refused before anything is decompressed.

  Raises:
    ValueError: the variable is set but not a positive integer.
  """
  value = os.environ.get(MAX_VOXELS_ENV, "")
  if not value:
    return MAX_VOXELS
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"${MAX_VOXELS_ENV}={value!r} must be a positive integer")
  return int(value)


def _open(path: Path) -> tuple[nib.Nifti1Image, tuple[int, int, int]]:
  """Opens the header and validates shape, spacing and affine; no voxel data read.

  Returns the image and its 3D shape. A trailing singleton 4th dimension
  (x, y, z, 1) is accepted and dropped.
  """
  _check_file(path)
  try:
    img = nib.load(path)
  except _READ_ERRORS as e:
    raise InputError(path, f"corrupt or not a NIfTI file ({_one_line(e)})") from e
  if not isinstance(img, nib.Nifti1Pair):
    raise InputError(path, f"not a NIfTI file ({type(img).__name__})")
  shape = tuple(int(s) for s in img.header.get_data_shape())
  if len(shape) == 4 and shape[3] == 1:
    shape = shape[:3]
  if len(shape) != 3:
    raise InputError(path, f"not a 3D volume (shape {shape})")
  limit = max_voxels()
  if min(shape) < 1 or max(shape) > MAX_DIM or np.prod(shape, dtype=np.int64) > limit:
    raise InputError(path, f"absurd dimensions {shape} (each 1..{MAX_DIM}, at most {limit} "
                     f"voxels; ${MAX_VOXELS_ENV} sets the limit), refused before reading data")
  _check_spacing(path, _raw_pixdim(img))
  _check_affine(path, img.affine)
  return img, shape


def _raw_pixdim(img: nib.Nifti1Pair) -> np.ndarray:
  """The header's voxel sizes (mm) as stored, before nibabel's silent fix-ups.

  nibabel replaces zero pixdims by 1 and negative ones by their absolute value
  when loading; such a header is rejected here instead.
  """
  holder = img.file_map.get("header", img.file_map["image"])  # .hdr of a pair, else the .nii
  with nib.openers.ImageOpener(holder.filename) as f:
    raw = type(img.header).from_fileobj(f, check=False)
  return np.asarray(raw["pixdim"][1:4], np.float64)


def _check_spacing(path: Path, spacing_mm: np.ndarray) -> None:
  """Raises InputError for non-finite, zero/negative or absurd voxel sizes (mm)."""
  ok = np.isfinite(spacing_mm).all() and (spacing_mm >= MIN_SPACING_MM).all() \
      and (spacing_mm <= MAX_SPACING_MM).all()
  if not ok:
    raise InputError(path, f"invalid voxel spacing {tuple(spacing_mm.tolist())} mm "
                     f"(must be {MIN_SPACING_MM}..{MAX_SPACING_MM} mm)")


def _check_affine(path: Path, affine: np.ndarray) -> None:
  """Raises InputError for a non-finite, singular or sheared 4x4 affine."""
  m = np.asarray(affine, np.float64)[:3, :3]
  norms = np.linalg.norm(m, axis=0)
  if not np.isfinite(affine).all() or (norms < MIN_SPACING_MM).any() \
      or abs(np.linalg.det(m / norms)) < 1e-6:
    raise InputError(path, "degenerate (singular or non-finite) affine")
  _check_spacing(path, norms)
  cos = (m / norms).T @ (m / norms) - np.eye(3)
  if np.abs(cos).max() > AFFINE_ORTHO_TOL:
    raise InputError(path, "sheared affine (voxel axes not orthogonal)")


def _read(path: Path, img: nib.Nifti1Image, shape: tuple[int, int, int]) -> np.ndarray:
  """Reads the voxel data as float32 ``shape``; InputError on truncated/corrupt data."""
  try:
    data = np.asarray(img.dataobj, dtype=np.float32)
  except _READ_ERRORS as e:
    raise InputError(path, f"corrupt or truncated data ({_one_line(e)})") from e
  return data.reshape(shape)


def _ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorients exactly like ``nib.as_closest_canonical``; returns (data, affine).

  Done by hand (same nibabel calls) to keep the voxel dtype and to use the
  same transform for images and labels.
  """
  ornt = nib.orientations.io_orientation(affine)
  ras = nib.orientations.apply_orientation(data, ornt)
  ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
  return np.ascontiguousarray(ras), ras_affine


def load_image(path: str | os.PathLike) -> Scan:
  """Loads and validates a 3D NIfTI scan, reoriented to closest-canonical RAS.

  Raises InputError (naming the file and the reason) for: a missing,
  directory or unreadable path; a corrupt/truncated file; not 3D (a trailing
  singleton 4th dimension is accepted); absurd header dimensions (checked
  before any data is read); a header pixdim or affine voxel size outside
  0.05..20 mm; a singular or sheared affine; NaN/Inf voxels; an all-zero image.
  ``Scan.spacing_mm`` is the column norms of the RAS affine (the header zooms
  in RAS axis order).
  """
  path = Path(path)
  img, shape = _open(path)
  data = _read(path, img, shape)
  if not np.isfinite(data).all():
    raise InputError(path, "contains NaN or Inf values")
  if not data.any():
    raise InputError(path, "image is all zero")
  native_affine = np.asarray(img.affine, np.float64)
  ras, ras_affine = _ras(data, native_affine)
  spacing = tuple(float(s) for s in np.linalg.norm(ras_affine[:3, :3], axis=0))
  return Scan(data=ras, affine=ras_affine, spacing_mm=spacing, path=str(path),
              native_shape=shape, native_affine=native_affine)


def load_labels(path: str | os.PathLike, image: Scan) -> np.ndarray:
  """Loads a label map onto ``image``'s RAS grid.

  Args:
    path: NIfTI label file: 0 background, 1 WMH, 2 other pathology.
    image: the scan it annotates.

  Returns:
    int16 ``image.data.shape`` label map in RAS voxel order.

  Raises:
    InputError: file problems as in :func:`load_image`, a shape or affine
      (> 1e-3 mm) different from the image's native grid, or values outside
      {0, 1, 2}.
  """
  path = Path(path)
  img, shape = _open(path)
  if shape != tuple(image.native_shape):
    raise InputError(path, f"label shape {shape} does not match image shape "
                     f"{tuple(image.native_shape)}")
  if not np.allclose(img.affine, image.native_affine, rtol=0, atol=AFFINE_MATCH_TOL_MM):
    raise InputError(path, "label affine does not match the image affine")
  data = _read(path, img, shape)
  rounded = np.rint(data)
  ok = (np.abs(data - rounded) <= 1e-3) & (rounded >= 0) & (rounded <= 2)
  if not ok.all():
    bad = np.unique(data[~ok])[:5].tolist()
    raise InputError(path, f"label values must be 0, 1 or 2; found {bad}")
  ras, _ = _ras(rounded.astype(np.int16), np.asarray(image.native_affine))
  return ras


def wmh_mask(labels: np.ndarray) -> np.ndarray:
  """float32 {0,1} WMH mask of a label map; label 2 (other pathology) is not WMH."""
  return (np.asarray(labels) == 1).astype(np.float32)


def volume_ml(mask: np.ndarray, spacing_mm) -> float:
  """Volume in mL (1 mL = 1000 mm³) of the voxels ``mask >= 0.5``."""
  count = np.count_nonzero(np.asarray(mask) >= 0.5)
  return float(count * np.prod(np.asarray(spacing_mm, np.float64)) / 1000.0)


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> None:
  """Writes ``data`` atomically (temp file in the same folder, then rename).

  bool and integer data in 0..255 are stored as uint8, everything else as
  float32. The affine is stored as both sform and qform (code 1, scanner).
  """
  path = Path(path)
  data = np.asarray(data)
  is_int = data.dtype == bool or np.issubdtype(data.dtype, np.integer)
  if is_int and (data.size == 0 or (data.min() >= 0 and data.max() <= 255)):
    data = data.astype(np.uint8)
  else:
    data = data.astype(np.float32)
  img = nib.Nifti1Image(data, np.asarray(affine, np.float64))
  img.set_sform(img.affine, code=1)
  img.set_qform(img.affine, code=1)
  img.header.set_xyzt_units("mm")
  suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
  with fileio.atomic_path(path, suffix=suffix) as tmp:
    nib.save(img, tmp)


# ---------------------------------------------------------------------------
# Resampling


def _overlap_matrix(n_out: int, n_in: int, scale: float, offset: float) -> scipy.sparse.csr_matrix:
  """1D partial-volume operator, (n_out, n_in) float32.

  Input voxel ``k`` covers ``[k - 0.5, k + 0.5]``; output voxel ``j`` covers
  ``offset + j * scale ± scale / 2`` (input index units). Entry (j, k) is the
  fraction of output voxel j covered by input voxel k.
  """
  centre = offset + scale * np.arange(n_out)
  k = np.arange(n_in)
  lo = np.maximum(centre[:, None] - scale / 2, k[None] - 0.5)
  hi = np.minimum(centre[:, None] + scale / 2, k[None] + 0.5)
  return scipy.sparse.csr_matrix((np.clip(hi - lo, 0, None) / scale).astype(np.float32))


def _partial_volume(mask: np.ndarray, out_shape, scale, offset) -> np.ndarray:
  """Exact box-model fraction of each output voxel covered by a binary mask.

  Args:
    mask: ``(x, y, z)`` binary input.
    out_shape: output grid shape.
    scale: output voxel size in input voxels, (3,).
    offset: input index of output voxel 0, (3,).

  Returns:
    float32 ``out_shape`` fractions in [0, 1].
  """
  out = np.asarray(mask, np.float32)
  for axis in range(3):
    op = _overlap_matrix(out_shape[axis], out.shape[axis], scale[axis], offset[axis])
    moved = np.moveaxis(out, axis, 0)
    flat = op @ moved.reshape(moved.shape[0], -1)
    out = np.moveaxis(flat.reshape((op.shape[0],) + moved.shape[1:]), 0, axis)
  return np.ascontiguousarray(out)


def top_k_mask(fractions: np.ndarray) -> np.ndarray:
  """Binary mask of the ``round(sum(fractions))`` voxels with the largest fraction.

  Ties are broken by C-order voxel index (lowest first), so the result is
  deterministic. Returns bool, same shape.
  """
  flat = fractions.ravel()
  k = int(round(float(flat.sum(dtype=np.float64))))
  out = np.zeros(flat.shape, bool)
  candidates = np.flatnonzero(flat > 0)
  order = np.argsort(-flat[candidates], kind="stable")[:k]
  out[candidates[order]] = True
  return out.reshape(fractions.shape)


def _resample_mask(mask: np.ndarray, out_shape, scale, offset) -> np.ndarray:
  """Volume-preserving mask resampling: partial-volume fractions, then top-k. bool."""
  return top_k_mask(_partial_volume(mask, out_shape, scale, offset))


def _resample_linear(data: np.ndarray, out_shape, scale, offset) -> np.ndarray:
  """Trilinear resampling (edge values extended); float32 ``out_shape``."""
  return scipy.ndimage.affine_transform(
      np.asarray(data, np.float32), np.asarray(scale, np.float64),
      offset=np.asarray(offset, np.float64), output_shape=tuple(out_shape),
      order=1, mode="nearest", prefilter=False)


def _resample_grid(shape, spacing_mm, target_mm) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
  """Centre-aligned target grid: (shape, zoom, offset) in source voxel units."""
  shape = np.asarray(shape, np.float64)
  zoom = np.asarray(target_mm, np.float64) / np.asarray(spacing_mm, np.float64)
  out_shape = np.maximum(1, np.rint(shape / zoom)).astype(int)
  offset = (shape - 1) / 2 - (out_shape - 1) / 2 * zoom
  return tuple(int(s) for s in out_shape), zoom, offset


def _scale_offset_affine(scale, offset) -> np.ndarray:
  """4x4 voxel map ``i = scale * j + offset``."""
  m = np.diag(np.append(np.asarray(scale, np.float64), 1.0))
  m[:3, 3] = offset
  return m


# ---------------------------------------------------------------------------
# Crop / pad and normalisation


def _crop_start(brain: np.ndarray, shape) -> tuple[int, int, int]:
  """Start index of a ``shape`` window centred on the brain's bounding box.

  Falls back to the grid centre when the brain mask is empty.
  """
  if brain.any():
    idx = np.nonzero(brain)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() + 1 for i in idx])
  else:
    lo, hi = np.zeros(3, int), np.asarray(brain.shape)
  return tuple(int(s) for s in (lo + hi - np.asarray(shape)) // 2)


def _window(src_shape, dst_shape, start) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
  """Matching (src, dst) slices of a window starting at ``start`` in src."""
  src, dst = [], []
  for n_src, n_dst, s in zip(src_shape, dst_shape, start):
    a, b = max(s, 0), min(s + n_dst, n_src)
    src.append(slice(a, max(a, b)))
    dst.append(slice(a - s, a - s + max(0, b - a)))
  return tuple(src), tuple(dst)


def _crop_pad(array: np.ndarray, shape, start) -> np.ndarray:
  """The ``shape`` window of ``array`` starting at ``start``, zero outside it."""
  out = np.zeros(tuple(shape), array.dtype)
  src, dst = _window(array.shape, shape, start)
  out[dst] = array[src]
  return out


def _uncrop(array: np.ndarray, shape, start) -> np.ndarray:
  """Inverse of :func:`_crop_pad`: places ``array`` back into a zero ``shape`` grid."""
  out = np.zeros(tuple(shape), array.dtype)
  src, dst = _window(shape, array.shape, start)
  out[src] = array[dst]
  return out


def normalise(image: np.ndarray, brain: np.ndarray, percentiles=(1.0, 99.0)) -> np.ndarray:
  """Percentile normalisation to [0, 1] over brain voxels.

  The lower/upper percentiles of the brain voxels map to 0 and 1, values are
  clipped, and voxels outside ``brain`` are 0. A brain of constant intensity
  maps to 1. Returns float32, same shape.
  """
  out = np.zeros(image.shape, np.float32)
  values = image[brain]
  if values.size == 0:
    return out
  lo, hi = np.percentile(values, percentiles)
  if hi > lo:
    out[brain] = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
  else:
    out[brain] = 1.0
  return out


# ---------------------------------------------------------------------------
# The preprocessing function and its inverse


def preprocess(image: Scan, labels: np.ndarray | None,
               spec: PreprocessSpec = PreprocessSpec()) -> Preprocessed:
  """Takes a RAS scan (and its labels) to the model grid.

  1. The image is resampled trilinearly (``scipy.ndimage``, order 1) to
     ``spec.spacing_mm`` on the centre-aligned grid described in the module
     docstring.
  2. Masks (WMH = label 1, other pathology = label 2, brain = nonzero
     intensity) are resampled volume-preservingly: the exact partial-volume
     fraction of each target voxel covered by the mask (box voxel model,
     separable overlap operators) is computed, and the ``k = round(sum of
     fractions)`` voxels with the largest fractions are kept (ties by voxel
     index). The mask volume in mm³ thus changes by less than half a target
     voxel, whatever the zoom.
  3. All arrays are cropped/zero-padded to ``spec.shape`` centred on the
     bounding box of the resampled brain mask (voxels outside the window are
     dropped).
  4. The image is percentile-normalised over brain voxels (see
     :func:`normalise`); background is 0.

  Args:
    image: the scan, from :func:`load_image`.
    labels: int ``image.data.shape`` label map from :func:`load_labels`, or None.
    spec: the model grid.

  Returns:
    A :class:`Preprocessed` on ``spec.shape``.
  """
  if labels is not None and labels.shape != image.data.shape:
    raise ValueError(f"labels {labels.shape} do not match image {image.data.shape}")
  ras_shape = tuple(image.data.shape)
  res_shape, zoom, offset = _resample_grid(ras_shape, image.spacing_mm, spec.spacing_mm)
  resampled = _resample_linear(image.data, res_shape, zoom, offset)
  brain_res = _resample_mask(image.data != 0, res_shape, zoom, offset)
  start = _crop_start(brain_res, spec.shape)
  brain = _crop_pad(brain_res, spec.shape, start)
  norm = normalise(_crop_pad(resampled, spec.shape, start), brain, spec.percentiles)
  mask = label2 = None
  if labels is not None:
    wmh = _resample_mask(labels == 1, res_shape, zoom, offset)
    mask = _crop_pad(wmh, spec.shape, start).astype(np.float32)
    other = _resample_mask(labels == 2, res_shape, zoom, offset)
    label2 = _crop_pad(other, spec.shape, start)
  native_affine = np.asarray(image.native_affine, np.float64)
  ornt = nib.orientations.io_orientation(native_affine)
  model_affine = (np.asarray(image.affine, np.float64) @ _scale_offset_affine(zoom, offset)
                  @ _scale_offset_affine(np.ones(3), start))
  geometry = Geometry(
      native_shape=tuple(int(s) for s in image.native_shape), native_affine=native_affine,
      ornt=ornt, ras_shape=ras_shape,
      ras_spacing_mm=tuple(float(s) for s in image.spacing_mm),
      ras_affine=np.asarray(image.affine, np.float64), resampled_shape=res_shape,
      resample_offset=tuple(float(o) for o in offset),
      target_spacing_mm=tuple(float(s) for s in spec.spacing_mm), crop_start=start,
      shape=tuple(int(s) for s in spec.shape), model_affine=model_affine)
  return Preprocessed(image=norm, mask=mask, label2=label2, brain=brain, geometry=geometry)


def to_native(array: np.ndarray, geometry: Geometry, order: int = 1) -> np.ndarray:
  """Maps a model-grid array back to the input file's voxel grid.

  Undoes crop/pad (outside the window is 0), resampling and reorientation, so
  the result can be saved with ``geometry.native_affine`` and overlays the
  input file exactly.

  Args:
    array: ``geometry.shape`` map.
    geometry: from :func:`preprocess`.
    order: 1 for continuous maps (trilinear, float32); 0 for binary masks
      (``array >= 0.5``), resampled volume-preservingly with the same
      partial-volume top-k method as :func:`preprocess` (float32 {0, 1}).

  Returns:
    float32 ``geometry.native_shape`` array in the file's voxel order.
  """
  array = np.asarray(array)
  if array.shape != tuple(geometry.shape):
    raise ValueError(f"array {array.shape} is not on the model grid {geometry.shape}")
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (mask) or 1 (continuous), got {order}")
  zoom = geometry.zoom
  inv_scale = 1.0 / zoom
  inv_offset = -np.asarray(geometry.resample_offset) / zoom
  if order == 0:
    resampled = _uncrop(array >= 0.5, geometry.resampled_shape, geometry.crop_start)
    ras = _resample_mask(resampled, geometry.ras_shape, inv_scale, inv_offset)
  else:
    resampled = _uncrop(array.astype(np.float32), geometry.resampled_shape,
                        geometry.crop_start)
    ras = _resample_linear(resampled, geometry.ras_shape, inv_scale, inv_offset)
  back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), geometry.ornt)
  native = nib.orientations.apply_orientation(ras, back)
  return np.ascontiguousarray(native, dtype=np.float32)
