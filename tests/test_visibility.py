"""Tests for wmh_jax.study.visibility: AUC, oracle top-k Dice, clipping shares."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax.study import visibility


def test_perfectly_visible_lesion():
  image = np.full((4, 4, 2), 0.5)
  mask = np.zeros_like(image)
  mask[0, 0, :] = 1.0
  image[0, 0, :] = 0.9
  result = visibility.scan_visibility(image, np.ones(image.shape, bool), mask)
  assert result == visibility.Visibility(1.0, 1.0, 0.0, 0.0)


def test_ties_at_the_clip_share_the_oracle():
  # 2 lesion voxels at 1.0 and 2 grey-matter voxels also clipped to 1.0; the
  # oracle takes k = 2 of the 4 tied voxels: expected Dice 0.5.
  image = np.array([1.0, 1.0, 1.0, 1.0, 0.2, 0.3, 0.1, 0.4]).reshape(2, 2, 2)
  mask = np.array([1, 1, 0, 0, 0, 0, 0, 0], float).reshape(2, 2, 2)
  brain = np.ones(image.shape, bool)
  result = visibility.scan_visibility(image, brain, mask)
  assert result.oracle_topk_dice == pytest.approx(0.5)
  # Each lesion voxel beats the 4 darker voxels and ties 2: (4 + 0.5 * 2) / 6.
  assert result.lesion_auc == pytest.approx(5 / 6)
  assert result.lesion_clipped == 1.0 and result.brain_clipped == pytest.approx(2 / 6)


def test_outside_brain_and_empty_masks():
  image = np.zeros((2, 2, 2))
  brain = np.zeros((2, 2, 2), bool)
  brain[0] = True
  mask = np.zeros((2, 2, 2))
  assert visibility.scan_visibility(image, brain, mask) is None
  mask[1] = 1.0  # lesion outside the brain does not count
  assert visibility.scan_visibility(image, brain, mask) is None
