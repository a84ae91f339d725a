"""Agreement and segmentation metrics: ICC, Dice and the WMH-challenge metrics.

Volume agreement (paper §2.4) is the intraclass correlation ICC(2,1) between
predicted and annotated WMH volume. ICC functions accept a batch of rating
tables `(..., n, k)` so bootstrap replicates are scored in one call.

Segmentation metrics follow the public evaluation script of the WMH
Segmentation Challenge (hjkuijf/wmhchallenge, `evaluation.py`):

- the result is binarised at >= 0.5; reference label 1 is WMH, and voxels with
  reference label 2 ("other pathology") are removed from the result;
- HD95: boundary = mask minus its in-plane erosion. The script calls SimpleITK
  `BinaryErode(image, (1, 1, 0))`, whose default ball kernel of radius 1 is the
  full in-plane 3x3 square (checked with SimpleITK 2.5.7) and which treats
  voxels outside the image as foreground; both are reproduced here. Boundary
  voxels go to world coordinates (mm) through the affine, and the score is the
  larger of the two directed 95th-percentile nearest-neighbour distances;
- lesion recall/F1 use 26-connected components; like the script, recall is 1
  when the reference has no lesion and precision is 1 when the result has none.

Arrays are `(x, y, z)` with z the slice axis, as in the RAS volumes of
`wmh_jax.data.nifti`.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import scipy.spatial

ICC_KINDS = ("1,1", "2,1", "3,1")

_IN_PLANE_SQUARE = np.ones((3, 3, 1), dtype=bool)
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


# ---------------------------------------------------------------------------
# Intraclass correlation
# ---------------------------------------------------------------------------


def _check_ratings(ratings: np.ndarray) -> np.ndarray:
  """Validate a rating table `(..., n, k)` and return it as float64."""
  x = np.asarray(ratings, dtype=np.float64)
  if x.ndim < 2:
    raise ValueError(f"ICC needs ratings of shape (..., n, k); got shape {x.shape}")
  n, k = x.shape[-2:]
  if n < 2:
    raise ValueError(f"ICC needs at least 2 targets (scans); got n={n}")
  if k < 2:
    raise ValueError(f"ICC needs at least 2 raters (methods); got k={k}")
  if not np.all(np.isfinite(x)):
    raise ValueError("ICC ratings contain NaN or infinite values")
  return x


def _mean_squares(x: np.ndarray) -> tuple[np.ndarray, ...]:
  """Two-way ANOVA mean squares of ratings `x` `(..., n, k)`.

  Returns `(msr, msc, mse, msw)`, each of shape `(...)`: between targets
  (rows), between raters (columns), residual, and within targets.
  """
  n, k = x.shape[-2:]
  grand = x.mean(axis=(-2, -1), keepdims=True)
  row = x.mean(axis=-1, keepdims=True)
  col = x.mean(axis=-2, keepdims=True)
  ss_rows = k * np.square(row - grand).sum(axis=(-2, -1))
  ss_cols = n * np.square(col - grand).sum(axis=(-2, -1))
  ss_error = np.square(x - row - col + grand).sum(axis=(-2, -1))
  ss_within = np.square(x - row).sum(axis=(-2, -1))
  msr = ss_rows / (n - 1)
  msc = ss_cols / (k - 1)
  mse = ss_error / ((n - 1) * (k - 1))
  msw = ss_within / (n * (k - 1))
  return msr, msc, mse, msw


def icc(ratings: np.ndarray, kind: str = "2,1") -> float | np.ndarray:
  """Single-rater intraclass correlation (Shrout & Fleiss 1979).

  Args:
    ratings: `(..., n, k)` ratings of n targets (scans) by k raters (methods,
      e.g. annotated and predicted volume in mL); leading axes are a batch.
    kind: "2,1" two-way random effects, absolute agreement (McGraw & Wong
      "A,1"), the paper's metric: (MSR - MSE) / (MSR + (k-1) MSE + k (MSC -
      MSE) / n); "3,1" two-way mixed, consistency: (MSR - MSE) / (MSR + (k-1)
      MSE); "1,1" one-way random: (MSR - MSW) / (MSR + (k-1) MSW).

  Returns:
    A float for a single table, else an array of shape `(...)`. NaN where the
    ICC is undefined: all ratings of a table identical (zero variance) or a
    zero denominator.

  Raises:
    ValueError: n < 2, k < 2, non-finite ratings or an unknown kind.
  """
  if kind not in ICC_KINDS:
    raise ValueError(f"unknown ICC kind {kind!r}; expected one of {ICC_KINDS}")
  x = _check_ratings(ratings)
  n, k = x.shape[-2:]
  msr, msc, mse, msw = _mean_squares(x)
  if kind == "2,1":
    num, den = msr - mse, msr + (k - 1) * mse + k * (msc - mse) / n
  elif kind == "3,1":
    num, den = msr - mse, msr + (k - 1) * mse
  else:
    num, den = msr - msw, msr + (k - 1) * msw
  constant = np.all(x == x[..., :1, :1], axis=(-2, -1))
  undefined = constant | (den == 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    value = np.where(undefined, np.nan, num / np.where(undefined, 1.0, den))
  return float(value) if value.ndim == 0 else value


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Stack two rating vectors `(..., n)` into a table `(..., n, 2)`."""
  a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f"ICC rating vectors differ in shape: {a.shape} vs {b.shape}")
  return np.stack([a, b], axis=-1)


