"""Tests of the fused affine augmentation (wmh_jax/data/augment.py)."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi

from tolerances import device_resample_atol, float32_rtol
from wmh_jax import configs
from wmh_jax.data import augment

SHAPE = (16, 16, 8)
# Trilinear interpolation in float32 of an image in [0, 1): 8 terms, each a value
# times 3 float32-rounded weights (~6 ops), against float64 (SciPy, cast to float32).
INTERP_ATOL = float32_rtol(8, ops=6, sides=2)
SCIPY_LINEAR = dict(order=1, prefilter=False, mode="constant", cval=0.0)


def _paper_augment() -> ml_collections.ConfigDict:
  return configs.get_config().augment


def _grid(shape) -> np.ndarray:
  """Voxel coordinates, ``shape + (3,)`` float."""
  return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
  """bool ``shape``: voxels inside the ellipsoid (centre/radii in voxels)."""
  return (((_grid(shape) - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_identity_parameters_give_identity_output():
  rng = np.random.default_rng(0)
  image = rng.random(SHAPE).astype(np.float32)
  mask = (rng.random(SHAPE) > 0.5).astype(np.uint8)
  forward = augment.forward_affine(SHAPE, (1.4, 1.4, 4.2), 0.0, (False,) * 3, (0, 0, 0))
  np.testing.assert_allclose(forward, np.eye(4), atol=1e-12)
  out_image, out_mask = augment.apply_affine(image, mask, np.linalg.inv(forward))
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_mask, mask.astype(np.float32))


def test_equals_scipy_affine_transform_with_the_same_matrix():
  rng = np.random.default_rng(1)
  image = rng.random(SHAPE).astype(np.float32)
  for _ in range(5):
    matrix = augment.sample_affine(rng, SHAPE, (1.0, 1.5, 3.0), _paper_augment())
    out, _ = augment.apply_affine(image, None, matrix)
    np.testing.assert_allclose(out, ndi.affine_transform(image, matrix, **SCIPY_LINEAR),
                               atol=INTERP_ATOL)


def test_rotation_by_90_degrees_matches_rot90():
  rng = np.random.default_rng(2)
  image = rng.random(SHAPE).astype(np.float32)  # asymmetric
  forward = augment.forward_affine(SHAPE, (1.0, 1.0, 1.0), 90.0, (False,) * 3, (0, 0, 0))
  out, _ = augment.apply_affine(image, None, np.linalg.inv(forward))
  # +90° turns +x towards +y: np.rot90(k=1, axes=(0, 1)).
  np.testing.assert_allclose(out, np.rot90(image, k=1, axes=(0, 1)), atol=INTERP_ATOL)


def test_rotation_happens_in_mm_with_anisotropic_voxels():
  # 32x16 voxels of 1x2 mm = 32x32 mm. An ellipse 24x10 mm along x, turned by
  # 90° in mm, is the ellipse 10x24 mm along y, drawn on the same voxel grid.
  shape, spacing = (32, 16, 4), (1.0, 2.0, 3.0)
  centre = (np.array(shape) - 1) / 2
  along_x = _ellipsoid(shape, centre, (12.0, 5.0 / 2, 9.0))
  along_y = _ellipsoid(shape, centre, (5.0, 12.0 / 2, 9.0))
  forward = augment.forward_affine(shape, spacing, 90.0, (False,) * 3, (0, 0, 0))
  image, mask = augment.apply_affine(along_x.astype(np.float32), along_x,
                                     np.linalg.inv(forward))
  assert _dice(mask > 0, along_y) > 0.9
  assert abs(int(mask.sum()) - int(along_y.sum())) <= 0.1 * along_y.sum()
  np.testing.assert_allclose(image.sum(), along_x.sum(), rtol=0.1)


def test_sampled_parameters_follow_the_paper_ranges():
  rng = np.random.default_rng(3)
  shape, spacing = (40, 40, 10), (1.0, 1.0, 3.0)
  centre = (np.array(shape) - 1) / 2
  angles, shifts, flips = [], [], []
  for _ in range(300):
    forward = np.linalg.inv(augment.sample_affine(rng, shape, spacing, _paper_augment()))
    shifts.append(forward[:3, :3] @ centre + forward[:3, 3] - centre)
    flipped = forward[0, 0] * forward[1, 1] - forward[0, 1] * forward[1, 0] < 0
    flips.append(flipped)
    linear = forward[:2, :2] @ np.diag([-1.0 if flipped else 1.0, 1.0])
    angles.append(np.degrees(np.arctan2(linear[1, 0], linear[0, 0])))
    assert forward[2, 2] == 1.0  # flips only along x (flip_axes=(0,))
  angles, shifts = np.abs(angles), np.abs(np.array(shifts))
  assert angles.max() <= 54.0 + 1e-9 and angles.max() > 50.0
  assert np.all(shifts <= 0.2 * np.array(shape) + 1e-9)
  assert np.all(shifts.max(axis=0) > 0.18 * np.array(shape))
  assert 0.4 < np.mean(flips) < 0.6


def test_binary_mask_stays_binary():
  rng = np.random.default_rng(4)
  mask = _ellipsoid(SHAPE, (7, 8, 3.5), (5, 4, 2.5)).astype(np.uint8)
  for _ in range(10):
    matrix = augment.sample_affine(rng, SHAPE, (1.4, 1.4, 4.2), _paper_augment())
    _, out = augment.apply_affine(mask.astype(np.float32), mask, matrix)
    assert out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 1.0}


def test_brain_never_leaves_the_field_of_view_when_kept():
  shape, spacing = (28, 32, 8), (1.4, 1.4, 4.2)
  brain = _ellipsoid(shape, (12.5, 17.0, 3.5), (10.5, 13.0, 3.4))  # big, off-centre
  points = np.argwhere(brain).astype(float)
  rng = np.random.default_rng(5)
  left_without_constraint = 0
  kept_fraction = []
  for _ in range(200):
    state = rng.bit_generator.state
    matrix = augment.sample_affine(rng, shape, spacing, _paper_augment(), keep_in_fov=brain)
    forward = np.linalg.inv(matrix)
    moved = points @ forward[:3, :3].T + forward[:3, 3]
    assert moved.min() >= -1e-6
    assert np.all(moved.max(axis=0) <= np.array(shape) - 1 + 1e-6)
    _, out = augment.apply_affine(brain.astype(np.float32), brain, matrix)
    kept_fraction.append(out.sum() / brain.sum())
    rng.bit_generator.state = state  # same draw, unconstrained
    free = np.linalg.inv(augment.sample_affine(rng, shape, spacing, _paper_augment()))
    moved = points @ free[:3, :3].T + free[:3, 3]
    left_without_constraint += bool((moved < 0).any() or (moved > np.array(shape) - 1).any())
  assert left_without_constraint > 150  # the constraint is doing work
  assert min(kept_fraction) > 0.9  # (the rest is interpolation at the brain border)


def _blob_lesions(rng, shape, spacing_mm) -> np.ndarray:
  """bool mask of 6 spheres of radius 3–8 mm inside the central region."""
  grid_mm = _grid(shape) * np.asarray(spacing_mm)
  mask = np.zeros(shape, bool)
  for _ in range(6):
    centre = rng.uniform(0.3, 0.7, 3) * (np.array(shape) - 1) * np.asarray(spacing_mm)
    mask |= ((grid_mm - centre) ** 2).sum(-1) <= rng.uniform(3.0, 8.0) ** 2
  return mask


def test_mask_volume_change_is_small_when_lesions_stay_in_view():
  shape, spacing = (112, 128, 32), (1.4, 1.4, 4.2)
  rng = np.random.default_rng(6)
  changes = []
  for _ in range(12):
    lesions = _blob_lesions(rng, shape, spacing)
    matrix = augment.sample_affine(rng, shape, spacing, _paper_augment(), keep_in_fov=lesions)
    _, out = augment.apply_affine(lesions.astype(np.float32), lesions, matrix)
    changes.append(abs(out.sum() - lesions.sum()) / lesions.sum())
  print(f"median |dV|/V = {np.median(changes):.4f}, max = {np.max(changes):.4f}")
  assert np.median(changes) < 0.002  # measured 0.0 (thresholding at 0.5: 0.05)
  assert np.max(changes) < 0.005     # measured 0.002


def test_fused_matches_three_sequential_resamples():
  """Rotate, flip, translate one after another (nearest neighbour) ≈ fused."""
  shape, spacing = (32, 32, 8), (1.0, 1.0, 2.0)
  lesions = _ellipsoid(shape, (15, 16, 3.5), (10, 7, 3))
  angle, flips, shift = 30.0, (True, False, False), (2.3, -3.2, 1.0)
  zero = (0.0, 0.0, 0.0)
  steps = [augment.forward_affine(shape, spacing, angle, (False,) * 3, zero),
           augment.forward_affine(shape, spacing, 0.0, flips, zero),
           augment.forward_affine(shape, spacing, 0.0, (False,) * 3, shift)]
  fused = augment.forward_affine(shape, spacing, angle, flips, shift)
  np.testing.assert_allclose(steps[2] @ steps[1] @ steps[0], fused, atol=1e-12)
  sequential = lesions.astype(np.float32)
  for step in steps:
    sequential = ndi.affine_transform(sequential, np.linalg.inv(step), order=0,
                                      mode="constant", cval=0.0)
  _, once = augment.apply_affine(lesions.astype(np.float32), lesions, np.linalg.inv(fused))
  assert _dice(once > 0, sequential > 0) > 0.95
  assert abs(once.sum() - lesions.sum()) <= 0.005 * lesions.sum()  # 874 → 873 voxels


def test_rejects_a_matrix_that_mixes_z_with_the_plane():
  matrix = np.eye(4)
  matrix[0, 2] = 0.3
  with pytest.raises(ValueError, match="in-plane"):
    augment.apply_affine(np.zeros(SHAPE, np.float32), None, matrix)


def _lesion_scan(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
  """A smooth brain-like image in [0, 1) with 1-4 ellipsoidal lesions (float32 mask)."""
  centre = (np.asarray(shape) - 1) / 2
  brain = _ellipsoid(shape, centre, 0.4 * np.asarray(shape))
  mask = np.zeros(shape, bool)
  for _ in range(rng.integers(1, 5)):
    mask |= _ellipsoid(shape, centre + rng.uniform(-0.2, 0.2, 3) * np.asarray(shape),
                       rng.uniform(1.0, 3.0, 3))
  mask &= brain
  image = np.where(brain, 0.4 + 0.1 * rng.random(shape), 0.0)
  return np.where(mask, 0.95, image).astype(np.float32), mask.astype(np.float32)


def test_device_resample_equals_the_host_path():
  """`device_augment.resample_pair` (jit, float32 coordinates) against `apply_affine`
  (float64 coordinates) on paper-range draws at an anisotropic grid."""
  import jax  # pylint: disable=import-outside-toplevel
  from wmh_jax.data import device_augment  # pylint: disable=import-outside-toplevel
  shape, spacing = (24, 20, 8), (1.4, 1.4, 4.2)
  rng = np.random.default_rng(7)
  resample = jax.jit(device_augment.resample_pair)
  for _ in range(12):
    image, mask = _lesion_scan(rng, shape)
    matrix = augment.sample_affine(rng, shape, spacing, _paper_augment())
    host_image, host_mask = augment.apply_affine(image, mask, matrix)
    device_image, device_mask = map(np.asarray, resample(image, mask, matrix.astype(np.float32)))
    np.testing.assert_allclose(device_image, host_image, rtol=0,
                               atol=device_resample_atol(matrix, shape))  # images in [0, 1)
    assert device_mask.sum() == host_mask.sum()
    # A voxel may swap with a near-tied neighbour; anything more is a bug.
    assert np.count_nonzero(device_mask != host_mask) <= 2, matrix


def test_device_top_k_mask_equals_the_host_one():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from wmh_jax.data import device_augment, nifti  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  fractions = np.round(rng.random(SHAPE) * (rng.random(SHAPE) < 0.1), 1).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(device_augment.top_k_mask(jnp.asarray(fractions))),
                                nifti.top_k_mask(fractions).astype(np.float32))
