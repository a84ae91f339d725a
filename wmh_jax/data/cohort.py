"""Built-in synthetic multi-site WMH cohort: the toolkit's embedded default dataset.

Five domains mimic the paper's data (§2.1): ``local`` (training domain, like the
Rotterdam Scan Study: 1.5 T, vascular WMH) and four external test domains like
the public challenges: ``wmhseg`` (60 scans, vascular, 3 T, three sites,
label 2 "other pathology"), ``longmsles`` (21 scans, MS, 4-5 scans per subject),
``msseg`` (15 scans, MS, 1.5 T and 3 T sites) and ``msles`` (15 scans, MS, masks
drawn one voxel wider in-plane: another annotation style).

Every scan is a FLAIR-like NIfTI file plus a uint8 label NIfTI (0 background,
1 WMH, 2 other pathology) listed in a per-domain manifest, so the cohort goes
through exactly the same loading/preprocessing code as real data.

Anatomy comes from the MNI ICBM152 2009a template (T1, GM and WM maps) shipped
inside the nilearn wheel. It is reduced once (about 1 s, cached next to the
cohort) to 2 mm signed distance maps (mm, negative inside) of the intracranial
volume, the parenchyma, the white matter (with the ventricles) and the lateral
ventricles (the two dark CSF components near the centre), plus the CSF
probability in sulci and cisterns. A scan is made by

1. mapping a 2 mm "working" grid in scanner space to the template through a
   pose (rotation, translation), a head-size scaling and a smooth random
   warp, and sampling the distance maps there;
2. moving the tissue boundaries by the subject's atrophy (ventricles grow,
   white matter and cortex shrink), correlated with the subject's WMH load;
3. upsampling the distance maps to the acquisition grid and turning them into
   partial-volume tissue fractions;
4. adding lesions (vascular: periventricular caps/bands + deep foci, confluent
   at high load; MS: ovoid periventricular, juxtacortical and deep lesions),
   restricted to white matter;
5. mixing FLAIR-like tissue intensities, a smooth bias field, a global gain
   and Rician noise.

The mask is the voxels whose largest tissue fraction is lesion, so the
manifest's ``wmh_volume_ml`` equals ``nifti.volume_ml`` of the written mask;
the confounder volumes (``ventricle_ml``: lateral ventricles,
``white_matter_ml``: normal-appearing white matter, ``csf_ml``: all CSF
including the ventricles) are counted from the same tissue label map. Severity
is the volume quintile (0-4) within the domain; ``local`` gets a seeded
60/20/20 split by subject, the external domains ``split=test``. Generation
parameters and ``CODE_VERSION`` are stored per domain (``generation.json``),
and a domain is regenerated only when they change.

Command line::

  python -m wmh_jax.data.cohort --out=DIR --n_local=240 --seed=0 \\
      [--domains=local,wmhseg] [--png=overview.png] [--workers=2]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from wmh_jax import fileio
from wmh_jax.data import manifest, nifti

CODE_VERSION = 5  # bump whenever generated files change
TEMPLATE_SPACING_MM = 2.0
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "generation.json"

# Tissue label map codes (the generator's own labels; the mask file only has
# 0 / 1 WMH / 2 other pathology).
BACKGROUND, CSF, VENTRICLE, GM, WM, WMH, OTHER = range(7)
TISSUE_NAMES = ("background", "csf", "ventricle", "gm", "wm", "wmh", "other")

# Template channels: signed distances (mm) to the intracranial volume, parenchyma,
# white matter (+ventricles), lateral ventricles; sulcal CSF probability. The
# working grid adds the periventricular band depth (mm).
_ICV, _PAR, _WMF, _VENT, _SULC, _PV = range(6)

# FLAIR-like intensities relative to normal white matter, by field strength (T).
_CONTRAST = {
    1.5: {"csf": 0.24, "gm": 1.20, "wm": 1.0, "wmh": 1.75, "other": 0.45},
    3.0: {"csf": 0.16, "gm": 1.26, "wm": 1.0, "wmh": 1.90, "other": 0.40},
}


# ---------------------------------------------------------------------------
# Domains


@dataclasses.dataclass(frozen=True)
class Site:
  """One scanner: acquisition grid and image appearance.

  Attributes:
    name: site name written to the manifest.
    field_strength_t: 1.5 or 3.0 (selects the FLAIR contrast).
    spacing_mm: stored voxel size (x, y, z) in mm; z is the slice axis.
    gain: scanner units of normal-appearing white matter.
    noise: Rician noise sigma relative to white matter.
    bias: bias-field amplitude (standard deviation of the log field).
    orientation: "RAS" or "LAS" (x axis stored right-to-left).
    dtype: stored image type, "float32" or "uint8" (clipped to 0-255).
  """
  name: str
  field_strength_t: float
  spacing_mm: tuple[float, float, float]
  gain: float
  noise: float
  bias: float
  orientation: str = "RAS"
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Domain:
  """One data set of the cohort.

  Attributes:
    name: domain name (manifest ``dataset`` column and folder name).
    n_scans: number of scans.
    lesion_type: "vascular" or "ms".
    sites: scanners; scan ``i`` uses ``sites[i % len(sites)]`` (by subject
      for longitudinal domains).
    load_median_ml: median of the log-normal lesion load (mL).
    load_sigma: log-normal sigma of the lesion load.
    longitudinal: 4-5 scans per subject with evolving lesions.
    dilate_mask: annotation style: masks drawn one voxel wider in-plane.
    other_pathology_rate: share of scans with a label-2 lesion (infarct).
  """
  name: str
  n_scans: int
  lesion_type: str
  sites: tuple[Site, ...]
  load_median_ml: float
  load_sigma: float
  longitudinal: bool = False
  dilate_mask: bool = False
  other_pathology_rate: float = 0.0


DOMAINS: dict[str, Domain] = {
    "local": Domain(
        "local", 240, "vascular",
        (Site("rss-ge-1.5t", 1.5, (1.0, 1.0, 3.0), 90.0, 0.045, 0.08, dtype="uint8"),),
        load_median_ml=4.0, load_sigma=1.0),
    "wmhseg": Domain(
        "wmhseg", 60, "vascular",
        (Site("utrecht-philips-3t", 3.0, (0.96, 0.95, 3.0), 160.0, 0.035, 0.18, "LAS"),
         Site("singapore-siemens-3t", 3.0, (1.0, 1.0, 3.0), 650.0, 0.030, 0.22, "LAS"),
         Site("amsterdam-ge-3t", 3.0, (0.98, 0.98, 3.0), 1100.0, 0.040, 0.15, "LAS")),
        load_median_ml=8.0, load_sigma=0.9, other_pathology_rate=0.35),
    "longmsles": Domain(
        "longmsles", 21, "ms",
        (Site("philips-3t", 3.0, (0.92, 0.92, 2.2), 280.0, 0.035, 0.20),),
        load_median_ml=8.0, load_sigma=0.8, longitudinal=True),
    "msseg": Domain(
        "msseg", 15, "ms",
        (Site("siemens-aera-1.5t", 1.5, (1.03, 1.03, 1.25), 380.0, 0.050, 0.12),
         Site("philips-ingenia-3t", 3.0, (0.96, 0.96, 1.5), 220.0, 0.035, 0.20),
         Site("siemens-verio-3t", 3.0, (0.9, 0.9, 1.2), 520.0, 0.030, 0.25)),
        load_median_ml=6.0, load_sigma=0.9),
    "msles": Domain(
        "msles", 15, "ms",
        (Site("siemens-3t", 3.0, (0.96, 0.96, 2.5), 300.0, 0.040, 0.18),),
        load_median_ml=5.0, load_sigma=0.9, dilate_mask=True),
}


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
  idx = np.argwhere(maps[_ICV] < 0)
  lo_mm, hi_mm = origin + idx.min(0) * h, origin + idx.max(0) * h
  vent_mm = origin + np.argwhere(maps[_VENT] < 0) * h
  wm_vox = np.argwhere((maps[_WMF] < 0) & (maps[_VENT] > 0))
  grad = np.stack(np.gradient(maps[_VENT], h))[:, wm_vox[:, 0], wm_vox[:, 1], wm_vox[:, 2]].T
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
    _atomic_write(path, lambda f: np.savez(f, **dataclasses.asdict(template)))
  return template


# ---------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
  """Calls ``write(file)`` on a temp file next to ``path``, then renames it (mode 644)."""
  with fileio.atomic_path(path) as tmp, tmp.open("wb") as f:
    write(f)


def _ramp(u: np.ndarray, width_mm: float) -> np.ndarray:
  """Partial-volume fraction of a voxel whose centre is ``u`` mm inside a boundary."""
  return np.clip(0.5 + u / width_mm, 0.0, 1.0)


def _interp_axis(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
  """Linear interpolation of ``a`` along ``axis`` at float indices ``pos`` (clamped)."""
  n = a.shape[axis]
  pos = np.clip(pos, 0, n - 1)
  i0 = np.minimum(np.floor(pos).astype(np.intp), max(n - 2, 0))
  w = (pos - i0).astype(np.float32)
  shape = [1] * a.ndim
  shape[axis] = len(pos)
  a0 = np.take(a, i0, axis=axis)
  a1 = np.take(a, np.minimum(i0 + 1, n - 1), axis=axis)
  return a0 + (a1 - a0) * w.reshape(shape)


def _resample_separable(a: np.ndarray, positions: Sequence[np.ndarray]) -> np.ndarray:
  """Separable linear resampling of the last three axes at float indices per axis
  (shrinking axes first, to keep the intermediate arrays small)."""
  lead = a.ndim - 3
  for k in sorted(range(3), key=lambda k: len(positions[k]) / a.shape[lead + k]):
    a = _interp_axis(a, lead + k, positions[k])
  return a


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
  """3x3 rotation matrix from (x, y, z) Euler angles in radians."""
  cx, cy, cz = np.cos(angles_rad)
  sx, sy, sz = np.sin(angles_rad)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Unit-variance smooth random field on a coarse grid ``shape`` (float32)."""
  field = ndi.gaussian_filter(rng.standard_normal(shape), 1.0, mode="wrap")
  return (field / field.std()).astype(np.float32)


