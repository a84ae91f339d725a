"""Out-of-distribution score (wmh_jax/evaluation/ood.py)."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax import configs
from wmh_jax.evaluation import ood


def test_score_is_the_mean_squared_standardised_feature():
  pooled = np.array([[0.0, 0.0], [1.0, -1.0], [3.0, 1.0]])
  np.testing.assert_allclose(ood.scores(pooled), [0.0, 1.0, 5.0])
  # Standard-normal features (what the running standardisation gives on training data)
  # score about 1, so the 99th percentile of many training scans is near the chi2 value.
  rng = np.random.default_rng(0)
  train = ood.scores(rng.standard_normal((20000, 16)))
  assert train.mean() == pytest.approx(1.0, abs=0.01)
  assert ood.threshold(train) == pytest.approx(2.0, abs=0.05)  # chi2(16) 99 % / 16 = 2.00


def test_auroc_counts_pairs_and_ties():
  assert ood.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
  assert ood.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
  assert ood.auroc([1.0, 1.0], [1.0]) == 0.5
  assert ood.auroc([0.0, 2.0], [1.0]) == 0.5
  assert np.isnan(ood.auroc([], [1.0]))


def test_available_only_for_standardised_volume_heads():
  model = configs.get_config().model
  assert ood.available(model)  # weak, running-standardised GP head
  model.pooled_norm = "none"
  assert not ood.available(model)
  model.volume_head = "count"  # always standardised
  assert ood.available(model)
  model.kind = "strong"
  assert not ood.available(model)
