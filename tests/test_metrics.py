"""Tests for wmh_jax.evaluation.metrics against published and hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from wmh_jax.evaluation import metrics

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8],
                          [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float)


def _statsmodels_icc(ratings: np.ndarray, kind: str) -> float:
  """ICC from statsmodels' two-way ANOVA table (independent of metrics.py)."""
  n, k = ratings.shape
  frame = pd.DataFrame({"y": ratings.ravel(), "target": np.repeat(np.arange(n), k),
                        "rater": np.tile(np.arange(k), n)})
  table = sm.stats.anova_lm(smf.ols("y ~ C(target) + C(rater)", frame).fit())
  ms = table["sum_sq"] / table["df"]
  msr, msc, mse = ms["C(target)"], ms["C(rater)"], ms["Residual"]
  msw = (table["sum_sq"]["C(rater)"] + table["sum_sq"]["Residual"]) / (n * (k - 1))
  if kind == "2,1":
    return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
  if kind == "3,1":
    return (msr - mse) / (msr + (k - 1) * mse)
  return (msr - msw) / (msr + (k - 1) * msw)


# --------------------------------------------------------------------------- ICC


@pytest.mark.parametrize("kind, published", [("1,1", 0.17), ("2,1", 0.29), ("3,1", 0.71)])
def test_icc_reproduces_shrout_fleiss_table(kind, published):
  assert metrics.icc(SHROUT_FLEISS, kind) == pytest.approx(published, abs=0.005)


def test_icc_2_1_shrout_fleiss_exact_from_mean_squares():
  # Mean squares of the example: MSR = 11.2417, MSC = 32.4861, MSE = 1.0194
  # (published rounded: 11.24, 32.49, 1.02); ICC(2,1) = 184/635 exactly.
  assert metrics.icc(SHROUT_FLEISS, "2,1") == pytest.approx(184 / 635, rel=1e-12)


@pytest.mark.parametrize("kind", metrics.ICC_KINDS)
def test_icc_matches_statsmodels_anova(kind):
  rng = np.random.default_rng(3)
  truth = rng.gamma(2.0, 5.0, size=(15, 1))
  ratings = truth + rng.normal(0.0, 2.0, size=(15, 3)) + np.array([0.0, 1.5, -0.7])
  assert metrics.icc(ratings, kind) == pytest.approx(_statsmodels_icc(ratings, kind), rel=1e-10)


def test_icc_pairwise_helpers_and_batch():
  rng = np.random.default_rng(4)
  a = rng.normal(10, 3, size=(5, 12))
  b = a + rng.normal(0.5, 1.0, size=(5, 12))
  batched = metrics.icc_2_1(a, b)
  assert batched.shape == (5,)
  for i in range(5):
    assert batched[i] == pytest.approx(metrics.icc(np.stack([a[i], b[i]], 1), "2,1"), rel=1e-12)
  assert metrics.icc_3_1(a[0], b[0]) == pytest.approx(
      _statsmodels_icc(np.stack([a[0], b[0]], 1), "3,1"), rel=1e-10)


def test_icc_absolute_agreement_penalises_bias_consistency_does_not():
  a = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
  assert metrics.icc_3_1(a, a + 5.0) == pytest.approx(1.0)
  # Hand-computed: MSR = 2 * 66 / 4 = 33, MSC = 5 * 12.5 = 62.5, MSE = 0, so
  # ICC(2,1) = 33 / (33 + 2 * 62.5 / 5) = 33 / 58.
  assert metrics.icc_2_1(a, a + 5.0) == pytest.approx(33 / 58)


def test_icc_zero_variance_is_nan():
  assert np.isnan(metrics.icc_2_1(np.full(4, 2.5), np.full(4, 2.5)))
  batch = metrics.icc(np.stack([np.full((4, 2), 0.1), SHROUT_FLEISS[:4, :2]]), "2,1")
  assert np.isnan(batch[0]) and np.isfinite(batch[1])


