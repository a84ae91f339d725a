"""Anatomy of the synthetic cohort: the MNI template reduced to signed distance maps.

The MNI ICBM152 2009a template (T1, GM and WM maps) ships inside the nilearn
wheel. It is reduced once (about 1 s, cached next to the cohort) to 2 mm signed
distance maps (mm, negative inside) of the intracranial volume (channel
:data:`ICV`), the parenchyma (:data:`PAR`), the white matter with the ventricles
(:data:`WMF`) and the lateral ventricles (:data:`VENT`: the two dark CSF
components near the centre), plus the CSF probability in sulci and cisterns
(:data:`SULC`). Also the tissue label codes of the generator.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import scipy.ndimage as ndi

from wmh_jax.runtime import fileio


TEMPLATE_SPACING_MM = 2.0

# Tissue label map codes (the generator's own labels; the mask file only has
# 0 / 1 WMH / 2 other pathology).
BACKGROUND, CSF, VENTRICLE, GM, WM, WMH, OTHER = range(7)
TISSUE_NAMES = ("background", "csf", "ventricle", "gm", "wm", "wmh", "other")

# Template channels: signed distances (mm) to the intracranial volume, parenchyma,
# white matter (+ventricles), lateral ventricles; sulcal CSF probability. The
# working grid adds the periventricular band depth (mm).
ICV, PAR, WMF, VENT, SULC, PV = range(6)


# ---------------------------------------------------------------------------
# Template


@dataclasses.dataclass(frozen=True, eq=False)
class Template:
  """The MNI ICBM152 2009a anatomy at 2 mm.

  Attributes:
    maps: float32 ``(5, x, y, z)``: signed distances (mm, negative inside) to the
      intracranial volume, parenchyma (GM+WM+ventricles), white matter
      (+ventricles) and lateral ventricles, then the CSF probability outside
      the lateral ventricles (sulci, cisterns; 0-1).
    origin_mm: world (x, y, z) in mm of voxel (0, 0, 0).
    spacing_mm: voxel size (mm, isotropic).
    centre_mm: world centre of the intracranial volume's bounding box.
    half_extent_mm: half size of that bounding box (x, y, z) in mm.
    vent_box_mm: ``(2, 3)`` world bounding box (min, max) of the lateral ventricles.
    wm_pos_mm: float32 ``(n, 3)`` world position of white-matter voxels.
    wm_maps: float32 ``(n, 5)`` the maps at those voxels.
    wm_vent_dir: float32 ``(n, 3)`` unit gradient of the ventricle distance
      (points away from the ventricles).
  """
  maps: np.ndarray
  origin_mm: np.ndarray
  spacing_mm: float
  centre_mm: np.ndarray
  half_extent_mm: np.ndarray
  vent_box_mm: np.ndarray
  wm_pos_mm: np.ndarray
  wm_maps: np.ndarray
  wm_vent_dir: np.ndarray


def _template_path(name: str) -> Path:
  """Path of a template map inside the installed nilearn package (no import)."""
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("nilearn is not installed: the MNI template ships with it")
  root = Path(list(spec.submodule_search_locations)[0])
  return root / "datasets" / "data" / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"


def _block_mean(a: np.ndarray) -> np.ndarray:
  """2x2x2 block mean: float32 ``(x, y, z)`` → ``(x//2, y//2, z//2)``."""
  a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2, : a.shape[2] // 2 * 2]
  a = a[0::2] + a[1::2]
  a = a[:, 0::2] + a[:, 1::2]
  return (a[:, :, 0::2] + a[:, :, 1::2]) * np.float32(0.125)


def _lateral_ventricles(t1: np.ndarray, csf: np.ndarray, origin_mm: np.ndarray) -> np.ndarray:
  """Bool mask (1 mm grid): the two largest dark-CSF components near the brain centre."""
  dark = (csf > 0.5) & (t1 < 0.4)
  labels, _ = ndi.label(dark)
  axes = [origin_mm[k] + np.arange(t1.shape[k]) for k in range(3)]
  box = ((np.abs(axes[0]) < 25)[:, None, None] & (np.abs(axes[1] + 10) < 35)[None, :, None]
         & (np.abs(axes[2] - 15) < 20)[None, None, :])
  ids, counts = np.unique(labels[box & dark], return_counts=True)
  return np.isin(labels, ids[np.argsort(-counts)[:2]])


def _signed_distance(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
  """Signed distance (mm, negative inside) to the boundary of a bool mask, smoothed."""
  outside = ndi.distance_transform_edt(~mask, sampling=spacing_mm)
  inside = ndi.distance_transform_edt(mask, sampling=spacing_mm)
  sdf = np.where(mask, -inside, outside) + np.where(mask, 0.5, -0.5) * spacing_mm
  return ndi.gaussian_filter(sdf.astype(np.float32), 0.7)


def build_template() -> Template:
  """Derives the 2 mm template from the nilearn MNI maps (about 1 s)."""
  import nibabel as nib  # noqa: PLC0415  (only needed here)
  imgs = {k: nib.load(_template_path(k)) for k in ("t1", "gm", "wm")}
  affine = imgs["t1"].affine
  if not np.allclose(affine[:3, :3], np.eye(3)):
    raise ValueError("unexpected MNI template affine (expected 1 mm RAS)")
  t1, gm, wm = (np.asarray(imgs[k].dataobj, np.float32) / 255.0 for k in ("t1", "gm", "wm"))
  origin_1mm = affine[:3, 3]
  icv1 = t1 > 0.01
  csf1 = np.clip(icv1 - gm - wm, 0, 1)
  vent1 = _lateral_ventricles(t1, csf1, origin_1mm)
  sulcal1 = csf1 * ~ndi.binary_dilation(vent1, iterations=2)
  icv, par, wmf, vent, sulcal = (_block_mean(m.astype(np.float32)) for m in (
      icv1, np.maximum(gm + wm, vent1), np.maximum(wm, vent1), vent1, sulcal1))
  idx = np.argwhere(icv >= 0.5)
  lo, hi = np.maximum(idx.min(0) - 6, 0), idx.max(0) + 7
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  h = TEMPLATE_SPACING_MM
  maps = np.stack([_signed_distance(m[crop] >= level, h)
                   for m, level in ((icv, 0.5), (par, 0.5), (wmf, 0.4), (vent, 0.5))]
                  + [sulcal[crop]])
  origin = origin_1mm + 0.5 + lo * h
  idx = np.argwhere(maps[ICV] < 0)
  lo_mm, hi_mm = origin + idx.min(0) * h, origin + idx.max(0) * h
  vent_mm = origin + np.argwhere(maps[VENT] < 0) * h
  wm_vox = np.argwhere((maps[WMF] < 0) & (maps[VENT] > 0))
  grad = np.stack(np.gradient(maps[VENT], h))[:, wm_vox[:, 0], wm_vox[:, 1], wm_vox[:, 2]].T
  grad /= np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-6)
  return Template(
      maps=maps, origin_mm=origin.astype(np.float64), spacing_mm=h,
      centre_mm=(lo_mm + hi_mm) / 2, half_extent_mm=(hi_mm - lo_mm) / 2 + h / 2,
      vent_box_mm=np.stack([vent_mm.min(0), vent_mm.max(0)]),
      wm_pos_mm=(origin + wm_vox * h).astype(np.float32),
      wm_maps=maps[:, wm_vox[:, 0], wm_vox[:, 1], wm_vox[:, 2]].T.copy(),
      wm_vent_dir=grad.astype(np.float32))


_TEMPLATE: dict[str, Template] = {}  # this process's template (built or loaded once)


def load_template(cache_path: str | os.PathLike | None = None) -> Template:
  """The 2 mm template: from memory, else from ``cache_path`` (.npz), else built.

  When ``cache_path`` is given and missing it is written, so that worker
  processes can load it instead of rebuilding.
  """
  path = None if cache_path is None else Path(cache_path)
  if "template" not in _TEMPLATE and path is not None and path.is_file():
    try:
      with np.load(path) as z:
        fields = {f.name: z[f.name] for f in dataclasses.fields(Template)}
      _TEMPLATE["template"] = Template(**{**fields, "spacing_mm": float(fields["spacing_mm"])})
    except (OSError, ValueError, KeyError):
      path.unlink()  # unreadable or from another version: rebuilt below
  if "template" not in _TEMPLATE:
    _TEMPLATE["template"] = build_template()
  template = _TEMPLATE["template"]
  if path is not None and not path.is_file():
    fileio.atomic_write_with(path, lambda f: np.savez(f, **dataclasses.asdict(template)))
  return template


# ---------------------------------------------------------------------------
# Small helpers
