"""Rendering one synthetic FLAIR scan and its label map.

1. A 2 mm "working" grid in scanner space is mapped to the template through a
   pose (rotation, translation), a head-size scaling and a smooth random warp,
   and the distance maps (`anatomy`) are sampled there;
2. the tissue boundaries move by the subject's atrophy (`subjects`);
3. the distance maps are upsampled to the acquisition grid and turned into
   partial-volume tissue fractions;
4. the subject's lesions are added, restricted to white matter;
5. FLAIR-like tissue intensities are mixed, with a smooth bias field, a global
   gain and Rician noise.

The mask is the voxels whose largest tissue fraction is lesion.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import scipy.ndimage as ndi

from wmh_jax.data import interpolation
from wmh_jax.data.synthetic import anatomy, sites, subjects


# FLAIR-like intensities relative to normal white matter, by field strength (T).
_CONTRAST = {
    1.5: {"csf": 0.24, "gm": 1.20, "wm": 1.0, "wmh": 1.75, "other": 0.45},
    3.0: {"csf": 0.16, "gm": 1.26, "wm": 1.0, "wmh": 1.90, "other": 0.40},
}


def _ramp(u: np.ndarray, width_mm: float) -> np.ndarray:
  """Partial-volume fraction of a voxel whose centre is ``u`` mm inside a boundary."""
  return np.clip(0.5 + u / width_mm, 0.0, 1.0)


def _interp_axis(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
  """Linear interpolation of ``a`` along ``axis`` at float indices ``pos`` (clamped)."""
  i0, i1, frac = interpolation.linear_taps(pos, a.shape[axis])
  w = frac.astype(np.float32)
  shape = [1] * a.ndim
  shape[axis] = len(pos)
  a0 = np.take(a, i0, axis=axis)
  a1 = np.take(a, i1, axis=axis)
  return a0 + (a1 - a0) * w.reshape(shape)


def _resample_separable(a: np.ndarray, positions: Sequence[np.ndarray]) -> np.ndarray:
  """Separable linear resampling of the last three axes at float indices per axis
  (shrinking axes first, to keep the intermediate arrays small)."""
  lead = a.ndim - 3
  for k in sorted(range(3), key=lambda k: len(positions[k]) / a.shape[lead + k]):
    a = _interp_axis(a, lead + k, positions[k])
  return a


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
  site: sites.Site


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


def _grids(t: anatomy.Template, site: sites.Site, resolution_scale: float) -> tuple[_Grid, _Grid]:
  """Acquisition grid and 2 mm working grid over the same field of view."""
  fov = 2.0 * (t.half_extent_mm * subjects.HEAD_SCALE * 1.06 + 8.0)
  spacing = np.asarray(site.spacing_mm, np.float64) * resolution_scale
  shape = np.ceil(fov / spacing).astype(int)
  h = np.full(3, anatomy.TEMPLATE_SPACING_MM * resolution_scale)
  w_shape = np.ceil(fov / h).astype(int) + 3
  return (_Grid(spacing, tuple(shape), -(shape - 1) / 2 * spacing),
          _Grid(h, tuple(w_shape), -(w_shape - 1) / 2 * h))


def _make_pose(rng: np.random.Generator, sub: subjects.Subject, grid: _Grid) -> _Pose:
  """Random head rotation (sd 3 deg) and position (sd 3 mm); warp over the FOV."""
  rotation = subjects.rotation_matrix(np.radians(rng.normal(0, 3.0, 3)))
  lo = grid.origin_mm - grid.spacing_mm / 2
  return _Pose(matrix=np.diag(1.0 / sub.scale) @ rotation, rotation=rotation,
               shift_mm=rng.normal(0, 3.0, 3), warp_lo_mm=lo,
               warp_step_mm=-2 * lo / (np.array(sub.warp_mm.shape[1:]) - 1))


def _warp_at(sub: subjects.Subject, pose: _Pose, rel_axes: Sequence[np.ndarray]) -> np.ndarray:
  """Warp (mm) ``(3, nx, ny, nz)`` on the axis-aligned grid ``rel_axes`` (= x - shift)."""
  pos = [(rel_axes[k] - pose.warp_lo_mm[k]) / pose.warp_step_mm[k] for k in range(3)]
  return _resample_separable(sub.warp_mm, pos)


def _template_coords(t: anatomy.Template, sub: subjects.Subject, pose: _Pose,
                     axes: Sequence[np.ndarray]) -> np.ndarray:
  """Template positions (mm) ``(3, nx, ny, nz)`` of the scanner grid ``axes``."""
  rel = [axes[k] - pose.shift_mm[k] for k in range(3)]
  out = _warp_at(sub, pose, rel)
  for i in range(3):
    out[i] += t.centre_mm[i] + (pose.matrix[i, 0] * rel[0][:, None, None]
                                + pose.matrix[i, 1] * rel[1][None, :, None]
                                + pose.matrix[i, 2] * rel[2][None, None, :])
  return out


def _to_scanner(t: anatomy.Template, sub: subjects.Subject, pose: _Pose, x_t: np.ndarray
                ) -> np.ndarray:
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


def _cap_weight(t: anatomy.Template, y_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
  """Periventricular lesion preference at template (y, z): caps at the frontal and
  occipital horns, thin bands along the bodies, none around the temporal horns."""
  back, front = t.vent_box_mm[:, 1]
  caps = (0.08 + 1.1 * np.exp(-((y_mm - front) / 9.0) ** 2)
          + 0.9 * np.exp(-((y_mm - back) / 9.0) ** 2))
  return caps / (1.0 + np.exp(-(z_mm - 2.0) / 3.0))


def _pv_weight(t: anatomy.Template, sub: subjects.Subject, x_t: np.ndarray) -> np.ndarray:
  """Local periventricular band thickness factor at template points ``x_t`` (3, n)."""
  lo = t.centre_mm - t.half_extent_mm
  idx = [(x_t[k] - lo[k]) / (2 * t.half_extent_mm[k]) * (sub.pv_noise.shape[k] - 1)
         for k in range(3)]
  noise = ndi.map_coordinates(sub.pv_noise, idx, order=1, mode="nearest")
  return _cap_weight(t, x_t[1], x_t[2]) * np.exp(0.5 * noise)


def _pv_depth(t: anatomy.Template, sub: subjects.Subject, volume_ml: float,
              vent_grow: float) -> float:
  """Band depth D such that the band (distance to the grown ventricles below
  ``D * weight``) holds ``volume_ml`` of the subject's white matter."""
  d_vent = t.wm_maps[:, anatomy.VENT] - vent_grow
  ok = (d_vent > 0) & (t.wm_maps[:, anatomy.WMF] + sub.wm_shrink_mm < 0)
  weight = _pv_weight(t, sub, t.wm_pos_mm[ok].T.astype(np.float64))
  ratio = np.sort(d_vent[ok] / np.maximum(weight, 1e-3))
  k = int(volume_ml * 1000.0 / (t.spacing_mm ** 3 * np.prod(sub.scale)))
  return 0.0 if k <= 0 else float(ratio[min(k, len(ratio) - 1)])