@pytest.mark.parametrize("ratings, message", [
    (np.ones((1, 2)), "at least 2 targets"),
    (np.ones((3, 1)), "at least 2 raters"),
    (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN"),
    (np.ones(3), "shape"),
])
def test_icc_bad_input(ratings, message):
  with pytest.raises(ValueError, match=message):
    metrics.icc(ratings)


def test_icc_bad_kind_and_shape_mismatch():
  with pytest.raises(ValueError, match="unknown ICC kind"):
    metrics.icc(SHROUT_FLEISS, "2,k")
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.icc_2_1(np.ones(3), np.ones(4))


# --------------------------------------------------------------------- Dice, AVD


def test_dice_two_overlapping_cubes():
  a = np.zeros((10, 10, 10), bool)
  b = np.zeros_like(a)
  a[0:4, 0:4, 0:4] = True  # 64 voxels
  b[2:6, 0:4, 0:4] = True  # 64 voxels, overlap 2 * 4 * 4 = 32
  assert metrics.dice(a, b) == pytest.approx(2 * 32 / 128)


def test_dice_empty_convention():
  empty = np.zeros((3, 3, 3))
  assert metrics.dice(empty, empty) == 1.0
  assert np.isnan(metrics.dice(empty, empty, empty_value=np.nan))
  assert metrics.dice(empty, np.ones((3, 3, 3))) == 0.0


def test_volume_differences():
  assert metrics.avd_percent(20.0, 15.0) == pytest.approx(25.0)
  assert metrics.avd_percent(20.0, 25.0) == pytest.approx(25.0)
  assert metrics.log_volume_difference(10.0, 20.0) == pytest.approx(np.log(2.0))
  assert metrics.log_volume_difference(20.0, 10.0) == pytest.approx(np.log(2.0))
  assert metrics.avd_percent(0.0, 0.0) == 0.0
  assert metrics.avd_percent(0.0, 1.0) == np.inf
  assert metrics.log_volume_difference(0.0, 0.0) == 0.0
  assert metrics.log_volume_difference(5.0, 0.0) == np.inf
  with pytest.raises(ValueError, match="finite and >= 0"):
    metrics.avd_percent(-1.0, 2.0)
  with pytest.raises(ValueError, match="finite and >= 0"):
    metrics.log_volume_difference(1.0, np.nan)


# -------------------------------------------------------------------------- HD95


def _box(shape, lo, hi) -> np.ndarray:
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


def _rotated_affine(spacing_mm) -> np.ndarray:
  c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
  affine = np.eye(4)
  affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag(spacing_mm)
  affine[:3, 3] = (-10.0, 4.0, 7.5)
  return affine


def test_hd95_box_shifted_one_slice_in_anisotropic_grid():
  # In-plane erosion keeps a 12-voxel ring per slice. Shifting a 4x4x3 box by
  # one slice (3.0 mm) leaves 24 of 36 ring voxels at 0 mm and 12 at 3.0 mm,
  # so the 95th percentile in both directions is 3.0 mm.
  ref = _box((12, 12, 8), (2, 2, 2), (6, 6, 5))
  res = _box((12, 12, 8), (2, 2, 3), (6, 6, 6))
  assert metrics.hd95_mm(ref, res, np.diag([0.9, 1.2, 3.0, 1.0])) == pytest.approx(3.0)
  # Distances are rigid-motion invariant: same under a rotated, translated affine.
  assert metrics.hd95_mm(ref, res, _rotated_affine([0.9, 1.2, 3.0])) == pytest.approx(3.0)


def test_hd95_box_shifted_in_plane():
  # Shift along x by one voxel (0.9 mm): 18 of 36 ring voxels move 0.9 mm.
  ref = _box((12, 12, 8), (2, 2, 2), (6, 6, 5))
  res = _box((12, 12, 8), (3, 2, 2), (7, 6, 5))
  assert metrics.hd95_mm(ref, res, np.diag([0.9, 1.2, 3.0, 1.0])) == pytest.approx(0.9)


def test_hd95_empty_is_nan_and_bad_affine():
  ref = _box((6, 6, 3), (1, 1, 0), (3, 3, 2))
  assert np.isnan(metrics.hd95_mm(ref, np.zeros_like(ref), np.eye(4)))
  assert np.isnan(metrics.hd95_mm(np.zeros_like(ref), ref, np.eye(4)))
  with pytest.raises(ValueError, match="4x4"):
    metrics.hd95_mm(ref, ref, np.eye(3))


# ------------------------------------------------------------------------ Lesions


def test_lesion_detection_two_of_three_hit_one_false_positive():
  ref = np.zeros((12, 12, 6), bool)
  ref[1:3, 1:3, 1:3] = True          # lesion A
  ref[6:8, 6:8, 1:3] = True          # lesion B
  ref[10, 1, 1] = ref[11, 2, 2] = True  # lesion C: diagonal neighbours, one lesion
  res = np.zeros_like(ref)
  res[2, 2, 2] = True                # hits A
  res[11, 2, 2] = True               # hits C
  res[5, 10, 4] = True               # false positive
  scores = metrics.lesion_recall_f1(ref, res)
  assert scores == pytest.approx({"recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3})


def test_lesion_detection_component_spanning_two_lesions():
  ref = np.zeros((12, 12, 6), bool)
  ref[1, 1, 1] = ref[1, 5, 1] = ref[8, 8, 3] = True
  res = np.zeros_like(ref)
  res[1, 1:6, 1] = True              # one component touching two lesions
  res[5, 10, 4] = True               # false positive
  scores = metrics.lesion_recall_f1(ref, res)
  # recall 2/3, precision 1/2 -> F1 = 2 * (1/3) / (7/6) = 4/7.
  assert scores == pytest.approx({"recall": 2 / 3, "precision": 0.5, "f1": 4 / 7})


def test_lesion_detection_empty_conventions():
  ref = _box((6, 6, 3), (1, 1, 0), (3, 3, 2))
  empty = np.zeros_like(ref)
  assert metrics.lesion_recall_f1(ref, empty) == {"recall": 0.0, "precision": 1.0,
                                                  "f1": 0.0}
  assert metrics.lesion_recall_f1(empty, empty)["f1"] == 1.0
  far = _box((6, 6, 3), (4, 4, 2), (6, 6, 3))
  assert metrics.lesion_recall_f1(ref, far)["f1"] == 0.0


# ------------------------------------------------------------ challenge metrics


def _ellipsoid_radius2(shape, center, radii) -> np.ndarray:
  grid = np.indices(shape, dtype=np.float64)
  return sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3))


def _scene() -> tuple[np.ndarray, np.ndarray]:
  """Labels (20, 18, 6) with 3 lesions and a label-2 box, and a probability map."""
  shape = (20, 18, 6)
  labels = np.zeros(shape, np.int64)
  labels[_ellipsoid_radius2(shape, (5, 5, 2), (3.2, 2.5, 1.6)) <= 1] = 1
  labels[_ellipsoid_radius2(shape, (14, 12, 3), (2.6, 3.4, 1.2)) <= 1] = 1
  labels[15, 3, 1] = labels[16, 4, 2] = 1
  labels[9:12, 14:17, 0:2] = 2
  blobs = [((6, 5.5, 2), (3.0, 2.8, 1.5)), ((13.5, 12, 3.4), (2.2, 3.0, 1.4)),
           ((10, 15, 1), (1.5, 1.5, 1.0)), ((3, 15, 4), (1.2, 1.2, 0.8))]
  prob = np.max([np.exp(-0.5 * _ellipsoid_radius2(shape, c, r)) for c, r in blobs], 0)
  return labels, prob


def test_challenge_metrics_match_reference_evaluation_script():
  # Expected values: the challenge's evaluation.py (SimpleITK 2.5.7, labels
  # stored as float32) run on the same arrays and the same oblique grid.
  labels, prob = _scene()
  spacing = (0.9, 1.2, 3.0)
  scores = metrics.challenge_metrics(labels, prob, _rotated_affine(spacing), spacing)
  assert scores["dice"] == pytest.approx(0.6666666666666667, rel=1e-12)
  assert scores["hd95_mm"] == pytest.approx(3.3963044842036516, rel=1e-9)
  assert scores["avd_percent"] == pytest.approx(48.07692307692308, rel=1e-12)
  assert scores["lesion_recall"] == pytest.approx(2 / 3)
  assert scores["lesion_f1"] == pytest.approx(0.5714285714285715)
  assert scores["reference_volume_ml"] == pytest.approx(104 * 0.9 * 1.2 * 3.0 / 1000)
  assert scores["result_volume_ml"] == pytest.approx(154 * 0.9 * 1.2 * 3.0 / 1000)
  assert scores["log_volume_difference"] == pytest.approx(np.log(154 / 104))


def test_hd95_in_plane_square_erosion_and_image_border_like_reference():
  # Irregular masks touching the image border; a 3x3 cross erosion gives
  # 3.2682 mm and eroding from the border (outside = background) 2.7313 mm.
  ref = _box((8, 8, 3), (0, 0, 0), (4, 5, 2))
  ref[4, 2, 0] = ref[5, 3, 1] = True
  res = _box((8, 8, 3), (1, 0, 1), (5, 4, 3))
  res[2, 4, 1] = True
  affine = np.diag([1.1, 0.7, 2.5, 1.0])
  assert metrics.hd95_mm(ref, res, affine) == pytest.approx(3.2649655434629015, rel=1e-9)
  scores = metrics.challenge_metrics(ref.astype(int), res.astype(float), affine, (1.1, 0.7, 2.5))
  assert scores["dice"] == pytest.approx(0.3466666666666667)
  assert scores["avd_percent"] == pytest.approx(21.428571428571427)
  assert scores["lesion_recall"] == scores["lesion_f1"] == 1.0


def test_label_2_is_removed_from_result():
  labels = np.zeros((8, 8, 4), np.int64)
  labels[1:4, 1:4, 1:3] = 1
  labels[5:7, 5:7, 1:3] = 2
  result = (labels > 0).astype(np.float32)  # also segments the other pathology
  scores = metrics.challenge_metrics(labels, result, np.eye(4), (1.0, 1.0, 1.0))
  assert scores["dice"] == 1.0 and scores["lesion_f1"] == 1.0
  assert scores["hd95_mm"] == 0.0 and scores["avd_percent"] == 0.0
  # Without the removal the extra 8 voxels would count: Dice 36 / 44.
  assert metrics.dice(labels == 1, result >= 0.5) == pytest.approx(36 / 44)


def test_challenge_binarises_at_one_half():
  labels = np.zeros((4, 4, 2), np.int64)
  labels[1, 1, 0] = labels[2, 2, 1] = 1
  result = np.zeros((4, 4, 2))
  result[1, 1, 0], result[2, 2, 1] = 0.5, 0.4999
  ref, res = metrics.challenge_masks(labels, result)
  assert ref.sum() == 2 and res.sum() == 1 and res[1, 1, 0]


@pytest.mark.parametrize("labels, result, affine, spacing, message", [
    (np.full((3, 3, 3), 3), np.zeros((3, 3, 3)), np.eye(4), (1, 1, 1), "0, 1 or 2"),
    (np.zeros((3, 3, 3)), np.full((3, 3, 3), np.nan), np.eye(4), (1, 1, 1), "NaN"),
    (np.zeros((3, 3, 3)), np.zeros((3, 3, 2)), np.eye(4), (1, 1, 1), "differ in shape"),
    (np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), np.eye(4), (1, 1, 2), "does not match"),
])
def test_challenge_metrics_bad_input(labels, result, affine, spacing, message):
  with pytest.raises(ValueError, match=message):
    metrics.challenge_metrics(labels, result, affine, spacing)
