"""Attention map -> segmentation by thresholding at the predicted volume.

Paper §2.2: each scan's attention map is thresholded "with the threshold that
provides a sum of foreground voxels equal to the predicted WMH volume in that
image". Equivalently the n highest-attention voxels are kept, with n the
predicted volume in voxels at model resolution. Ties are broken by flat
(C-order) voxel index, lower index first, so the count is always exact.
"""

from __future__ import annotations

import numpy as np


def predicted_voxels(volume_ml: float | np.ndarray,
                     spacing_mm: tuple[float, float, float]) -> np.ndarray:
  """Predicted volume in voxels: round(volume_ml * 1000 / voxel_mm3).

  Args:
    volume_ml: scalar or `(b,)` predicted WMH volume (mL).
    spacing_mm: voxel size (mm) of the grid the attention map lives on.

  Returns:
    int64 array of `volume_ml`'s shape. Rounding is half-to-even (`np.rint`);
    negative volumes (a regression head can predict them) give 0.
  """
  volume = np.asarray(volume_ml, dtype=np.float64)
  spacing = np.asarray(spacing_mm, dtype=np.float64)
  if not np.all(np.isfinite(volume)):
    raise ValueError("predicted volume contains NaN or infinite values")
  if spacing.shape != (3,) or not np.all(spacing > 0):
    raise ValueError(f"spacing_mm must be 3 positive values; got {spacing_mm}")
  voxels = np.rint(volume * 1000.0 / np.prod(spacing))
  return np.maximum(voxels, 0).astype(np.int64)


def threshold_to_volume(attention: np.ndarray, n_voxels: int | np.ndarray) -> np.ndarray:
  """Keep the `n_voxels` highest-attention voxels of each scan.

  Args:
    attention: `(b, x, y, z)` batch of attention maps or one `(x, y, z)` map.
    n_voxels: `(b,)` counts, or one count for all scans (one count for a
      single map). Non-integers are rounded half-to-even; counts are clipped
      to [0, x*y*z].

  Returns:
    bool mask of `attention`'s shape whose foreground count per scan equals
    the clipped count. Among equal attention values the lower flat voxel
    index is kept first.
  """
  maps = np.asarray(attention)
  if maps.ndim not in (3, 4):
    raise ValueError(f"attention must be (x, y, z) or (b, x, y, z); got shape {maps.shape}")
  batch = maps.reshape(1 if maps.ndim == 3 else maps.shape[0], -1).astype(np.float64)
  if not np.all(np.isfinite(batch)):
    raise ValueError("attention contains NaN or infinite values")
  counts = _counts(n_voxels, batch.shape)
  order = np.argsort(-batch, axis=1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(batch.shape[1])[None, :], axis=1)
  return (rank < counts[:, None]).reshape(maps.shape)


def _counts(n_voxels: int | np.ndarray, batch_shape: tuple[int, int]) -> np.ndarray:
  """Voxel counts `(b,)`, rounded and clipped to [0, size]."""
  b, size = batch_shape
  n = np.asarray(n_voxels, dtype=np.float64)
  if not np.all(np.isfinite(n)):
    raise ValueError("n_voxels contains NaN or infinite values")
  if n.ndim > 1 or (n.ndim == 1 and n.shape[0] != b):
    raise ValueError(f"n_voxels must be a scalar or ({b},); got shape {n.shape}")
  return np.clip(np.rint(np.broadcast_to(n, (b,))), 0, size).astype(np.int64)
