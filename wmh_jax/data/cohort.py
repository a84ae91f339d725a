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
inside the nilearn wheel. It is reduced once to 2 mm signed distance maps (mm,
negative inside) of the intracranial volume, the parenchyma, the white matter
(with the ventricles) and the lateral ventricles. A scan is made by

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

The mask is the voxels whose largest tissue fraction is lesion; confounder
volumes (ventricles, normal-appearing white matter, all CSF including the
ventricles) are counted from the same tissue label map.

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
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from wmh_jax.data import manifest, nifti

CODE_VERSION = 1
TEMPLATE_SPACING_MM = 2.0
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "generation.json"

# Tissue label map codes (the generator's own labels; the mask file only has
# 0 / 1 WMH / 2 other pathology).
BACKGROUND, CSF, VENTRICLE, GM, WM, WMH, OTHER = range(7)
TISSUE_NAMES = ("background", "csf", "ventricle", "gm", "wm", "wmh", "other")

# Distance-map channels of the template.
_ICV, _PAR, _WMF, _VENT = range(4)

# FLAIR-like intensities relative to normal white matter, by field strength (T).
_CONTRAST = {
    1.5: {"csf": 0.24, "gm": 1.28, "wm": 1.0, "wmh": 1.80, "other": 0.45},
    3.0: {"csf": 0.16, "gm": 1.36, "wm": 1.0, "wmh": 1.95, "other": 0.40},
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
  """
  name: str
  field_strength_t: float
  spacing_mm: tuple[float, float, float]
  gain: float
  noise: float
  bias: float
  orientation: str = "RAS"


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
        (Site("rss-ge-1.5t", 1.5, (1.0, 1.0, 3.0), 420.0, 0.045, 0.08),),
        load_median_ml=3.0, load_sigma=1.0),
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
    sdf: float32 ``(4, x, y, z)`` signed distances (mm, negative inside) to the
      intracranial volume, parenchyma (GM+WM+ventricles), white matter
      (+ventricles) and lateral ventricles.
    origin_mm: world (x, y, z) in mm of voxel (0, 0, 0).
    spacing_mm: voxel size (mm, isotropic).
    centre_mm: world centre of the intracranial volume's bounding box.
    half_extent_mm: half size of that bounding box (x, y, z) in mm.
    vent_y_mm: (min, max) world y of the lateral ventricles (mm).
    wm_pos_mm: float32 ``(n, 3)`` world position of white-matter voxels.
    wm_sdf: float32 ``(n, 4)`` distance maps at those voxels.
    wm_vent_dir: float32 ``(n, 3)`` unit gradient of the ventricle distance
      (points away from the ventricles).
  """
  sdf: np.ndarray
  origin_mm: np.ndarray
  spacing_mm: float
  centre_mm: np.ndarray
  half_extent_mm: np.ndarray
  vent_y_mm: np.ndarray
  wm_pos_mm: np.ndarray
  wm_sdf: np.ndarray
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
  vent1 = _lateral_ventricles(t1, np.clip(icv1 - gm - wm, 0, 1), origin_1mm)
  icv, par, wmf, vent = (_block_mean(m.astype(np.float32)) for m in (
      icv1, np.maximum(gm + wm, vent1), np.maximum(wm, vent1), vent1))
  idx = np.argwhere(icv >= 0.5)
  lo, hi = np.maximum(idx.min(0) - 6, 0), idx.max(0) + 7
  crop = tuple(slice(a, b) for a, b in zip(lo, hi))
  h = TEMPLATE_SPACING_MM
  sdf = np.stack([_signed_distance(m[crop] >= level, h)
                  for m, level in ((icv, 0.5), (par, 0.5), (wmf, 0.4), (vent, 0.5))])
  origin = origin_1mm + 0.5 + lo * h
  idx = np.argwhere(sdf[_ICV] < 0)
  lo_mm, hi_mm = origin + idx.min(0) * h, origin + idx.max(0) * h
  vy = origin[1] + np.argwhere(sdf[_VENT] < 0)[:, 1] * h
  wm_vox = np.argwhere((sdf[_WMF] < 0) & (sdf[_VENT] > 0))
  grad = np.stack(np.gradient(sdf[_VENT], h))[:, wm_vox[:, 0], wm_vox[:, 1], wm_vox[:, 2]].T
  grad /= np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-6)
  return Template(
      sdf=sdf, origin_mm=origin.astype(np.float64), spacing_mm=h,
      centre_mm=(lo_mm + hi_mm) / 2, half_extent_mm=(hi_mm - lo_mm) / 2 + h / 2,
      vent_y_mm=np.array([vy.min(), vy.max()]),
      wm_pos_mm=(origin + wm_vox * h).astype(np.float32),
      wm_sdf=sdf[:, wm_vox[:, 0], wm_vox[:, 1], wm_vox[:, 2]].T.copy(),
      wm_vent_dir=grad.astype(np.float32))


