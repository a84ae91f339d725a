"""Tests for wmh_jax.evaluation.attention."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax.evaluation import attention


def test_predicted_voxels_at_model_resolution():
  # Model grid 1.4 x 1.4 x 4.2 mm = 8.232 mm^3 per voxel.
  out = attention.predicted_voxels(np.array([8.232, 0.0, -3.0, 1.0]), (1.4, 1.4, 4.2))
  # 1000 voxels; negative -> 0; 1 mL = 121.477 voxels -> 121.
  np.testing.assert_array_equal(out, [1000, 0, 0, 121])
  assert out.dtype == np.int64
  assert attention.predicted_voxels(2.0, (1.0, 1.0, 1.0)) == 2000
  # 1 mL voxels: exact halves round to even.
  np.testing.assert_array_equal(attention.predicted_voxels([2.5, 3.5], (10, 10, 10)), [2, 4])


@pytest.mark.parametrize("volume, spacing, message", [
    (np.nan, (1, 1, 1), "NaN"),
    (1.0, (1, 0, 1), "positive"),
    (1.0, (1, 1), "3 positive"),
])
def test_predicted_voxels_bad_input(volume, spacing, message):
  with pytest.raises(ValueError, match=message):
    attention.predicted_voxels(volume, spacing)


def test_threshold_keeps_exact_count_of_largest_values():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
  counts = np.array([0, 17, 120])
  masks = attention.threshold_to_volume(maps, counts)
  assert masks.shape == maps.shape and masks.dtype == bool
  for m, a, n in zip(masks, maps, counts):
    assert m.sum() == n
    expected = np.sort(a.ravel())[::-1][:n]
    np.testing.assert_array_equal(np.sort(a[m])[::-1], expected)
    if 0 < n < a.size:
      assert a[m].min() > a[~m].max()


def test_threshold_ties_broken_by_lowest_flat_index():
  a = np.zeros((2, 2, 2))
  a[1, 1, 1] = 5.0
  mask = attention.threshold_to_volume(a, 3)
  # The maximum first, then the two lowest flat indices among the zeros.
  assert mask.ravel().tolist() == [True, True, False, False, False, False, False, True]


def test_threshold_clips_and_rounds_counts():
  a = np.arange(24.0).reshape(1, 2, 3, 4)
  assert attention.threshold_to_volume(a, 100).all()
  assert not attention.threshold_to_volume(a, -5).any()
  mask = attention.threshold_to_volume(a, np.array([2.5]))
  assert mask.sum() == 2 and mask.ravel()[-2:].all()


def test_threshold_with_predicted_voxels_end_to_end():
  maps = np.random.default_rng(1).random((2, 8, 8, 4))
  n = attention.predicted_voxels(np.array([0.8232, 0.08232]), (1.4, 1.4, 4.2))
  np.testing.assert_array_equal(attention.threshold_to_volume(maps, n).sum(axis=(1, 2, 3)),
                                [100, 10])


@pytest.mark.parametrize("maps, n, message", [
    (np.zeros((4, 4)), 1, "shape"),
    (np.full((2, 2, 2), np.nan), 1, "NaN"),
    (np.zeros((2, 2, 2, 2)), [1, 2, 3], "scalar or \\(2,\\)"),
    (np.zeros((2, 2, 2)), np.nan, "n_voxels contains NaN"),
])
def test_threshold_bad_input(maps, n, message):
  with pytest.raises(ValueError, match=message):
    attention.threshold_to_volume(maps, n)
