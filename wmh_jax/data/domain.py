"""Domain randomisation: every training image as if from a random scanner (issue 15).

WMH-SynthSeg generalises to unseen scanners by training on images whose
contrast, resolution, bias field and noise are randomised far beyond any real
scanner. This module does the same to a cached, preprocessed record on the
host, per sample, before the geometric augmentation (:mod:`augment`). It
changes the **image only**: every step is an intensity change or a blur, so
the lesion mask and the weak volume label stay exactly as they are (the
resolution simulation blurs the image; the mask is not blurred).

One draw simulates, in acquisition order:

1. **Contrast** (sequence parameters): a strictly increasing remap of the
   [0, 1] intensities, ``curve(x ** gamma)``, where ``curve`` is a random
   piecewise-linear map of [0, 1] onto itself. It never inverts the contrast
   (WMH stay the brightest tissue on FLAIR) and never swaps two voxels' order
   (in float32 two close voxels may become equal).
2. **Bias field** (receive coil): the image times ``exp(L)``, where ``L`` is a
   random combination of the low-frequency DCT basis (frequencies
   ``0..bias_order`` per axis; SPM's bias model) with a random standard
   deviation over the grid.
3. **Resolution** (slice thickness, in-plane resolution): per axis, Gaussian
   blur from the grid's resolution to the target, sampling at the target
   spacing (random phase) and linear interpolation back to the grid: one
   banded ``(n, n)`` sparse operator per axis. Where the grid is
   already as coarse as the target (e.g. the ``:cpu`` grid's 8.4 mm slices vs
   3–8 mm, or its 2.8 mm in-plane vs 1–2 mm) the axis is left alone: a
   coarser grid cannot show a finer acquisition's detail, and a coarse
   acquisition of it is the grid itself.
4. **Noise** (thermal): Gaussian, or Rician (the magnitude of a complex
   signal with Gaussian noise in both channels), at a random level.
5. **Percentile normalisation** (preprocessing): the image is re-normalised
   with randomly chosen low/high percentiles of its brain voxels, clipped to
   [0, 1]. The cached image is already normalised with
   ``config.data.percentiles`` and clipped, so a percentile outside the cached
   ones (e.g. 0.5 % when the cache used 1 %) re-stretches the clipped image,
   which is the identity on an unchanged image; clipping cannot be undone.

Steps 1–4 are each applied with probability ``probability``; step 5 always
runs (every real pipeline normalises) and brings the result back to [0, 1].
Voxels outside the record's brain mask stay exactly 0, as preprocessing leaves
them on every real scan; the pointwise steps run on the brain voxels only.

Randomness: all scalar parameters are drawn first, in a fixed order, whether
or not their step is applied, then the noise arrays. The pipeline's generator
comes from :func:`domain_rng` (seed, record index, epoch), a stream separate
from the geometric augmentation's, so switching this on does not change the
geometric draws, and batches do not depend on the worker count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
import scipy.sparse

from wmh_jax.data import interpolation

# FWHM of a Gaussian in units of its standard deviation, 2 sqrt(2 ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# The contrast remap (gamma composed with the random curve) is evaluated
# exactly at this many evenly spaced segments' ends and is linear between them.
REMAP_SEGMENTS = 256
# The resolution blur's Gaussian is cut at this many standard deviations.
_TRUNCATE_SIGMAS = 4.0
# Percentiles are estimated on at most this many brain voxels (an even stride
# through them; all of them at the :cpu grid, every 3rd of ~180k at the paper
# grid): the drawn percentiles are random anyway.
_PERCENTILE_SAMPLES = 1 << 16
# Stream tag that separates the domain draws from the geometric ones.
_DOMAIN_STREAM = 15


@dataclasses.dataclass(frozen=True)
class DomainParams:
  """One draw of the random scanner.

  Attributes:
    contrast, bias, resolution, noise: whether steps 1–4 are applied.
    gamma: exponent of the contrast remap (> 0).
    curve_y: float64 ``(knots + 2,)`` strictly increasing from 0 to 1: the
      random curve's values at ``linspace(0, 1, knots + 2)``.
    bias_coefficients: float64 ``(K, K, K)`` DCT coefficients of the log bias
      field, ``K = bias_order + 1``; ``[0, 0, 0] = 0``.
    inplane_mm: target in-plane resolution (x and y), mm.
    thickness_mm: target slice thickness (z), mm.
    phases: ``(3,)`` in [0, 1): offset of the coarse sampling grid per axis, as
      a fraction of its spacing.
    noise_std: noise standard deviation, in units of the [0, 1] range.
    rician: Rician (True) or Gaussian (False) noise.
    percentiles: ``(low, high)`` brain percentiles mapped to 0 and 1.
  """
  contrast: bool
  bias: bool
  resolution: bool
  noise: bool
  gamma: float
  curve_y: np.ndarray
  bias_coefficients: np.ndarray
  inplane_mm: float
  thickness_mm: float
  phases: np.ndarray
  noise_std: float
  rician: bool
  percentiles: tuple[float, float]


def domain_rng(seed: int, record_index: int, epoch: int) -> np.random.Generator:
  """The domain-randomisation generator of one record in one epoch."""
  return np.random.default_rng([seed, record_index, epoch, _DOMAIN_STREAM])


def _log_uniform(rng: np.random.Generator, bounds: Sequence[float], size=None):
  low, high = np.log(float(bounds[0])), np.log(float(bounds[1]))
  return np.exp(rng.uniform(low, high, size))


def _dct_weights(order: int) -> np.ndarray:
  """Mean square of each DCT basis function over the grid: 1 for 0, 1/2 else."""
  return np.where(np.arange(order + 1) == 0, 1.0, 0.5)


def sample_params(rng: np.random.Generator, config_domain: ml_collections.ConfigDict
                  ) -> DomainParams:
  """Draws one random scanner (scalars only; independent of the grid).

  Draw order (fixed): 4 step coins; gamma; ``knots + 1`` segment slopes; bias
  amplitude; ``K³`` bias coefficients; in-plane resolution; slice thickness;
  3 phases; noise level; Rician coin; low and high percentile.

  Args:
    rng: the record's generator (:func:`domain_rng`).
    config_domain: ``config.augment.domain`` (see ``wmh_jax/configs.py``).
  Returns:
    A :class:`DomainParams`.
  """
  c = config_domain
  coins = rng.random(4) < float(c.probability)
  gamma = float(_log_uniform(rng, c.gamma))
  slopes = _log_uniform(rng, c.contrast_slope, int(c.contrast_knots) + 1)
  curve_y = np.concatenate([[0.0], np.cumsum(slopes)])
  curve_y /= curve_y[-1]
  amplitude = rng.uniform(*c.bias_log_std)
  order = int(c.bias_order)
  coefficients = rng.standard_normal((order + 1,) * 3)
  coefficients[0, 0, 0] = 0.0
  weights = _dct_weights(order)
  variance = (coefficients ** 2 * np.einsum("i,j,k->ijk", weights, weights, weights)).sum()
  coefficients *= amplitude / np.sqrt(variance) if variance > 0 else 0.0
  inplane_mm = rng.uniform(*c.inplane_resolution_mm)
  thickness_mm = rng.uniform(*c.slice_thickness_mm)
  phases = rng.random(3)
  noise_std = rng.uniform(*c.noise_std)
  rician = bool(rng.random() < float(c.rician_probability))
  percentiles = (float(rng.uniform(*c.low_percentile)), float(rng.uniform(*c.high_percentile)))
  return DomainParams(contrast=bool(coins[0]), bias=bool(coins[1]), resolution=bool(coins[2]),
                      noise=bool(coins[3]), gamma=gamma, curve_y=curve_y,
                      bias_coefficients=coefficients, inplane_mm=float(inplane_mm),
                      thickness_mm=float(thickness_mm), phases=phases,
                      noise_std=float(noise_std), rician=rician, percentiles=percentiles)


# ---- 1. contrast ---------------------------------------------------------------

def remap_table(gamma: float, curve_y: np.ndarray) -> np.ndarray:
  """float64 ``(REMAP_SEGMENTS + 1,)``: ``curve(x ** gamma)`` at evenly spaced ``x``.

  ``curve`` is piecewise linear through ``(linspace(0, 1, len(curve_y)),
  curve_y)``. Strictly increasing when ``gamma > 0`` and ``curve_y`` is.
  """
  x = np.linspace(0.0, 1.0, REMAP_SEGMENTS + 1)
  return np.interp(x ** gamma, np.linspace(0.0, 1.0, len(curve_y)), curve_y)


def remap_intensity(values: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Applies the piecewise-linear map ``table`` (values at evenly spaced knots).

  Args:
    values: float intensities, any shape; clipped to [0, 1] first.
    table: ``(S + 1,)`` non-decreasing values at ``linspace(0, 1, S + 1)``.
  Returns:
    float32, ``values.shape``, in ``[table[0], table[-1]]``. Non-decreasing in
    the input, also in float32: every operation is monotone and each segment
    is clipped to its end values, so no voxel ever overtakes another.
  """
  segments = len(table) - 1
  u = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  u *= np.float32(segments)
  index = u.astype(np.int32)
  np.minimum(index, segments - 1, out=index)
  u -= index                                        # fraction of the segment, float32
  start = table[:-1].astype(np.float32)
  end = table[1:].astype(np.float32)
  u *= np.take(end - start, index)
  u += np.take(start, index)
  return np.minimum(u, np.take(end, index), out=u)