_TEMPLATE: dict[str, Template] = {}


def load_template(cache_path: str | os.PathLike | None = None) -> Template:
  """The 2 mm template: from memory, from ``cache_path`` (.npz), or built (and cached)."""
  key = str(cache_path)
  if key in _TEMPLATE:
    return _TEMPLATE[key]
  if cache_path is not None and Path(cache_path).is_file():
    with np.load(cache_path) as z:
      template = Template(**{f.name: z[f.name] for f in dataclasses.fields(Template)
                             if f.name != "spacing_mm"}, spacing_mm=float(z["spacing_mm"]))
  else:
    template = build_template()
    if cache_path is not None:
      _atomic_write(Path(cache_path), lambda f: np.savez(f, **dataclasses.asdict(template)))
  _TEMPLATE[key] = template
  return template


# ---------------------------------------------------------------------------
# Small helpers


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
  """Calls ``write(file)`` on a temp file next to ``path``, then renames it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


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


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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


_ATROPHY_CORRELATION = 0.6   # corr(latent WMH load, latent atrophy)
_HEAD_SCALE = 0.9            # MNI brains are ~10 % larger (linear) than average
_WARP_NODES = (6, 7, 6)
_PV_NOISE_NODES = (14, 17, 14)


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


def _pick(rng: np.random.Generator, candidates: np.ndarray, weights: np.ndarray | None = None) -> int:
  """A random index among the True entries of ``candidates`` (optionally weighted)."""
  idx = np.flatnonzero(candidates)
  if weights is None:
    return int(idx[rng.integers(len(idx))])
  p = weights[idx] / weights[idx].sum()
  return int(idx[rng.choice(len(idx), p=p)])


def _random_axes(rng: np.random.Generator, first: np.ndarray | None = None) -> np.ndarray:
  """Random orthonormal axes (rows); the first one is ``first`` when given."""
  v = rng.standard_normal((3, 3))
  if first is not None:
    v[0] = first
  q, _ = np.linalg.qr(v.T)
  q = q.T * np.sign(np.einsum("ij,ij->i", q.T, v))[:, None]
  return q


def _wm_candidates(t: Template, sub_shift: tuple[float, float, float]) -> dict[str, np.ndarray]:
  """Template white-matter voxels eligible for each lesion kind, after atrophy."""
  vent_grow, _, wm_shrink = sub_shift
  d_vent = t.wm_sdf[:, _VENT] - vent_grow
  depth = -(t.wm_sdf[:, _WMF] + wm_shrink)
  z = t.wm_pos_mm[:, 2]
  cortex = t.wm_sdf[:, _ICV]
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
  return float(4.0 / 3.0 * math.pi * np.prod(radii) / 1000.0)


def _vascular_lesions(rng: np.random.Generator, t: Template, cand: dict[str, np.ndarray],
                      volume_ml: float) -> list[Lesion]:
  """Deep punctate foci (clusters at high load) filling ``volume_ml``."""
  lesions: list[Lesion] = []
  weights = np.exp(-np.clip(cand["d_vent"], 0, None) / 20.0)
  median_r = 1.5 + 0.6 * math.log1p(volume_ml / 3.0)
  total = 0.0
  while total < volume_ml and cand["deep"].any():
    i = _pick(rng, cand["deep"], weights)
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
  total = 0.0
  while total < volume_ml:
    kind = rng.choice(["pv", "jc", "deep"], p=[0.5, 0.3, 0.2])
    i = _pick(rng, cand[kind])
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
  shift = (2.2 * math.exp(0.45 * atrophy), 0.5 * math.exp(0.35 * atrophy),
           0.4 * math.exp(0.5 * atrophy))
  cand = _wm_candidates(t, shift)
  pv_share = float(rng.uniform(0.45, 0.7)) if domain.lesion_type == "vascular" else 0.0
  if domain.lesion_type == "vascular":
    lesions = _vascular_lesions(rng, t, cand, load * (1 - pv_share))
  else:
    lesions = _ms_lesions(rng, t, cand, load, domain.longitudinal)
  if rng.uniform() < domain.other_pathology_rate:
    i = _pick(rng, cand["other"])
    lesions.append(Lesion(t.wm_pos_mm[i].astype(np.float64), _random_axes(rng),
                          rng.uniform(2.0, 4.5, 3), "other"))
  jitter = {k: float(np.exp(rng.normal(0, 0.04))) for k in ("csf", "gm", "wmh", "other")}
  return Subject(
      load_ml=load, scale=rng.normal(_HEAD_SCALE, 0.035) * np.exp(rng.normal(0, 0.015, 3)),
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
  """Scanner position (mm) of template point ``x_t`` (fixed-point inverse of the warp)."""
  inv = np.linalg.inv(pose.matrix)
  x = pose.shift_mm + inv @ (x_t - t.centre_mm)
  for _ in range(3):
    warp = _warp_at(sub, pose, [np.array([x[k] - pose.shift_mm[k]]) for k in range(3)])
    x = pose.shift_mm + inv @ (x_t - t.centre_mm - warp[:, 0, 0, 0])
  return x


def _cap_weight(t: Template, y_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
  """Periventricular lesion preference at template (y, z): caps at the frontal and
  occipital horns, thin bands along the bodies, none around the temporal horns."""
  front, back = t.vent_y_mm[1] - 8.0, t.vent_y_mm[0] + 12.0
  caps = (0.45 + 1.1 * np.exp(-((y_mm - front) / 14.0) ** 2)
          + 0.9 * np.exp(-((y_mm - back) / 14.0) ** 2))
  return caps / (1.0 + np.exp(-(z_mm - 2.0) / 3.0))


def _pv_ratio(t: Template, sub: Subject, x_t: np.ndarray, d_vent: np.ndarray) -> np.ndarray:
  """Periventricular band coordinate at template points ``x_t`` (3, n): distance to
  the grown ventricles (mm) over the local band preference; lesion below the depth."""
  lo = t.centre_mm - t.half_extent_mm
  idx = [(x_t[k] - lo[k]) / (2 * t.half_extent_mm[k]) * (sub.pv_noise.shape[k] - 1)
         for k in range(3)]
  noise = ndi.map_coordinates(sub.pv_noise, idx, order=1, mode="nearest")
  weight = _cap_weight(t, x_t[1], x_t[2]) * np.exp(0.35 * noise)
  return d_vent / np.maximum(weight, 1e-3)


def _pv_depth(t: Template, sub: Subject, volume_ml: float, vent_grow: float) -> float:
  """Band depth such that the band holds ``volume_ml`` of the subject's white matter."""
  d_vent = t.wm_sdf[:, _VENT] - vent_grow
  ok = (d_vent > 0) & (t.wm_sdf[:, _WMF] + sub.wm_shrink_mm < 0)
  ratio = np.sort(_pv_ratio(t, sub, t.wm_pos_mm[ok].T.astype(np.float64), d_vent[ok]))
  k = int(volume_ml * 1000.0 / (t.spacing_mm ** 3 * np.prod(sub.scale)))
  return 0.0 if k <= 0 else float(ratio[min(k, len(ratio) - 1)])