def _sample_working(t: anatomy.Template, sub: subjects.Subject, pose: _Pose, grid: _Grid,
                    vent_grow: float, pv_depth: float) -> np.ndarray:
  """Template maps on the working grid ``(6, nx, ny, nz)``: the five template
  channels and the periventricular band depth (mm, > 0 inside the band).
  Voxels far outside the brain get distances of +1e3 mm."""
  x_t = _template_coords(t, sub, pose, grid.axes())
  idx = (x_t - t.origin_mm[:, None, None, None]) / t.spacing_mm
  out = np.full((6,) + grid.shape, 1e3, np.float32)
  out[anatomy.SULC] = 0.0
  out[anatomy.PV] = -1e3
  out[anatomy.ICV] = ndi.map_coordinates(t.maps[anatomy.ICV], idx, order=1, mode="nearest")
  inside = out[anatomy.ICV] < 3.0
  for c in (anatomy.PAR, anatomy.SULC):
    out[c][inside] = ndi.map_coordinates(t.maps[c], idx[:, inside], order=1, mode="nearest")
  parenchyma = inside & (out[anatomy.PAR] < 3.0)
  out[anatomy.WMF][parenchyma] = ndi.map_coordinates(t.maps[anatomy.WMF], idx[:, parenchyma],
                                                     order=1, mode="nearest")
  reach = 35.0 + vent_grow
  near = parenchyma & np.all((x_t > t.vent_box_mm[0, :, None, None, None] - reach)
                             & (x_t < t.vent_box_mm[1, :, None, None, None] + reach), axis=0)
  out[anatomy.VENT][near] = ndi.map_coordinates(t.maps[anatomy.VENT], idx[:, near], order=1,
                                                 mode="nearest")
  if pv_depth > 0:
    near &= out[anatomy.VENT] - vent_grow < 30.0
    out[anatomy.PV][near] = (pv_depth * _pv_weight(t, sub, x_t[:, near])
                             - (out[anatomy.VENT][near] - vent_grow))
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


