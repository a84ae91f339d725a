"""Split-conformal volume intervals (wmh_jax/evaluation/conformal.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wmh_jax.evaluation import conformal


def test_quantile_is_the_finite_sample_rank():
  predicted = np.full(9, 5.0)
  annotated = predicted + np.arange(1.0, 10.0)  # absolute scores 1..9
  # ceil((9 + 1) * 0.9) = 9: the largest score.
  assert conformal.calibrate(annotated, predicted, 0.9, "absolute").quantile == 9.0
  # ceil(10 * 0.5) = 5: the 5th smallest.
  assert conformal.calibrate(annotated, predicted, 0.5, "absolute").quantile == 5.0
  # n = 8 cannot reach 0.9: ceil(9 * 0.9) = 9 > 8, the interval is unbounded above.
  calibration = conformal.calibrate(annotated[:8], predicted[:8], 0.9, "absolute")
  assert math.isinf(calibration.quantile)
  low, high = conformal.interval(calibration, [3.0])
  assert low[0] == 0.0 and math.isinf(high[0])


@pytest.mark.parametrize("score", conformal.SCORES)
def test_exchangeable_scans_are_covered_at_the_nominal_level(score):
  """Coverage over many calibration/test draws from one distribution: >= level, and at most
  level + 1/(n+1) (the split-conformal bounds, continuous scores), up to sampling error."""
  rng = np.random.default_rng(0)
  n, level, coverages = 40, 0.9, []
  for _ in range(300):
    truth = rng.lognormal(1.5, 1.0, n + 100)
    predicted = truth * rng.lognormal(0.0, 0.3, truth.size) + rng.normal(0.0, 0.5, truth.size)
    calibration = conformal.calibrate(truth[:n], predicted[:n], level, score)
    coverages.append(conformal.coverage(calibration, truth[n:], predicted[n:])[0])
  mean = float(np.mean(coverages))
  error = 4 * float(np.std(coverages)) / np.sqrt(len(coverages))  # 4 standard errors
  assert level - error <= mean <= level + 1 / (n + 1) + error, mean


def test_intervals_are_non_negative_and_hold_the_prediction():
  calibration = conformal.calibrate([1.0, 4.0, 10.0, 0.0], [2.0, 3.0, 14.0, 0.5], 0.5, "log")
  predicted = np.array([-1.0, 0.0, 2.5, 40.0])
  low, high = conformal.interval(calibration, predicted)
  assert (low >= 0).all() and (low <= np.maximum(predicted, 0)).all()
  assert (high >= np.maximum(predicted, 0)).all()
  # The log interval is relative: its width grows with the prediction.
  assert np.all(np.diff((high - low)[1:]) > 0)


def test_bad_calibration_inputs_raise():
  with pytest.raises(ValueError, match="level"):
    conformal.calibrate([1.0], [1.0], 1.0)
  with pytest.raises(ValueError, match="equal-length"):
    conformal.calibrate([1.0, 2.0], [1.0], 0.9)
  with pytest.raises(ValueError, match="finite"):
    conformal.calibrate([1.0, np.nan], [1.0, 2.0], 0.9)
  with pytest.raises(ValueError, match="score"):
    conformal.calibrate([1.0], [1.0], 0.9, "squared")