# ---- 2. bias field ------------------------------------------------------------

def _dct_basis(n: int, order: int) -> np.ndarray:
  """float32 ``(n, order + 1)``: ``cos(pi k (i + 0.5) / n)``."""
  i = np.arange(n)[:, None] + 0.5
  return np.cos(np.pi * np.arange(order + 1)[None, :] * i / n).astype(np.float32)


def log_bias_field(shape: Sequence[int], coefficients: np.ndarray) -> np.ndarray:
  """The log bias field, float32 ``shape``: ``Σ c_abc φ_a(x) φ_b(y) φ_c(z)``.

  Evaluated separably (``prod(shape) * K`` multiply-adds), with ``einsum``
  loops and broadcasting, not BLAS (see :func:`simulate_resolution`). Its mean
  over the grid is 0 and its standard deviation is the amplitude
  :func:`sample_params` scaled the coefficients to.
  """
  k = coefficients.shape[0]
  bx, by, bz = (_dct_basis(n, k - 1) for n in shape)
  t = np.einsum("abc,zc->abz", coefficients.astype(np.float32), bz)  # (K, K, nz)
  t = np.einsum("abz,yb->ayz", t, by)                               # (K, ny, nz)
  out = bx[:, 0, None, None] * t[0]
  for a in range(1, k):
    out += bx[:, a, None, None] * t[a]
  return out