def _sample_working(t: Template, sub: Subject, pose: _Pose, grid: _Grid,
                    vent_grow: float, pv_on: bool) -> np.ndarray:
  """Distance maps ``(5, nx, ny, nz)`` on the working grid: icv, par, wmf, vent (mm)
  and the periventricular band coordinate; +1e3 where not needed (far away)."""
  x_t = _template_coords(t, sub, pose, grid.axes())
  idx = (x_t - t.origin_mm[:, None, None, None]) / t.spacing_mm
  out = np.full((5,) + grid.shape, 1e3, np.float32)
  out[_ICV] = ndi.map_coordinates(t.sdf[_ICV], idx, order=1, mode="nearest")
  inside = out[_ICV] < 3.0
  inside_idx = idx[:, inside]
  for c in (_PAR, _WMF, _VENT):
    out[c][inside] = ndi.map_coordinates(t.sdf[c], inside_idx, order=1, mode="nearest")
  if pv_on:
    near = inside & (out[_VENT] - vent_grow < 30.0)
    out[4][near] = _pv_ratio(t, sub, x_t[:, near], out[_VENT][near] - vent_grow)
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
                   axes: Sequence[np.ndarray], u_pv: np.ndarray,
                   width_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """(WMH, other pathology) depth fields (mm, > 0 inside) on the grid ``axes``."""
  u_les = u_pv
  u_oth = np.full(u_pv.shape, -1e3, np.float32)
  for les in sub.lesions:
    if tau is not None and tau < les.onset:
      continue
    grow = 1.0 if tau is None else min(1.0, 0.55 + 0.45 * (tau - les.onset) / 0.6)
    blob = (_to_scanner(t, sub, pose, les.centre_mm), les.axes @ pose.rotation,
            les.radii_mm * grow)
    _render_lesions(u_oth if les.kind == "other" else u_les, [blob], axes, width_mm)
  return u_les, u_oth


