"""Tests for wmh_jax.refit: the closed-form ridge readout and the Dense refit."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax import refit


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


def test_with_dense_replaces_only_the_volume_head_dense_layer():
  params = {"body": {"w": np.ones(3)},
            "volume_head": {"dense": {"kernel": np.zeros((2, 1)), "bias": np.zeros(1)},
                            "hidden_kernel": np.ones((5, 2))}}
  new = refit.with_dense(params, np.array([1.0, 2.0]), 3.0)
  assert new["body"] is params["body"]
  assert new["volume_head"]["hidden_kernel"] is params["volume_head"]["hidden_kernel"]
  np.testing.assert_array_equal(new["volume_head"]["dense"]["kernel"], [[1.0], [2.0]])
  np.testing.assert_array_equal(new["volume_head"]["dense"]["bias"], [3.0])
  assert params["volume_head"]["dense"]["bias"][0] == 0.0  # the input is not changed
  with pytest.raises(KeyError):
    refit.with_dense({"body": {}}, np.ones(2), 0.0)
