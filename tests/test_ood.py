"""Out-of-distribution score (wmh_jax/evaluation/ood.py)."""

from __future__ import annotations

import numpy as np
import pytest

from wmh_jax.evaluation import ood


def test_ledoit_wolf_shrinks_a_near_singular_covariance_and_not_a_well_sampled_one():
  rng = np.random.default_rng(0)
  few = rng.standard_normal((20, 30))  # fewer scans than features: S is singular
  covariance, shrinkage = ood.ledoit_wolf(few)
  assert 0.3 < shrinkage <= 1.0 and np.linalg.eigvalsh(covariance).min() > 0
  many = rng.standard_normal((20000, 4)) * [1.0, 2.0, 3.0, 4.0]
  covariance, shrinkage = ood.ledoit_wolf(many)
  assert shrinkage < 0.01
  np.testing.assert_allclose(np.diag(covariance), [1.0, 4.0, 9.0, 16.0], rtol=0.05)


def test_reference_scores_training_scans_near_one_and_shifted_scans_higher():
  rng = np.random.default_rng(1)
  rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  mixing = np.diag(np.linspace(1.0, 3.0, 8)) @ rotation  # correlated, well conditioned
  train = rng.standard_normal((2000, 8)) @ mixing + 5.0
  reference = ood.Reference.fit(train)
  assert reference.scores(train).mean() == pytest.approx(1.0, abs=0.05)
  assert np.mean(reference.scores(train) > reference.threshold) == pytest.approx(0.01, abs=0.002)
  # chi2(8) / 8 has its 99th percentile at 2.51.
  assert reference.threshold == pytest.approx(2.51, abs=0.15)
  same = rng.standard_normal((500, 8)) @ mixing + 5.0
  shifted = same + 3.0 * mixing[0]  # 3 SD along one axis of the training distribution
  assert ood.auroc(reference.scores(same), reference.scores(shifted)) > 0.8
  restored = ood.Reference.from_json(reference.to_json())
  np.testing.assert_allclose(restored.scores(shifted), reference.scores(shifted))


def test_auroc_counts_pairs_and_ties():
  assert ood.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
  assert ood.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
  assert ood.auroc([1.0, 1.0], [1.0]) == 0.5
  assert ood.auroc([0.0, 2.0], [1.0]) == 0.5
  assert np.isnan(ood.auroc([], [1.0]))