def _tissue_fractions(ch: np.ndarray, sub: Subject, vent_grow: float, u_les: np.ndarray,
                      u_oth: np.ndarray, width: float) -> np.ndarray:
  """Partial-volume fractions ``(7, x, y, z)`` in ``TISSUE_NAMES`` order (sum 1)."""
  icv = _ramp(-ch[_ICV], width)
  par = np.minimum(icv, _ramp(-(ch[_PAR] + sub.cortex_shrink_mm), width))
  wmf = np.minimum(par, _ramp(-(ch[_WMF] + sub.wm_shrink_mm), width))
  vent = np.minimum(par, _ramp(-(ch[_VENT] - vent_grow), width))
  wm = np.maximum(wmf - vent, 0)
  gm = par - np.maximum(wmf, vent)
  les = _ramp(u_les, width) * wm
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
  texture = 1.0 + 0.06 * _resample_separable(_smooth_noise(rng, (12, 12, 12)), pos)
  gain = site.gain * math.exp(rng.normal(0, 0.08))
  signal = ((frac[CSF] + frac[VENTRICLE]) * contrast["csf"] + frac[GM] * contrast["gm"]
            + frac[WM] + frac[WMH] * contrast["wmh"] * texture
            + frac[OTHER] * contrast["other"])
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
  work = _sample_working(t, sub, pose, work_grid, vent_grow, pv_depth > 0)
  box = _brain_box(work[_ICV], work_grid, grid)
  axes = [a[b] for a, b in zip(grid.axes(), box)]
  ch = _resample_separable(work, [(axes[k] - work_grid.origin_mm[k]) / work_grid.spacing_mm[k]
                                  for k in range(3)])
  width = float(np.prod(grid.spacing_mm) ** (1 / 3))
  u_les, u_oth = _lesion_fields(t, sub, pose, tau, axes, pv_depth - ch[4], width)
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