# ---------------------------------------------------------------------------
# Subject and scan parameters


@dataclasses.dataclass(frozen=True, eq=False)
class Lesion:
  """An ellipsoidal lesion defined in template space.

  Attributes:
    centre_mm: template-space (MNI) centre, mm.
    axes: ``(3, 3)`` unit vectors (rows) of the ellipsoid axes.
    radii_mm: semi-axes along ``axes`` (mm, subject size).
    kind: "pv", "jc", "deep" or "other" (label-2 pathology).
    onset: longitudinal onset time in [-1.5, 1] (present when time >= onset).
  """
  centre_mm: np.ndarray
  axes: np.ndarray
  radii_mm: np.ndarray
  kind: str
  onset: float = -1.0


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
  """Per-subject anatomy and pathology (shared by a longitudinal subject's scans).

  Attributes:
    load_ml: nominal lesion load at the last time point (mL).
    scale: head-size scaling (x, y, z).
    warp_mm: ``(3, gx, gy, gz)`` coarse smooth displacement field (mm).
    vent_grow_mm: ventricle boundary shift outwards (mm).
    cortex_shrink_mm: parenchyma boundary shift inwards (sulcal widening, mm).
    wm_shrink_mm: white-matter boundary shift inwards (mm).
    pv_share: share of the vascular load in the periventricular band.
    pv_noise: coarse template-space field modulating the band thickness.
    contrast_jitter: per-tissue multiplicative FLAIR intensity jitter.
    lesions: deep/MS/other lesions.
  """
  load_ml: float
  scale: np.ndarray
  warp_mm: np.ndarray
  vent_grow_mm: float
  cortex_shrink_mm: float
  wm_shrink_mm: float
  pv_share: float
  pv_noise: np.ndarray
  contrast_jitter: dict[str, float]
  lesions: tuple[Lesion, ...]


# Correlation of the latent WMH load with the latent atrophy. With the boundary
# shifts in make_subject it gives Pearson r of WMH volume with ventricle, WM and
# CSF volume of 0.4-0.5 in absolute value (700 local subjects, seed 1: 0.43,
# -0.43, 0.50; paper §3: 0.41, 0.47, 0.45).
_ATROPHY_CORRELATION = 0.70
_HEAD_SCALE = 0.9               # MNI brains are ~10 % larger (linear) than average
_WARP_NODES = (6, 7, 6)         # coarse grid of the smooth random warp (sd 2 mm)
_PV_NOISE_NODES = (14, 17, 14)  # coarse grid modulating the periventricular band


def _rng(seed: int, domain: str, kind: int, index: int) -> np.random.Generator:
  """Generator for (seed, domain, kind: 0 subject / 1 scan, index)."""
  return np.random.default_rng([seed, zlib.crc32(domain.encode()), kind, index])


def _subject_layout(domain: Domain) -> list[tuple[int, int, int]]:
  """Per scan: (subject index, time point, number of time points)."""
  if not domain.longitudinal:
    return [(i, 0, 1) for i in range(domain.n_scans)]
  n_subjects = max(1, round(domain.n_scans / 4.2))
  base, extra = divmod(domain.n_scans, n_subjects)
  return [(s, t, base + (s < extra)) for s in range(n_subjects)
          for t in range(base + (s < extra))]