def icc_2_1(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
  """ICC(2,1) absolute agreement of two raters `a`, `b` `(..., n)` (e.g. mL).

  Leading axes are a batch (e.g. `(B, n)` bootstrap resamples); see `icc`.
  """
  return icc(_pair(a, b), "2,1")


def icc_3_1(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
  """ICC(3,1) consistency of two raters `a`, `b` `(..., n)`; see `icc`."""
  return icc(_pair(a, b), "3,1")


# ---------------------------------------------------------------------------
# Overlap and volume
# ---------------------------------------------------------------------------


def _binary_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Two same-shape masks as bool arrays (nonzero = foreground)."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
  return a.astype(bool), b.astype(bool)


def dice(a: np.ndarray, b: np.ndarray, empty_value: float = 1.0) -> float:
  """Dice coefficient 2|A∩B| / (|A| + |B|) of two binary masks (any shape).

  Nonzero voxels are foreground. When both masks are empty the ratio is 0/0;
  `empty_value` is returned (default 1.0: two empty masks agree perfectly).
  """
  a, b = _binary_pair(a, b)
  total = int(a.sum()) + int(b.sum())
  if total == 0:
    return float(empty_value)
  return 2.0 * int(np.logical_and(a, b).sum()) / total


def _check_volumes(ref_volume: float, res_volume: float) -> tuple[float, float]:
  """Validate two volumes (same unit, e.g. mL or voxels): finite and >= 0."""
  ref, res = float(ref_volume), float(res_volume)
  if not (np.isfinite(ref) and np.isfinite(res)) or ref < 0 or res < 0:
    raise ValueError(f"volumes must be finite and >= 0; got {ref}, {res}")
  return ref, res


def avd_percent(ref_volume: float, res_volume: float) -> float:
  """Absolute volume difference |V_ref - V_res| / V_ref x 100 (%).

  Volumes in any one unit. With an empty reference: 0.0 when the result is
  empty too, +inf otherwise (the challenge script divides by zero there).
  """
  ref, res = _check_volumes(ref_volume, res_volume)
  if ref == 0:
    return 0.0 if res == 0 else float("inf")
  return abs(ref - res) / ref * 100.0


def log_volume_difference(ref_volume: float, res_volume: float) -> float:
  """Absolute log-transformed volume difference |ln V_res - ln V_ref|.

  Unit-free (a log ratio). Zeros: 0.0 when both volumes are 0, +inf when
  exactly one is 0.
  """
  ref, res = _check_volumes(ref_volume, res_volume)
  if ref == 0 or res == 0:
    return 0.0 if ref == res else float("inf")
  return float(abs(np.log(res) - np.log(ref)))


# ---------------------------------------------------------------------------
# Surface distance and lesion detection
# ---------------------------------------------------------------------------


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Mask `(x, y, z)` minus its in-plane 3x3 erosion (no erosion along z)."""
  eroded = scipy.ndimage.binary_erosion(mask, _IN_PLANE_SQUARE, border_value=1)
  return mask & ~eroded


def _world_points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """World coordinates `(m, 3)` in mm of the voxels of `mask` `(x, y, z)`."""
  ijk = np.argwhere(mask).astype(np.float64)
  return ijk @ affine[:3, :3].T + affine[:3, 3]


def _check_affine(affine: np.ndarray) -> np.ndarray:
  """A finite 4x4 voxel-to-world affine as float64."""
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"affine must be a finite 4x4 matrix; got shape {affine.shape}")
  return affine


def hd95_mm(ref: np.ndarray, res: np.ndarray, affine: np.ndarray) -> float:
  """95th-percentile Hausdorff distance (mm) between two masks `(x, y, z)`.

  Args:
    ref, res: binary masks (nonzero = foreground) on the same grid.
    affine: 4x4 voxel-to-world matrix (mm) of that grid.

  Returns:
    max of the two directed 95th-percentile nearest boundary distances; NaN
    when either mask is empty.
  """
  ref, res = _binary_pair(ref, res)
  if ref.ndim != 3:
    raise ValueError(f"HD95 needs 3D masks (x, y, z); got shape {ref.shape}")
  affine = _check_affine(affine)
  if not ref.any() or not res.any():
    return float("nan")
  ref_pts = _world_points(_boundary(ref), affine)
  res_pts = _world_points(_boundary(res), affine)
  ref_to_res = scipy.spatial.cKDTree(res_pts).query(ref_pts, k=1)[0]
  res_to_ref = scipy.spatial.cKDTree(ref_pts).query(res_pts, k=1)[0]
  return float(max(np.percentile(ref_to_res, 95), np.percentile(res_to_ref, 95)))


def _share_touching(mask: np.ndarray, other: np.ndarray) -> float:
  """Share of the 26-connected components of `mask` that overlap `other`.

  1.0 when `mask` has no component (the challenge convention).
  """
  labels, count = scipy.ndimage.label(mask, structure=_CONNECTIVITY_26)
  if count == 0:
    return 1.0
  touched = np.unique(labels[mask & other])
  return touched.size / count


def lesion_recall_f1(ref: np.ndarray, res: np.ndarray) -> dict[str, float]:
  """Lesion-wise detection scores of two 3D masks `(x, y, z)`.

  Returns:
    `recall` (share of reference lesions touched by the result), `precision`
    (share of result lesions touching the reference) and `f1` = 2PR/(P+R),
    0 when P + R = 0. Lesions are 26-connected components.
  """
  ref, res = _binary_pair(ref, res)
  if ref.ndim != 3:
    raise ValueError(f"lesion metrics need 3D masks (x, y, z); got shape {ref.shape}")
  recall = _share_touching(ref, res)
  precision = _share_touching(res, ref)
  total = precision + recall
  f1 = 0.0 if total == 0 else 2.0 * precision * recall / total
  return {"recall": recall, "precision": precision, "f1": f1}


# ---------------------------------------------------------------------------
# Challenge evaluation of one scan
# ---------------------------------------------------------------------------


def challenge_masks(ref_labels: np.ndarray,
                    result: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reference WMH mask and scored result mask, both bool `(x, y, z)`.

  Args:
    ref_labels: integer labels (0 background, 1 WMH, 2 other pathology).
    result: segmentation or probability map on the same grid; >= 0.5 is WMH.

  Returns:
    `(ref_labels == 1, (result >= 0.5) & (ref_labels != 2))`.
  """
  labels, result = np.asarray(ref_labels), np.asarray(result, dtype=np.float64)
  if labels.shape != result.shape:
    raise ValueError(f"labels and result differ in shape: {labels.shape} vs {result.shape}")
  if not np.all(np.isin(labels, (0, 1, 2))):
    raise ValueError("reference labels must be 0, 1 or 2")
  if not np.all(np.isfinite(result)):
    raise ValueError("result contains NaN or infinite values")
  return labels == 1, (result >= 0.5) & (labels != 2)


def _voxel_ml(affine: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
  """Voxel volume in mL from `spacing_mm`, checked against the affine."""
  spacing = np.asarray(spacing_mm, dtype=np.float64)
  columns = np.linalg.norm(affine[:3, :3], axis=0)
  if spacing.shape != (3,) or not np.allclose(spacing, columns, rtol=1e-4):
    raise ValueError(f"spacing_mm {tuple(spacing)} does not match the affine's "
                     f"{tuple(np.round(columns, 6))}")
  return float(np.prod(spacing)) / 1000.0


def challenge_metrics(ref_labels: np.ndarray, result: np.ndarray, affine: np.ndarray,
                      spacing_mm: tuple[float, float, float]) -> dict[str, float]:
  """All WMH-challenge metrics of one scan.

  Args:
    ref_labels: `(x, y, z)` reference labels (0, 1 WMH, 2 other pathology).
    result: `(x, y, z)` segmentation or probability map (>= 0.5 is WMH).
    affine: 4x4 voxel-to-world matrix (mm) of the grid.
    spacing_mm: voxel size (mm); must match the affine's column norms.

  Returns:
    `dice`, `hd95_mm`, `avd_percent`, `log_volume_difference`,
    `lesion_recall`, `lesion_f1`, `reference_volume_ml`, `result_volume_ml`.
  """
  affine = _check_affine(affine)
  voxel_ml = _voxel_ml(affine, spacing_mm)
  ref, res = challenge_masks(ref_labels, result)
  ref_voxels, res_voxels = int(ref.sum()), int(res.sum())
  lesions = lesion_recall_f1(ref, res)
  return {
      "dice": dice(ref, res),
      "hd95_mm": hd95_mm(ref, res, affine),
      "avd_percent": avd_percent(ref_voxels, res_voxels),
      "log_volume_difference": log_volume_difference(ref_voxels, res_voxels),
      "lesion_recall": lesions["recall"],
      "lesion_f1": lesions["f1"],
      "reference_volume_ml": ref_voxels * voxel_ml,
      "result_volume_ml": res_voxels * voxel_ml,
  }
