"""Synthetic subjects: head size, atrophy, warp and lesions, drawn per domain and seed.

A subject's atrophy (ventricles grow, white matter and cortex shrink) is
correlated with its WMH load. Lesions are vascular (periventricular caps and
bands plus deep foci, confluent at high load) or MS (ovoid periventricular,
juxtacortical and deep lesions), restricted to white matter. Every draw comes
from :func:`seeded_rng` (seed, domain, kind, index): the same seed gives the
same subject.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib

import numpy as np
import scipy.ndimage as ndi

from wmh_jax.data.synthetic import anatomy, sites


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
  """3x3 rotation matrix from (x, y, z) Euler angles in radians."""
  cx, cy, cz = np.cos(angles_rad)
  sx, sy, sz = np.sin(angles_rad)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ ry @ rx


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
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
HEAD_SCALE = 0.9               # MNI brains are ~10 % larger (linear) than average
_WARP_NODES = (6, 7, 6)         # coarse grid of the smooth random warp (sd 2 mm)
_PV_NOISE_NODES = (14, 17, 14)  # coarse grid modulating the periventricular band


def seeded_rng(seed: int, domain: str, kind: int, index: int) -> np.random.Generator:
  """Generator for (seed, domain, kind: 0 subject / 1 scan, index)."""
  return np.random.default_rng([seed, zlib.crc32(domain.encode()), kind, index])


def subject_layout(domain: sites.Domain) -> list[tuple[int, int, int]]:
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


def _wm_candidates(t: anatomy.Template, shift_mm: tuple[float, float, float]
                   ) -> dict[str, np.ndarray]:
  """Bool masks over ``t.wm_pos_mm`` of the voxels eligible for each lesion kind after
  the atrophy ``shift_mm`` (ventricle growth, cortex and WM shrinkage), plus
  ``d_vent``: their distance (mm) to the grown ventricles."""
  vent_grow, _, wm_shrink = shift_mm
  d_vent = t.wm_maps[:, anatomy.VENT] - vent_grow
  depth = -(t.wm_maps[:, anatomy.WMF] + wm_shrink)
  z = t.wm_pos_mm[:, 2]
  cortex = t.wm_maps[:, anatomy.ICV]
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


def _vascular_lesions(rng: np.random.Generator, t: anatomy.Template, cand: dict[str, np.ndarray],
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


def _ms_lesions(rng: np.random.Generator, t: anatomy.Template, cand: dict[str, np.ndarray],
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


def make_subject(domain: sites.Domain, subject: int, seed: int, t: anatomy.Template) -> Subject:
  """Draws one subject's anatomy and pathology from (seed, domain, subject)."""
  rng = seeded_rng(seed, domain.name, 0, subject)
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
      load_ml=load, scale=rng.normal(HEAD_SCALE, 0.025) * np.exp(rng.normal(0, 0.015, 3)),
      warp_mm=rng.normal(0, 2.0, (3,) + _WARP_NODES).astype(np.float32),
      vent_grow_mm=shift[0], cortex_shrink_mm=shift[1], wm_shrink_mm=shift[2],
      pv_share=pv_share, pv_noise=smooth_noise(rng, _PV_NOISE_NODES), contrast_jitter=jitter,
      lesions=tuple(lesions))