def _sampler(candidates: np.ndarray,
             weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(indices, cumulative weights) to draw among the True entries of ``candidates``."""
  idx = np.flatnonzero(candidates)
  return idx, np.cumsum(np.ones(len(idx)) if weights is None else weights[idx])


def _pick(rng: np.random.Generator, sampler: tuple[np.ndarray, np.ndarray]) -> int:
  """One weighted random draw from a :func:`_sampler`."""
  idx, cum = sampler
  return int(idx[min(np.searchsorted(cum, rng.uniform(0, cum[-1]), side="right"), len(idx) - 1)])


def _random_axes(rng: np.random.Generator, first: np.ndarray | None = None) -> np.ndarray:
  """Random orthonormal axes (rows); the first one is ``first`` when given."""
  v = rng.standard_normal((3, 3))
  if first is not None:
    v[0] = first
  q, _ = np.linalg.qr(v.T)
  q = q.T * np.sign(np.einsum("ij,ij->i", q.T, v))[:, None]
  return q


def _wm_candidates(t: Template, shift_mm: tuple[float, float, float]) -> dict[str, np.ndarray]:
  """Bool masks over ``t.wm_pos_mm`` of the voxels eligible for each lesion kind after
  the atrophy ``shift_mm`` (ventricle growth, cortex and WM shrinkage), plus
  ``d_vent``: their distance (mm) to the grown ventricles."""
  vent_grow, _, wm_shrink = shift_mm
  d_vent = t.wm_maps[:, _VENT] - vent_grow
  depth = -(t.wm_maps[:, _WMF] + wm_shrink)
  z = t.wm_pos_mm[:, 2]
  cortex = t.wm_maps[:, _ICV]
  in_wm = (depth > 0) & (d_vent > 0)
  return {
      "deep": in_wm & (depth > 2.5) & (d_vent > 4) & (cortex < -12) & (z > -8),
      "pv": in_wm & (d_vent > 1) & (d_vent < 6) & (z > -5),
      "jc": in_wm & (depth > 0.6) & (depth < 2.5) & (cortex > -25) & (d_vent > 10) & (z > -20),
      "other": in_wm & (d_vent > 3) & (d_vent < 15) & (np.abs(t.wm_pos_mm[:, 0]) < 35)
               & (z > -5) & (z < 22),
      "d_vent": d_vent,
  }


def _ellipsoid_volume_ml(radii: np.ndarray) -> float:
  """Volume (mL) of an ellipsoid with semi-axes ``radii`` (mm)."""
  return float(4.0 / 3.0 * math.pi * np.prod(radii) / 1000.0)


def _vascular_lesions(rng: np.random.Generator, t: Template, cand: dict[str, np.ndarray],
                      volume_ml: float) -> list[Lesion]:
  """Deep punctate foci (clusters at high load) filling ``volume_ml``."""
  lesions: list[Lesion] = []
  deep = _sampler(cand["deep"], np.exp(-np.clip(cand["d_vent"], 0, None) / 20.0))
  median_r = 1.5 + 0.6 * math.log1p(volume_ml / 3.0)
  total = 0.0
  while total < volume_ml and len(deep[0]):
    i = _pick(rng, deep)
    centre = t.wm_pos_mm[i].astype(np.float64)
    for _ in range(1 + rng.poisson(min(volume_ml / 10.0, 3.0))):
      radii = np.clip(median_r * np.exp(rng.normal(0, 0.3, 3)) * [1, 1, 1.15], 0.9, 7.0)
      lesions.append(Lesion(centre, _random_axes(rng), radii, "deep"))
      total += 0.8 * _ellipsoid_volume_ml(radii)
      centre = centre + rng.normal(0, 1.0, 3) * radii.mean()
  return lesions


def _ms_lesions(rng: np.random.Generator, t: Template, cand: dict[str, np.ndarray],
                volume_ml: float, longitudinal: bool) -> list[Lesion]:
  """Ovoid periventricular (Dawson-finger), juxtacortical and deep lesions."""
  lesions: list[Lesion] = []
  samplers = {kind: _sampler(cand[kind]) for kind in ("pv", "jc", "deep")}
  total = 0.0
  while total < volume_ml:
    kind = str(rng.choice(["pv", "jc", "deep"], p=[0.5, 0.3, 0.2]))
    i = _pick(rng, samplers[kind])
    if kind == "pv":
      radii = np.array([rng.uniform(3.0, 7.0), rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)])
      axes = _random_axes(rng, t.wm_vent_dir[i].astype(np.float64))
    else:
      radii = rng.uniform(1.5, 3.5 if kind == "jc" else 4.5) * np.exp(rng.normal(0, 0.2, 3))
      axes = _random_axes(rng)
    onset = float(rng.uniform(-1.5, 1.0)) if longitudinal else -1.0
    lesions.append(Lesion(t.wm_pos_mm[i].astype(np.float64), axes, radii, kind, onset))
    total += 0.8 * _ellipsoid_volume_ml(radii)
  return lesions


def make_subject(domain: Domain, subject: int, seed: int, t: Template) -> Subject:
  """Draws one subject's anatomy and pathology from (seed, domain, subject)."""
  rng = _rng(seed, domain.name, 0, subject)
  z_load = rng.standard_normal()
  atrophy = (_ATROPHY_CORRELATION * z_load
             + math.sqrt(1 - _ATROPHY_CORRELATION ** 2) * rng.standard_normal())
  load = domain.load_median_ml * math.exp(domain.load_sigma * z_load)
  # Boundary shifts (mm): ventricles grow, cortex and white matter shrink.
  shift = (2.2 * math.exp(0.4 * atrophy + 0.3 * rng.standard_normal()),
           max(0.8 + 0.45 * atrophy + 0.3 * rng.standard_normal(), 0.1),
           0.4 * math.exp(0.48 * atrophy))
  cand = _wm_candidates(t, shift)
  pv_share = float(rng.uniform(0.45, 0.7)) if domain.lesion_type == "vascular" else 0.0
  if domain.lesion_type == "vascular":
    lesions = _vascular_lesions(rng, t, cand, load * (1 - pv_share))
  else:
    lesions = _ms_lesions(rng, t, cand, load, domain.longitudinal)
  if rng.uniform() < domain.other_pathology_rate:
    i = _pick(rng, _sampler(cand["other"]))
    lesions.append(Lesion(t.wm_pos_mm[i].astype(np.float64), _random_axes(rng),
                          rng.uniform(2.0, 4.5, 3), "other"))
  jitter = {k: float(np.exp(rng.normal(0, 0.04))) for k in ("csf", "gm", "wmh", "other")}
  return Subject(
      load_ml=load, scale=rng.normal(_HEAD_SCALE, 0.025) * np.exp(rng.normal(0, 0.015, 3)),
      warp_mm=rng.normal(0, 2.0, (3,) + _WARP_NODES).astype(np.float32),
      vent_grow_mm=shift[0], cortex_shrink_mm=shift[1], wm_shrink_mm=shift[2],
      pv_share=pv_share, pv_noise=_smooth_noise(rng, _PV_NOISE_NODES), contrast_jitter=jitter,
      lesions=tuple(lesions))


# ---------------------------------------------------------------------------
# One scan


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticScan:
  """One generated scan on its acquisition grid, RAS voxel order.

  Attributes:
    image: float32 ``(x, y, z)`` FLAIR-like intensities (scanner units, integers).
    labels: uint8 ``(x, y, z)`` annotation: 0 background, 1 WMH, 2 other pathology.
    tissue: uint8 ``(x, y, z)`` generator tissue codes (``TISSUE_NAMES``).
    affine: 4x4 voxel → world (mm), RAS.
    spacing_mm: voxel size (x, y, z) in mm.
    site: the scanner.
  """
  image: np.ndarray
  labels: np.ndarray
  tissue: np.ndarray
  affine: np.ndarray
  spacing_mm: np.ndarray
  site: Site


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Axis-aligned scanner grid: voxel centres at ``origin_mm + spacing_mm * index``."""
  spacing_mm: np.ndarray
  shape: tuple[int, int, int]
  origin_mm: np.ndarray

  def axes(self) -> list[np.ndarray]:
    """World coordinates (mm) of the voxel centres along each axis."""
    return [self.origin_mm[k] + self.spacing_mm[k] * np.arange(self.shape[k]) for k in range(3)]


@dataclasses.dataclass(frozen=True)
class _Pose:
  """Scanner → template: ``centre + matrix @ (x - shift) + warp(x - shift)`` (mm)."""
  matrix: np.ndarray        # (3, 3) diag(1 / scale) @ rotation
  rotation: np.ndarray      # (3, 3)
  shift_mm: np.ndarray      # (3,) head position in the scanner
  warp_lo_mm: np.ndarray    # (3,) position of the first warp node
  warp_step_mm: np.ndarray  # (3,) warp node spacing


def _grids(t: Template, site: Site, resolution_scale: float) -> tuple[_Grid, _Grid]:
  """Acquisition grid and 2 mm working grid over the same field of view."""
  fov = 2.0 * (t.half_extent_mm * _HEAD_SCALE * 1.06 + 8.0)
  spacing = np.asarray(site.spacing_mm, np.float64) * resolution_scale
  shape = np.ceil(fov / spacing).astype(int)
  h = np.full(3, TEMPLATE_SPACING_MM * resolution_scale)
  w_shape = np.ceil(fov / h).astype(int) + 3
  return (_Grid(spacing, tuple(shape), -(shape - 1) / 2 * spacing),
          _Grid(h, tuple(w_shape), -(w_shape - 1) / 2 * h))


def _make_pose(rng: np.random.Generator, sub: Subject, grid: _Grid) -> _Pose:
  """Random head rotation (sd 3 deg) and position (sd 3 mm); warp over the FOV."""
  rotation = _rotation(np.radians(rng.normal(0, 3.0, 3)))
  lo = grid.origin_mm - grid.spacing_mm / 2
  return _Pose(matrix=np.diag(1.0 / sub.scale) @ rotation, rotation=rotation,
               shift_mm=rng.normal(0, 3.0, 3), warp_lo_mm=lo,
               warp_step_mm=-2 * lo / (np.array(sub.warp_mm.shape[1:]) - 1))


def _warp_at(sub: Subject, pose: _Pose, rel_axes: Sequence[np.ndarray]) -> np.ndarray:
  """Warp (mm) ``(3, nx, ny, nz)`` on the axis-aligned grid ``rel_axes`` (= x - shift)."""
  pos = [(rel_axes[k] - pose.warp_lo_mm[k]) / pose.warp_step_mm[k] for k in range(3)]
  return _resample_separable(sub.warp_mm, pos)


def _template_coords(t: Template, sub: Subject, pose: _Pose,
                     axes: Sequence[np.ndarray]) -> np.ndarray:
  """Template positions (mm) ``(3, nx, ny, nz)`` of the scanner grid ``axes``."""
  rel = [axes[k] - pose.shift_mm[k] for k in range(3)]
  out = _warp_at(sub, pose, rel)
  for i in range(3):
    out[i] += t.centre_mm[i] + (pose.matrix[i, 0] * rel[0][:, None, None]
                                + pose.matrix[i, 1] * rel[1][None, :, None]
                                + pose.matrix[i, 2] * rel[2][None, None, :])
  return out


def _to_scanner(t: Template, sub: Subject, pose: _Pose, x_t: np.ndarray) -> np.ndarray:
  """Scanner positions (mm) ``(n, 3)`` of template points ``x_t`` ``(n, 3)``
  (fixed-point inverse of the warp)."""
  inv_t = np.linalg.inv(pose.matrix).T
  rel_t = x_t - t.centre_mm
  x = pose.shift_mm + rel_t @ inv_t
  for _ in range(3):
    idx = ((x - pose.shift_mm - pose.warp_lo_mm) / pose.warp_step_mm).T
    warp = np.stack([ndi.map_coordinates(sub.warp_mm[k], idx, order=1, mode="nearest")
                     for k in range(3)], axis=1)
    x = pose.shift_mm + (rel_t - warp) @ inv_t
  return x


def _cap_weight(t: Template, y_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
  """Periventricular lesion preference at template (y, z): caps at the frontal and
  occipital horns, thin bands along the bodies, none around the temporal horns."""
  back, front = t.vent_box_mm[:, 1]
  caps = (0.08 + 1.1 * np.exp(-((y_mm - front) / 9.0) ** 2)
          + 0.9 * np.exp(-((y_mm - back) / 9.0) ** 2))
  return caps / (1.0 + np.exp(-(z_mm - 2.0) / 3.0))


def _pv_weight(t: Template, sub: Subject, x_t: np.ndarray) -> np.ndarray:
  """Local periventricular band thickness factor at template points ``x_t`` (3, n)."""
  lo = t.centre_mm - t.half_extent_mm
  idx = [(x_t[k] - lo[k]) / (2 * t.half_extent_mm[k]) * (sub.pv_noise.shape[k] - 1)
         for k in range(3)]
  noise = ndi.map_coordinates(sub.pv_noise, idx, order=1, mode="nearest")
  return _cap_weight(t, x_t[1], x_t[2]) * np.exp(0.5 * noise)


def _pv_depth(t: Template, sub: Subject, volume_ml: float, vent_grow: float) -> float:
  """Band depth D such that the band (distance to the grown ventricles below
  ``D * weight``) holds ``volume_ml`` of the subject's white matter."""
  d_vent = t.wm_maps[:, _VENT] - vent_grow
  ok = (d_vent > 0) & (t.wm_maps[:, _WMF] + sub.wm_shrink_mm < 0)
  weight = _pv_weight(t, sub, t.wm_pos_mm[ok].T.astype(np.float64))
  ratio = np.sort(d_vent[ok] / np.maximum(weight, 1e-3))
  k = int(volume_ml * 1000.0 / (t.spacing_mm ** 3 * np.prod(sub.scale)))
  return 0.0 if k <= 0 else float(ratio[min(k, len(ratio) - 1)])


def _sample_working(t: Template, sub: Subject, pose: _Pose, grid: _Grid,
                    vent_grow: float, pv_depth: float) -> np.ndarray:
  """Template maps on the working grid ``(6, nx, ny, nz)``: the five template
  channels and the periventricular band depth (mm, > 0 inside the band).
  Voxels far outside the brain get distances of +1e3 mm."""
  x_t = _template_coords(t, sub, pose, grid.axes())
  idx = (x_t - t.origin_mm[:, None, None, None]) / t.spacing_mm
  out = np.full((6,) + grid.shape, 1e3, np.float32)
  out[_SULC] = 0.0
  out[_PV] = -1e3
  out[_ICV] = ndi.map_coordinates(t.maps[_ICV], idx, order=1, mode="nearest")
  inside = out[_ICV] < 3.0
  for c in (_PAR, _SULC):
    out[c][inside] = ndi.map_coordinates(t.maps[c], idx[:, inside], order=1, mode="nearest")
  parenchyma = inside & (out[_PAR] < 3.0)
  out[_WMF][parenchyma] = ndi.map_coordinates(t.maps[_WMF], idx[:, parenchyma], order=1,
                                              mode="nearest")
  reach = 35.0 + vent_grow
  near = parenchyma & np.all((x_t > t.vent_box_mm[0, :, None, None, None] - reach)
                             & (x_t < t.vent_box_mm[1, :, None, None, None] + reach), axis=0)
  out[_VENT][near] = ndi.map_coordinates(t.maps[_VENT], idx[:, near], order=1, mode="nearest")
  if pv_depth > 0:
    near &= out[_VENT] - vent_grow < 30.0
    out[_PV][near] = pv_depth * _pv_weight(t, sub, x_t[:, near]) - (out[_VENT][near] - vent_grow)
  return out


def _brain_box(icv_sdf: np.ndarray, work: _Grid, grid: _Grid) -> tuple[slice, ...]:
  """Output-grid slices covering every working voxel within 3 mm of the brain."""
  near = icv_sdf < 3.0
  box = []
  for k in range(3):
    other = tuple(j for j in range(3) if j != k)
    hits = np.flatnonzero(near.any(axis=other))
    lo_mm = work.origin_mm[k] + (hits[0] - 1) * work.spacing_mm[k]
    hi_mm = work.origin_mm[k] + (hits[-1] + 1) * work.spacing_mm[k]
    i0 = max(int(np.floor((lo_mm - grid.origin_mm[k]) / grid.spacing_mm[k])), 0)
    i1 = min(int(np.ceil((hi_mm - grid.origin_mm[k]) / grid.spacing_mm[k])) + 1, grid.shape[k])
    box.append(slice(i0, i1))
  return tuple(box)


def _render_lesions(u: np.ndarray, blobs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    axes: Sequence[np.ndarray], width_mm: float) -> None:
  """In place: ``u = max(u, depth inside ellipsoid, mm)`` for scanner-space ellipsoids
  (centre (3,), axes rows (3, 3), radii (3,)) on the grid with coordinates ``axes``."""
  for centre, rows, radii in blobs:
    reach = radii.max() + width_mm
    box = [slice(int(np.searchsorted(axes[k], centre[k] - reach)),
                 int(np.searchsorted(axes[k], centre[k] + reach))) for k in range(3)]
    if any(b.stop <= b.start for b in box):
      continue
    d = [(axes[k][box[k]] - centre[k]).reshape([-1 if j == k else 1 for j in range(3)])
         for k in range(3)]
    q2 = sum(((rows[j, 0] * d[0] + rows[j, 1] * d[1] + rows[j, 2] * d[2]) / radii[j]) ** 2
             for j in range(3))
    depth = ((1.0 - np.sqrt(q2)) * radii.min()).astype(np.float32)
    np.maximum(u[tuple(box)], depth, out=u[tuple(box)])


def _lesion_fields(t: Template, sub: Subject, pose: _Pose, tau: float | None,
                   axes: Sequence[np.ndarray], width_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """(WMH blobs, other pathology) depth fields (mm, > 0 inside) on the grid ``axes``."""
  shape = tuple(len(a) for a in axes)
  u_les = np.full(shape, -1e3, np.float32)
  u_oth = np.full(shape, -1e3, np.float32)
  present = [les for les in sub.lesions if tau is None or tau >= les.onset]
  if not present:
    return u_les, u_oth
  centres = _to_scanner(t, sub, pose, np.stack([les.centre_mm for les in present]))
  for les, centre in zip(present, centres):
    grow = 1.0 if tau is None else min(1.0, 0.55 + 0.45 * (tau - les.onset) / 0.6)
    blob = (centre, les.axes @ pose.rotation, les.radii_mm * grow)
    _render_lesions(u_oth if les.kind == "other" else u_les, [blob], axes, width_mm)
  return u_les, u_oth


_SULCAL_MM = 15.0     # mm of boundary shift per unit of sulcal CSF probability
_SULCAL_LEVEL = 0.20  # sulcal CSF probability level of the CSF boundary (no atrophy)


def _tissue_fractions(ch: np.ndarray, sub: Subject, vent_grow: float, u_les: np.ndarray,
                      u_oth: np.ndarray, width: float) -> np.ndarray:
  """Partial-volume fractions ``(7, x, y, z)`` in ``TISSUE_NAMES`` order (sum 1)."""
  shrink = sub.cortex_shrink_mm
  icv = _ramp(-ch[_ICV], width)
  par_depth = np.maximum(ch[_PAR], _SULCAL_MM * (ch[_SULC] - _SULCAL_LEVEL))
  par = np.minimum(icv, _ramp(-(par_depth + shrink), width))
  wmf = np.minimum(par, _ramp(-(ch[_WMF] + sub.wm_shrink_mm), width))
  vent = np.minimum(par, _ramp(-(ch[_VENT] - vent_grow), width))
  wm = np.maximum(wmf - vent, 0)
  gm = par - np.maximum(wmf, vent)
  band = np.minimum(np.maximum(_ramp(ch[_PV], width) - vent, 0), wm)
  les = np.maximum(band, _ramp(u_les, width) * wm)
  oth = _ramp(u_oth, width)
  keep = 1.0 - oth
  return np.stack([1.0 - icv, icv - par, vent, gm * keep, (wm - les) * keep, les * keep,
                   oth * (wm + gm)])


def _bias_field(rng: np.random.Generator, amplitude: float, axes: Sequence[np.ndarray],
                half_fov_mm: np.ndarray) -> np.ndarray:
  """Smooth multiplicative field exp(quadratic polynomial), float32 ``(nx, ny, nz)``."""
  x, y, z = (axes[k] / half_fov_mm[k] for k in range(3))
  c = rng.normal(0, amplitude, 9) * np.array([1, 1, 1, .5, .5, .5, .5, .5, .5])
  xy = (c[0] * x[:, None] + c[1] * y[None, :] + c[3] * x[:, None] ** 2
        + c[4] * y[None, :] ** 2 + c[6] * x[:, None] * y[None, :])
  log = (xy[:, :, None] + (c[2] * z + c[5] * z ** 2)[None, None, :]
         + (c[7] * x[:, None, None] + c[8] * y[None, :, None]) * z[None, None, :])
  return np.exp(log).astype(np.float32)


def _flair(rng: np.random.Generator, frac: np.ndarray, contrast: Mapping[str, float],
           site: Site, axes: Sequence[np.ndarray], half_fov_mm: np.ndarray) -> np.ndarray:
  """FLAIR-like image (scanner units, rounded) from tissue fractions: tissue contrast,
  lesion texture, bias field, gain and Rician noise; 0 outside the head."""
  pos = [(axes[k] / half_fov_mm[k] + 1) * 5.5 for k in range(3)]
  texture = _resample_separable(_smooth_noise(rng, (12, 12, 12)), pos)
  gain = site.gain * math.exp(rng.normal(0, 0.08))
  signal = ((frac[CSF] + frac[VENTRICLE]) * contrast["csf"] + frac[GM] * contrast["gm"]
            + frac[WM] + frac[WMH] * contrast["wmh"] * (1 + 0.05 * texture)
            + frac[OTHER] * contrast["other"]) * (1 + 0.03 * texture)
  signal *= _bias_field(rng, site.bias, axes, half_fov_mm) * gain
  brain = frac[BACKGROUND] < 1.0
  clean = signal[brain]
  sigma = site.noise * gain
  image = np.zeros(signal.shape, np.float32)
  image[brain] = np.rint(np.hypot(clean + sigma * rng.standard_normal(clean.size, np.float32),
                                  sigma * rng.standard_normal(clean.size, np.float32)))
  return image


def _annotate(tissue: np.ndarray, dilate: bool) -> np.ndarray:
  """uint8 label map: 1 WMH, 2 other; optionally WMH drawn one voxel wider in-plane."""
  wmh = tissue == WMH
  if dilate:
    cross = np.zeros((3, 3, 1), bool)
    cross[1, :, 0] = cross[:, 1, 0] = True
    wmh = ndi.binary_dilation(wmh, cross) & np.isin(tissue, (GM, WM, WMH))
  labels = wmh.astype(np.uint8)
  labels[tissue == OTHER] = 2
  return labels


def generate_scan(domain: Domain, index: int, seed: int, resolution_scale: float = 1.0,
                  template: Template | None = None) -> SyntheticScan:
  """Generates scan ``index`` of ``domain``; depends only on (seed, domain, index).

  Args:
    domain: the data set (sites, lesion type, load distribution).
    index: scan number in the domain, 0-based.
    seed: cohort seed.
    resolution_scale: multiplies every voxel size (2.0: 8x fewer voxels; tests).
    template: the 2 mm template (default: built once per process).
  """
  t = template or load_template()
  subject, time_point, n_points = _subject_layout(domain)[index]
  site = domain.sites[(subject if domain.longitudinal else index) % len(domain.sites)]
  sub = make_subject(domain, subject, seed, t)
  tau = time_point / max(n_points - 1, 1) if domain.longitudinal else None
  vent_grow = sub.vent_grow_mm + (0.5 * tau if tau is not None else 0.0)
  pv_ml = sub.load_ml * sub.pv_share * (1.0 if tau is None else 0.6 + 0.4 * tau)
  pv_depth = _pv_depth(t, sub, pv_ml, vent_grow)
  grid, work_grid = _grids(t, site, resolution_scale)
  rng = _rng(seed, domain.name, 1, index)
  pose = _make_pose(rng, sub, grid)
  work = _sample_working(t, sub, pose, work_grid, vent_grow, pv_depth)
  box = _brain_box(work[_ICV], work_grid, grid)
  axes = [a[b] for a, b in zip(grid.axes(), box)]
  ch = _resample_separable(work, [(axes[k] - work_grid.origin_mm[k]) / work_grid.spacing_mm[k]
                                  for k in range(3)])
  width = float(np.prod(grid.spacing_mm) ** (1 / 3))
  u_les, u_oth = _lesion_fields(t, sub, pose, tau, axes, width)
  frac = _tissue_fractions(ch, sub, vent_grow, u_les, u_oth, width)
  field = min(_CONTRAST, key=lambda f: abs(f - site.field_strength_t))
  contrast = {k: v * sub.contrast_jitter.get(k, 1.0) for k, v in _CONTRAST[field].items()}
  half_fov = np.asarray(grid.shape) * grid.spacing_mm / 2
  image = np.zeros(grid.shape, np.float32)
  image[box] = _flair(rng, frac, contrast, site, axes, half_fov)
  tissue = np.zeros(grid.shape, np.uint8)
  tissue[box] = np.argmax(frac, axis=0)
  affine = np.eye(4)
  affine[:3, :3] = np.diag(grid.spacing_mm)
  affine[:3, 3] = grid.origin_mm
  return SyntheticScan(image=image, labels=_annotate(tissue, domain.dilate_mask), tissue=tissue,
                       affine=affine, spacing_mm=grid.spacing_mm, site=site)


# ---------------------------------------------------------------------------
# Writing a domain


@dataclasses.dataclass(frozen=True)
class _Task:
  """Everything a worker process needs to write one scan."""
  domain: Domain
  index: int
  seed: int
  resolution_scale: float
  folder: str
  template_cache: str


def _stored(scan: SyntheticScan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image, labels, affine) in the site's stored voxel order and image type."""
  image = scan.image
  if scan.site.dtype == "uint8":
    image = np.clip(image, 0, 255).astype(np.uint8)
  if scan.site.orientation == "RAS":
    return image, scan.labels, scan.affine
  affine = scan.affine.copy()
  affine[:3, 3] += affine[:3, 0] * (image.shape[0] - 1)
  affine[:3, 0] *= -1
  return image[::-1], scan.labels[::-1], affine


def _file_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size (mm) as a loader reads it back: column norms of the float32 affine."""
  stored = np.asarray(affine, np.float32).astype(np.float64)
  return tuple(float(s) for s in np.linalg.norm(stored[:3, :3], axis=0))


def _scan_ids(domain: Domain, index: int) -> tuple[str, str, int | None]:
  """(subject_id, scan_id, time point or None)."""
  subject, time_point, _ = _subject_layout(domain)[index]
  if domain.longitudinal:
    sid = f"{domain.name}-s{subject:03d}"
    return sid, f"{sid}-t{time_point}", time_point
  sid = f"{domain.name}-{index:04d}"
  return sid, sid, None


def _write_scan(task: _Task) -> dict[str, Any]:
  """Generates, writes (image + label NIfTI) and describes one scan (manifest row)."""
  domain = task.domain
  scan = generate_scan(domain, task.index, task.seed, task.resolution_scale,
                       load_template(task.template_cache))
  image, labels, affine = _stored(scan)
  subject_id, scan_id, time_point = _scan_ids(domain, task.index)
  folder = Path(task.folder)
  image_path = folder / "images" / f"{scan_id}_flair.nii.gz"
  mask_path = folder / "masks" / f"{scan_id}_wmh.nii.gz"
  nifti.save_nifti(image_path, image, affine)
  nifti.save_nifti(mask_path, labels, affine)
  spacing = _file_spacing(affine)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  counts = np.bincount(scan.tissue.ravel(), minlength=len(TISSUE_NAMES))
  row: dict[str, Any] = {
      "subject_id": subject_id, "scan_id": scan_id, "image": str(image_path),
      "mask": str(mask_path), "wmh_volume_ml": nifti.volume_ml(labels == 1, spacing),
      "severity": None, "dataset": domain.name, "site": scan.site.name, "split": None,
      "ventricle_ml": float(counts[VENTRICLE]) * voxel_ml,
      "white_matter_ml": float(counts[WM]) * voxel_ml,
      "csf_ml": float(counts[CSF] + counts[VENTRICLE]) * voxel_ml,
      "lesion_type": domain.lesion_type, "field_strength_t": scan.site.field_strength_t,
      "spacing_mm": "x".join(f"{s:g}" for s in scan.site.spacing_mm),
  }
  if time_point is not None:
    row["timepoint"] = time_point
  return row


def _severity(volumes_ml: Sequence[float]) -> list[int]:
  """Grades 0-4 from the domain's volume quintiles (ties go to the lower grade)."""
  edges = np.quantile(np.asarray(volumes_ml, np.float64), [0.2, 0.4, 0.6, 0.8])
  return [int(np.searchsorted(edges, v, side="left")) for v in volumes_ml]


def _finish_rows(rows: list[dict[str, Any]], domain: Domain, seed: int) -> list[dict[str, Any]]:
  """Adds severity and split (local: seeded 60/20/20 by subject; others: test)."""
  for row, grade in zip(rows, _severity([r["wmh_volume_ml"] for r in rows])):
    row["severity"] = grade
  if domain.name == "local":
    return manifest.assign_splits(rows, seed, (0.6, 0.2, 0.2))
  for row in rows:
    row["split"] = "test"
  return rows


def _generation_params(domain: Domain, seed: int, resolution_scale: float) -> dict[str, Any]:
  """JSON-ready description of everything that determines a domain's files."""
  params = {"code_version": CODE_VERSION, "seed": seed, "resolution_scale": resolution_scale,
            "domain": dataclasses.asdict(domain)}
  return json.loads(json.dumps(params))


def _is_current(folder: Path, params: dict[str, Any]) -> bool:
  """True when ``folder`` holds a complete domain generated with ``params``."""
  try:
    stored = json.loads((folder / PARAMS_NAME).read_text())
    return stored == params and len(manifest.read_manifest(folder / MANIFEST_NAME)) > 0
  except (OSError, ValueError, manifest.ManifestError):
    return False


def _replace_dir(partial: Path, final: Path) -> None:
  """Moves the finished ``partial`` folder to ``final`` (replacing an old one)."""
  old = final.with_name(f".{final.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    final.rename(old)
  partial.rename(final)
  shutil.rmtree(old, ignore_errors=True)


def _generate_domain(domain: Domain, seed: int, resolution_scale: float, out_dir: Path,
                     template_cache: Path, pool: Any, progress: bool) -> None:
  """Writes ``out_dir/<domain>/`` (images, masks, manifest, parameters) atomically."""
  from tqdm import tqdm  # noqa: PLC0415  (progress bar only)
  partial = out_dir / f".{domain.name}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  tasks = [_Task(domain, i, seed, resolution_scale, str(partial), str(template_cache))
           for i in range(domain.n_scans)]
  results = pool.imap(_write_scan, tasks, chunksize=2) if pool else map(_write_scan, tasks)
  rows = list(tqdm(results, total=len(tasks), desc=f"cohort {domain.name}", unit="scan",
                   disable=not progress))
  manifest.write_manifest(partial / MANIFEST_NAME, _finish_rows(rows, domain, seed))
  params = _generation_params(domain, seed, resolution_scale)
  _atomic_write(partial / PARAMS_NAME, lambda f: f.write(json.dumps(params, indent=1).encode()))
  _replace_dir(partial, out_dir / domain.name)


def cohort_domains(n_local: int, domains: Sequence[str] | None = None,
                   sizes: Mapping[str, int] | None = None) -> list[Domain]:
  """The requested domains with their sizes (``local``: ``n_local``; others: default
  or ``sizes[name]``)."""
  names = list(DOMAINS) if domains is None else list(domains)
  unknown = [n for n in names if n not in DOMAINS]
  if unknown:
    raise ValueError(f"unknown cohort domain(s) {unknown}; choose from {list(DOMAINS)}")
  counts = {**{n: d.n_scans for n, d in DOMAINS.items()}, **(sizes or {}), "local": n_local}
  return [dataclasses.replace(DOMAINS[n], n_scans=int(counts[n])) for n in names]


def ensure_cohort(out_dir: str | os.PathLike, n_local: int, seed: int,
                  domains: Sequence[str] | None = None, *,
                  sizes: Mapping[str, int] | None = None, resolution_scale: float = 1.0,
                  workers: int = 2, progress: bool = True) -> dict[str, Path]:
  """Generates the synthetic cohort where missing or out of date; returns manifests.

  Each domain lives in ``out_dir/<name>/`` (``images/``, ``masks/``,
  ``manifest.csv``, ``generation.json``) and is regenerated only when its
  generation parameters (code version, seed, size, sites, resolution) change.
  Scan ``i`` depends only on (seed, domain, i), so the worker count does not
  change the files.

  Args:
    out_dir: cohort root folder.
    n_local: number of ``local`` (training-domain) scans.
    seed: cohort seed.
    domains: names to ensure (default: all five).
    sizes: scan counts overriding the external domains' defaults.
    resolution_scale: multiplies every voxel size (tests use ~2 for speed).
    workers: processes (spawned) for generation; <= 1 generates in-process.
    progress: show a tqdm progress bar per domain.

  Returns:
    Domain name → absolute manifest path, in ``domains`` order.
  """
  out_dir = Path(os.path.abspath(out_dir))
  todo = cohort_domains(n_local, domains, sizes)
  stale = [d for d in todo
           if not _is_current(out_dir / d.name, _generation_params(d, seed, resolution_scale))]
  if stale:
    template_cache = out_dir / f".template_v{CODE_VERSION}.npz"
    load_template(template_cache)
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(min(workers, sum(d.n_scans for d in stale))) if workers > 1 else None
    try:
      for domain in stale:
        _generate_domain(domain, seed, resolution_scale, out_dir, template_cache, pool, progress)
    finally:
      if pool is not None:
        pool.close()
        pool.join()
  return {d.name: out_dir / d.name / MANIFEST_NAME for d in todo}


# ---------------------------------------------------------------------------
# Summary, overview figure, command line

CONFOUNDERS = manifest.CONFOUNDER_COLUMNS


def confounder_correlations(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Pearson r of ``wmh_volume_ml`` with each confounder volume (NaN if undefined)."""
  out = {}
  for column in CONFOUNDERS:
    pairs = np.array([(r["wmh_volume_ml"], r[column]) for r in rows
                      if r.get("wmh_volume_ml") is not None and r.get(column) is not None],
                     np.float64).reshape(-1, 2)
    ok = len(pairs) >= 3 and pairs.std(axis=0).min() > 0
    out[column] = float(np.corrcoef(pairs.T)[0, 1]) if ok else math.nan
  return out


def _spacings(rows: Sequence[Mapping[str, Any]]) -> str:
  """Distinct voxel sizes (mm) of the rows' images, from the NIfTI headers."""
  import nibabel as nib  # noqa: PLC0415
  seen = dict.fromkeys("x".join(f"{z:.2f}" for z in nib.load(r["image"]).header.get_zooms()[:3])
                       for r in rows)
  return ", ".join(seen)


def summarize(manifests: Mapping[str, str | os.PathLike]) -> str:
  """A text table: per domain the scan and subject counts, WMH volume median and
  range (mL), voxel sizes (mm) and Pearson r of WMH volume with the confounders."""
  header = (f"{'domain':<10} {'scans':>5} {'subj':>5} {'WMH median':>10} {'WMH range (mL)':>16}"
            f" {'r vent':>7} {'r WM':>7} {'r CSF':>7}  spacing (mm)")
  lines = [header, "-" * len(header)]
  for name, path in manifests.items():
    rows = manifest.read_manifest(path)
    vols = np.array([r["wmh_volume_ml"] for r in rows], np.float64)
    r = confounder_correlations(rows)
    lines.append(
        f"{name:<10} {len(rows):>5} {len({x['subject_id'] for x in rows}):>5} "
        f"{np.median(vols):>10.2f} {f'{vols.min():.2f}-{vols.max():.2f}':>16} "
        f"{r['ventricle_ml']:>7.2f} {r['white_matter_ml']:>7.2f} {r['csf_ml']:>7.2f}  "
        f"{_spacings(rows)}")
  return "\n".join(lines)


def _example_slice(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
  """(image, labels) axial slice with the most WMH, RAS, and the voxel size."""
  scan = nifti.load_image(row["image"])
  labels = nifti.load_labels(row["mask"], scan)
  z = int(np.argmax((labels == 1).sum(axis=(0, 1))))
  return scan.data[:, :, z], labels[:, :, z], scan.spacing_mm


def render_overview_png(manifests: Mapping[str, str | os.PathLike],
                        path: str | os.PathLike) -> None:
  """Writes a PNG with one axial slice per domain (the scan at the 75th volume
  percentile, the slice with most WMH), WMH contours red, other pathology cyan."""
  from matplotlib.figure import Figure  # noqa: PLC0415  (Agg, no pyplot state)
  fig = Figure(figsize=(4.2 * len(manifests), 5.2), layout="constrained")
  for k, (name, manifest_path) in enumerate(manifests.items()):
    rows = manifest.read_manifest(manifest_path)
    vols = np.array([r["wmh_volume_ml"] for r in rows])
    row = rows[int(np.argmin(np.abs(vols - np.quantile(vols, 0.75))))]
    image, labels, spacing = _example_slice(row)
    ax = fig.add_subplot(1, len(manifests), k + 1)
    ax.imshow(image.T, origin="lower", cmap="gray", aspect=spacing[1] / spacing[0],
              vmin=0, vmax=float(np.percentile(image[image > 0], 99.5)))
    for value, color in ((1, "red"), (2, "cyan")):
      if (labels == value).any():
        ax.contour((labels == value).T.astype(float), [0.5], colors=color, linewidths=0.7)
    ax.set_title(f"{name}: {row['scan_id']}\n{row['wmh_volume_ml']:.1f} mL, "
                 f"{row['site']}", fontsize=9)
    ax.set_axis_off()
  path = Path(path)
  _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))


def _disk_mb(folders: Sequence[Path]) -> float:
  return sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file()) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ensure the cohort, print the summary table, optionally write the PNG."""
  parser = argparse.ArgumentParser(prog="python -m wmh_jax.data.cohort",
                                   description="Generate the built-in synthetic WMH cohort.")
  parser.add_argument("--out", required=True, help="cohort folder")
  parser.add_argument("--n_local", type=int, default=240, help="local (training) scans")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated names")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--png", default=None, help="write an overview figure here")
  args = parser.parse_args(argv)
  names = [n for n in args.domains.split(",") if n]
  start = time.perf_counter()
  try:
    manifests = ensure_cohort(args.out, args.n_local, args.seed, names, workers=args.workers)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  n_scans = sum(len(manifest.read_manifest(p)) for p in manifests.values())
  print(summarize(manifests))
  print(f"{n_scans} scans, {seconds:.1f} s ({seconds / max(n_scans, 1):.2f} s/scan incl. "
        f"cached), {_disk_mb([p.parent for p in manifests.values()]):.0f} MB on disk")
  if args.png:
    render_overview_png(manifests, args.png)
    print(f"overview: {args.png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
