"""Tests for wmh_jax.training.refit: the closed-form ridge readout and the Dense refit."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax.training import refit


def _linear_task(n: int, noise: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  features = rng.normal(3.0, [1.0, 10.0, 0.1, 2.0], (n, 4))
  weights = np.array([0.5, -0.2, 4.0, 0.0])
  return features, 1.5 + features @ weights + noise * rng.standard_normal(n), weights


def test_ridge_readout_recovers_a_noiseless_linear_map():
  features, target, weights = _linear_task(60, noise=0.0)
  fit = refit.RidgeReadout(features, target)
  assert fit.ridge == min(refit.RIDGES)  # leave-one-out prefers the least shrinkage
  dense_w, dense_b = fit.dense()
  # Ridge 1e-3 on 60 standardised rows shrinks by < 1e-4 relative.
  np.testing.assert_allclose(dense_w, weights, atol=1e-3)
  np.testing.assert_allclose(features @ dense_w + dense_b, fit.predict(features), rtol=1e-5)
  np.testing.assert_allclose(fit.predict(features), target, rtol=1e-3)


def test_ridge_readout_shrinks_pure_noise_to_the_mean():
  rng = np.random.default_rng(1)
  features, target = rng.standard_normal((40, 30)), rng.standard_normal(40)
  fit = refit.RidgeReadout(features, target)
  assert fit.ridge >= 100.0  # 30 noise features, 40 scans: heavy shrinkage wins
  spread = np.std(fit.predict(rng.standard_normal((200, 30))))
  assert spread < 0.3 * np.std(target)


def test_ridge_readout_handles_a_constant_feature():
  features, target, _ = _linear_task(30, noise=0.1)
  features[:, 3] = 7.0
  fit = refit.RidgeReadout(features, target)
  assert np.isfinite(fit.predict(features)).all()
  assert fit.dense()[0][3] == 0.0


def test_fitted_readout_sets_only_the_volume_head_fit_and_unfitted_switches_it_off():
  readout = {"volume_head": {"dense": {"kernel": np.zeros(2, np.float32),
                                       "bias": np.float32(0.0), "fitted": np.float32(0.0)}},
             "other": {"x": np.ones(1)}}
  new = refit.fitted_readout(readout, np.array([1.0, 2.0]), 3.0)
  assert new["other"] is readout["other"]
  np.testing.assert_array_equal(new["volume_head"]["dense"]["kernel"], [1.0, 2.0])
  assert new["volume_head"]["dense"]["bias"] == 3.0
  assert new["volume_head"]["dense"]["fitted"] == 1.0
  assert readout["volume_head"]["dense"]["fitted"] == 0.0  # the input is not changed
  off = refit.unfitted(new)
  assert off["volume_head"]["dense"]["fitted"] == 0.0
  np.testing.assert_array_equal(off["volume_head"]["dense"]["kernel"], [1.0, 2.0])
  with pytest.raises(KeyError):
    refit.fitted_readout({"other": {}}, np.ones(2), 0.0)
