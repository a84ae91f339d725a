"""Non-deep baselines: intensity-feature volume regression and intensity threshold."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from wmh_jax.evaluation import baselines, metrics

SHAPE = (16, 16, 8)
SPACING_MM = (1.5, 1.5, 1.5)
VOXEL_ML = 1.5 ** 3 / 1000.0


def _brain() -> np.ndarray:
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
  centre = (np.array(SHAPE) - 1) / 2
  return (((grid - centre) / np.array([7.0, 7.0, 3.5])) ** 2).sum(-1) < 1.0


def _record(folder: Path, name: str, image: np.ndarray, mask: np.ndarray | None,
            volume_ml: float = math.nan) -> dict:
  """A cached record as :mod:`wmh_jax.data.cache` writes it (only the keys read here)."""
  arrays = {"image": image.astype(np.float32), "brain": _brain().astype(np.uint8),
            "spacing_mm": np.array(SPACING_MM)}
  if mask is not None:
    arrays["mask"] = mask.astype(np.uint8)
    volume_ml = float(mask.sum()) * VOXEL_ML
  path = folder / f"{name}.npz"
  np.savez(path, **arrays)
  return {"path": str(path), "scan_id": name, "wmh_volume_ml": volume_ml, "severity": -1,
          "has_mask": mask is not None}


def _blob_scan(rng: np.random.Generator, tissue_max: float, lesion_min: float
               ) -> tuple[np.ndarray, np.ndarray]:
  """Brain tissue uniform in [0.3, tissue_max], 1–3 box lesions in [lesion_min, 1] (some = 1)."""
  brain = _brain()
  image = np.where(brain, rng.uniform(0.3, tissue_max, SHAPE), 0.0)
  mask = np.zeros(SHAPE, bool)
  for _ in range(rng.integers(1, 4)):
    x, y, z = rng.integers(5, 10), rng.integers(5, 10), rng.integers(3, 5)
    mask[x:x + 2, y:y + 2, z:z + 2] = True
  lesion = np.minimum(rng.uniform(lesion_min, 1.1, SHAPE), 1.0)  # ~half exactly 1.0
  return np.where(mask, lesion, image), mask


def test_intensity_features_of_a_two_level_brain():
  brain = _brain()
  image = np.where(brain, 0.5, 0.0)
  bright = np.flatnonzero(brain)[:40]
  image.flat[bright] = 1.0
  features = dict(zip(baselines.FEATURES, baselines.intensity_features(image, brain,
                                                                       SPACING_MM)))
  n = int(brain.sum())
  values = np.where(np.arange(n) < 40, 1.0, 0.5)
  assert features["ml_ge_0.6"] == features["ml_ge_0.999"] == pytest.approx(40 * VOXEL_ML)
  assert features["ml_ge_0.5"] == pytest.approx(n * VOXEL_ML)
  assert features["p50"] == 0.5 and features["p99"] == 1.0
  assert features["brain_mean"] == pytest.approx(values.mean())
  assert features["brain_sd"] == pytest.approx(values.std())
  assert features["brain_ml"] == pytest.approx(n * VOXEL_ML)


def test_regression_recovers_a_linear_relation_of_the_features():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=len(baselines.FEATURES))
  train, test = rng.uniform(0, 1, (40, len(weights))), rng.uniform(0, 1, (5, len(weights)))
  model = baselines.IntensityVolumeRegression().fit_features(train, 3.0 + train @ weights)
  np.testing.assert_allclose(model.predict_features(test), 3.0 + test @ weights, rtol=1e-9)
  assert model.n_train == 40
  shrunk = baselines.IntensityVolumeRegression(ridge=1e9).fit_features(train,
                                                                        3.0 + train @ weights)
  np.testing.assert_allclose(shrunk.predict_features(test), np.mean(3.0 + train @ weights),
                             rtol=1e-4)


def test_regression_on_records_predicts_the_bright_volume(tmp_path):
  """WMH volume = bright (1.0) voxels x voxel volume: linear in ml_ge_0.9."""
  brain = _brain()

  def scan(bright: int) -> np.ndarray:
    image = np.where(brain, 0.4, 0.0)
    image.flat[np.flatnonzero(brain)[:bright]] = 1.0
    return image

  counts = (0, 5, 10, 20, 40, 60, 80, 100, 120, 150, 200)
  train = [_record(tmp_path, f"t{k}", scan(k), None, volume_ml=k * VOXEL_ML) for k in counts]
  train.append(_record(tmp_path, "unlabelled", scan(7), None))  # NaN volume: left out
  test = [_record(tmp_path, f"x{k}", scan(k), None) for k in (30, 90)]
  model = baselines.IntensityVolumeRegression().fit(train)
  assert model.n_train == len(counts)
  np.testing.assert_allclose(model.predict(test), [30 * VOXEL_ML, 90 * VOXEL_ML], rtol=1e-6)
  np.testing.assert_array_equal(baselines.IntensityVolumeRegression().fit(train).predict(test),
                                model.predict(test))  # deterministic
  unfitted = baselines.IntensityVolumeRegression().fit(train[-1:])
  assert unfitted.coef is None and np.isnan(unfitted.predict(test)).all()
  assert unfitted.describe().startswith("not fitted")


def test_dice_per_threshold_equals_metrics_dice():
  rng = np.random.default_rng(1)
  image, mask = _blob_scan(rng, tissue_max=0.9, lesion_min=0.7)
  brain = _brain()
  dices = baselines.dice_per_threshold(image, brain, mask, baselines.THRESHOLDS)
  expected = [metrics.dice(mask, baselines.threshold_mask(image, brain, t))
              for t in baselines.THRESHOLDS]
  np.testing.assert_allclose(dices, expected, rtol=1e-12)
  empty = np.zeros(SHAPE, bool)
  assert baselines.dice_per_threshold(np.zeros(SHAPE), brain, empty, [0.5]).tolist() == [1.0]


@pytest.mark.parametrize("tissue_max, lesion_min, expected", [
    (0.755, 0.8, 0.76),  # every t in [0.755, 0.80] separates; ties go to the lowest
    (0.995, 1.0, 1.0),   # lesions exactly 1.0 after clipping: only t = 1.0 with >=
])
def test_threshold_finds_the_separating_threshold(tmp_path, tissue_max, lesion_min, expected):
  rng = np.random.default_rng(2)
  scans = [_blob_scan(rng, tissue_max, lesion_min) for _ in range(5)]
  train = [_record(tmp_path, f"t{i}", image, mask) for i, (image, mask) in enumerate(scans[:4])]
  train.append(_record(tmp_path, "unlabelled", scans[0][0], None, volume_ml=1.0))
  image, mask = scans[4]
  test = [_record(tmp_path, "x", image, mask), _record(tmp_path, "nomask", image, None)]
  model = baselines.ThresholdSegmentation().fit(train)
  assert (model.threshold, model.train_dice, model.n_train) == (expected, 1.0, 4)
  with_mask, without_mask = list(model.predict(test))
  np.testing.assert_array_equal(with_mask.mask, mask)
  assert with_mask.dice == 1.0
  assert with_mask.volume_ml == pytest.approx(mask.sum() * VOXEL_ML)
  assert without_mask.volume_ml == with_mask.volume_ml and math.isnan(without_mask.dice)
  again = baselines.ThresholdSegmentation().fit(train)
  assert (again.threshold, again.train_dice) == (model.threshold, model.train_dice)


def test_threshold_without_training_masks_is_not_fitted(tmp_path):
  rng = np.random.default_rng(3)
  image, mask = _blob_scan(rng, 0.75, 0.8)
  model = baselines.ThresholdSegmentation().fit([_record(tmp_path, "t", image, None, 2.0)])
  assert model.threshold is None and model.n_train == 0 and math.isnan(model.train_dice)
  (prediction,) = model.predict([_record(tmp_path, "x", image, mask)])
  assert prediction.mask is None
  assert math.isnan(prediction.volume_ml) and math.isnan(prediction.dice)
  assert model.describe() == "not fitted: no training scan has a mask"