def _lesion_fields(t: anatomy.Template, sub: subjects.Subject, pose: _Pose, tau: float | None,
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


def _tissue_fractions(ch: np.ndarray, sub: subjects.Subject, vent_grow: float, u_les: np.ndarray,
                      u_oth: np.ndarray, width: float) -> np.ndarray:
  """Partial-volume fractions ``(7, x, y, z)`` in ``TISSUE_NAMES`` order (sum 1)."""
  shrink = sub.cortex_shrink_mm
  icv = _ramp(-ch[anatomy.ICV], width)
  par_depth = np.maximum(ch[anatomy.PAR], _SULCAL_MM * (ch[anatomy.SULC] - _SULCAL_LEVEL))
  par = np.minimum(icv, _ramp(-(par_depth + shrink), width))
  wmf = np.minimum(par, _ramp(-(ch[anatomy.WMF] + sub.wm_shrink_mm), width))
  vent = np.minimum(par, _ramp(-(ch[anatomy.VENT] - vent_grow), width))
  wm = np.maximum(wmf - vent, 0)
  gm = par - np.maximum(wmf, vent)
  band = np.minimum(np.maximum(_ramp(ch[anatomy.PV], width) - vent, 0), wm)
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
           site: sites.Site, axes: Sequence[np.ndarray], half_fov_mm: np.ndarray) -> np.ndarray:
  """FLAIR-like image (scanner units, rounded) from tissue fractions: tissue contrast,
  lesion texture, bias field, gain and Rician noise; 0 outside the head."""
  pos = [(axes[k] / half_fov_mm[k] + 1) * 5.5 for k in range(3)]
  texture = _resample_separable(subjects.smooth_noise(rng, (12, 12, 12)), pos)
  gain = site.gain * math.exp(rng.normal(0, 0.08))
  signal = ((frac[anatomy.CSF] + frac[anatomy.VENTRICLE]) * contrast["csf"]
            + frac[anatomy.GM] * contrast["gm"]
            + frac[anatomy.WM] + frac[anatomy.WMH] * contrast["wmh"] * (1 + 0.05 * texture)
            + frac[anatomy.OTHER] * contrast["other"]) * (1 + 0.03 * texture)
  signal *= _bias_field(rng, site.bias, axes, half_fov_mm) * gain
  brain = frac[anatomy.BACKGROUND] < 1.0
  clean = signal[brain]
  sigma = site.noise * gain
  image = np.zeros(signal.shape, np.float32)
  image[brain] = np.rint(np.hypot(clean + sigma * rng.standard_normal(clean.size, np.float32),
                                  sigma * rng.standard_normal(clean.size, np.float32)))
  return image


def _annotate(tissue: np.ndarray, dilate: bool) -> np.ndarray:
  """uint8 label map: 1 WMH, 2 other; optionally WMH drawn one voxel wider in-plane."""
  wmh = tissue == anatomy.WMH
  if dilate:
    cross = np.zeros((3, 3, 1), bool)
    cross[1, :, 0] = cross[:, 1, 0] = True
    wmh = ndi.binary_dilation(wmh, cross) & np.isin(tissue, (anatomy.GM, anatomy.WM, anatomy.WMH))
  labels = wmh.astype(np.uint8)
  labels[tissue == anatomy.OTHER] = 2
  return labels


def generate_scan(domain: sites.Domain, index: int, seed: int, resolution_scale: float = 1.0,
                  template: anatomy.Template | None = None) -> SyntheticScan:
  """Generates scan ``index`` of ``domain``; depends only on (seed, domain, index).

  Args:
    domain: the data set (sites, lesion type, load distribution).
    index: scan number in the domain, 0-based.
    seed: cohort seed.
    resolution_scale: multiplies every voxel size (2.0: 8x fewer voxels; tests).
    template: the 2 mm template (default: built once per process).
  """
  t = template or anatomy.load_template()
  subject, time_point, n_points = subjects.subject_layout(domain)[index]
  site = domain.sites[(subject if domain.longitudinal else index) % len(domain.sites)]
  sub = subjects.make_subject(domain, subject, seed, t)
  tau = time_point / max(n_points - 1, 1) if domain.longitudinal else None
  vent_grow = sub.vent_grow_mm + (0.5 * tau if tau is not None else 0.0)
  pv_ml = sub.load_ml * sub.pv_share * (1.0 if tau is None else 0.6 + 0.4 * tau)
  pv_depth = _pv_depth(t, sub, pv_ml, vent_grow)
  grid, work_grid = _grids(t, site, resolution_scale)
  rng = subjects.seeded_rng(seed, domain.name, 1, index)
  pose = _make_pose(rng, sub, grid)
  work = _sample_working(t, sub, pose, work_grid, vent_grow, pv_depth)
  box = _brain_box(work[anatomy.ICV], work_grid, grid)
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