def bias_field(shape: Sequence[int], coefficients: np.ndarray) -> np.ndarray:
  """The multiplicative bias field ``exp(log_bias_field)``, float32 ``shape`` > 0."""
  return np.exp(log_bias_field(shape, coefficients))


# ---- 3. resolution ------------------------------------------------------------

def _interpolate_rows(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """``L @ rows`` for the linear-interpolation matrix ``L`` at ``positions``:
  each result row mixes two rows of ``rows``. Dense numpy, no BLAS."""
  i0, i1, frac = interpolation.linear_taps(positions, rows.shape[0])
  return (1.0 - frac)[:, None] * rows[i0] + frac[:, None] * rows[i1]


def resolution_matrix(n: int, spacing_mm: float, target_mm: float, phase: float
                      ) -> scipy.sparse.csr_matrix | None:
  """The ``(n, n)`` operator that re-acquires one axis at ``target_mm``.

  ``M = U D B``: ``B`` blurs with a Gaussian of FWHM ``sqrt(target² −
  spacing²)`` (taking the grid's own point spread as a FWHM of one voxel, the
  result has a FWHM of ``target_mm``), truncated at 4 sigma like scipy's;
  its rows are normalised, so the field of view's edge is not darkened. ``D``
  samples the blurred line every ``target_mm`` starting ``phase`` of a step
  before voxel 0 (linear interpolation, covering the whole line). ``U``
  interpolates those samples linearly back onto the grid. Rows of ``M`` sum
  to 1.

  Built with row gathers (each interpolation row mixes two rows) and returned
  sparse, so neither building nor applying it calls BLAS: a BLAS product
  starts OpenBLAS threads, which on the loaded 2-core host made one 128x128
  product take 50 ms instead of 0.8 ms.

  Returns:
    float32 CSR, banded (about 7 non-zeros a row in-plane, 10 along z at the
    paper grid), or None (no-op) when ``target_mm <= spacing_mm``.
  """
  if target_mm <= spacing_mm or n < 2:   # n >= 2: two interpolation taps
    return None
  factor = target_mm / spacing_mm                   # coarse step, in voxels
  sigma = np.sqrt(factor ** 2 - 1.0) / FWHM_PER_SIGMA
  grid = np.arange(n, dtype=np.float64)
  offset = np.abs(grid[:, None] - grid[None, :])
  inside = offset <= np.ceil(_TRUNCATE_SIGMAS * sigma)
  # exp of the clipped argument: no denormals (slow) from far off the band.
  blur = np.where(inside, np.exp(-0.5 * (np.minimum(offset, 50.0 * sigma) / sigma) ** 2), 0.0)
  blur /= blur.sum(axis=1, keepdims=True)
  start = -phase * factor
  count = int(np.ceil((n - 1 - start) / factor)) + 1
  coarse = start + factor * np.arange(count)        # covers [start, n - 1]
  down_blur = _interpolate_rows(blur, coarse)       # D B: (count, n)
  operator = _interpolate_rows(down_blur, (grid - start) / factor)  # U D B: (n, n)
  return scipy.sparse.csr_matrix(operator.astype(np.float32))


def simulate_resolution(image: np.ndarray, spacing_mm: Sequence[float], inplane_mm: float,
                        thickness_mm: float, phases: Sequence[float]) -> np.ndarray:
  """Re-acquires ``image`` at ``inplane_mm`` (x, y) and ``thickness_mm`` (z).

  Args:
    image: float32 ``(x, y, z)``.
    spacing_mm: the grid's voxel size (``config.data.spacing_mm``).
    inplane_mm, thickness_mm: target resolutions, mm.
    phases: ``(3,)`` coarse-grid offsets in [0, 1) of a step.
  Returns:
    float32 ``(x, y, z)``; ``image`` itself on axes where the grid is already
    as coarse as the target.
  """
  out = np.asarray(image, np.float32)
  targets = (inplane_mm, inplane_mm, thickness_mm)
  for axis in range(3):
    matrix = resolution_matrix(out.shape[axis], float(spacing_mm[axis]), targets[axis],
                               float(phases[axis]))
    if matrix is None:
      continue
    # The banded operator on the leading axis: one C loop over ~7-10 taps a
    # voxel (a dense product would do n taps a voxel).
    lead = np.ascontiguousarray(np.moveaxis(out, axis, 0))
    moved = matrix @ lead.reshape(lead.shape[0], -1)
    out = np.moveaxis(moved.reshape(lead.shape), 0, axis)
  return np.ascontiguousarray(out, np.float32)


# ---- 4. noise -------------------------------------------------------------------

def add_noise(values: np.ndarray, rng: np.random.Generator, std: float, rician: bool
              ) -> np.ndarray:
  """``values`` plus Gaussian noise, or Rician: ``|values + n1 + i n2|``.

  Args:
    values: float32 intensities, any shape.
    rng: draws ``values.size`` (Gaussian) or ``2 * values.size`` (Rician)
      float32 standard normals.
    std: noise standard deviation (each channel for Rician).
    rician: magnitude noise (non-negative result) or Gaussian.
  Returns:
    float32, ``values.shape``.
  """
  values = np.asarray(values, np.float32)
  scale = np.float32(std)
  real = rng.standard_normal(values.shape, dtype=np.float32)
  real *= scale
  real += values
  if not rician:
    return real
  imaginary = rng.standard_normal(values.shape, dtype=np.float32)
  imaginary *= scale
  return np.hypot(real, imaginary, out=real)


# ---- 5. percentile normalisation ---------------------------------------------

def renormalise(values: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
  """Maps the ``(low, high)`` percentiles of ``values`` to 0 and 1 and clips.

  Same rule as :func:`wmh_jax.data.nifti.normalise` (constant values → 1);
  the percentiles are estimated on every k-th value when there are more than
  :data:`_PERCENTILE_SAMPLES` (k = ceil(size / that)).

  Args:
    values: float32 brain intensities, 1-D.
    percentiles: ``(low, high)`` in [0, 100].
  Returns:
    float32, ``values.shape``, in [0, 1].
  """
  stride = max(1, -(-values.size // _PERCENTILE_SAMPLES))
  low, high = np.percentile(values[::stride], percentiles)
  if not high > low:
    return np.ones_like(values, np.float32)
  out = np.asarray(values, np.float32) - np.float32(low)
  out *= np.float32(1.0 / (high - low))
  return np.clip(out, 0.0, 1.0, out=out)


# ---- the whole draw ----------------------------------------------------------------

def apply(image: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float],
          params: DomainParams, rng: np.random.Generator) -> np.ndarray:
  """Applies one random scanner to a preprocessed image.

  Args:
    image: float ``(x, y, z)`` in [0, 1], 0 outside the brain (a cached record).
    brain: bool ``(x, y, z)`` brain mask of the record.
    spacing_mm: the grid's voxel size, mm (``config.data.spacing_mm``).
    params: the draw (:func:`sample_params`).
    rng: draws the noise arrays (after the parameters).
  Returns:
    float32 ``(x, y, z)``, in [0, 1] inside the brain, exactly 0 outside.
  """
  image = np.asarray(image, np.float32)
  inside = np.flatnonzero(brain)
  if inside.size == 0:
    return image.copy()
  values = image.ravel()[inside]
  if params.contrast:
    values = remap_intensity(values, remap_table(params.gamma, params.curve_y))
  if params.bias:
    values = values * np.exp(log_bias_field(image.shape, params.bias_coefficients)
                             .ravel()[inside])
  if params.resolution:
    full = np.zeros(image.size, np.float32)
    full[inside] = values
    full = simulate_resolution(full.reshape(image.shape), spacing_mm, params.inplane_mm,
                               params.thickness_mm, params.phases)
    values = full.ravel()[inside]
  if params.noise:
    values = add_noise(values, rng, params.noise_std, params.rician)
  out = np.zeros(image.size, np.float32)
  out[inside] = renormalise(values, params.percentiles)
  return out.reshape(image.shape)


def randomise(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray,
              spacing_mm: Sequence[float], config_domain: ml_collections.ConfigDict
              ) -> np.ndarray:
  """Draws a random scanner from ``rng`` and applies it (see :func:`apply`)."""
  return apply(image, brain, spacing_mm, sample_params(rng, config_domain), rng)
