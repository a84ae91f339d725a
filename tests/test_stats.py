"""Tests for wmh_jax.evaluation.stats against direct numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from tolerances import float64_rtol
from wmh_jax.evaluation import metrics, stats


def _cohort(seed: int, n: int = 40) -> dict[str, np.ndarray]:
  """Synthetic volumes (mL): predicted WMH and three confounders."""
  rng = np.random.default_rng(seed)
  return {
      "predicted_ml": rng.gamma(2.0, 4.0, n),
      "ventricle_ml": rng.normal(30.0, 8.0, n),
      "white_matter_ml": rng.normal(450.0, 40.0, n),
      "csf_ml": rng.normal(250.0, 30.0, n),
      "noise": rng.normal(0.0, 1.0, n),
  }


def _lstsq_fit(y: np.ndarray, columns: list[np.ndarray]) -> tuple[np.ndarray, float, int]:
  """Least squares with intercept: (coefficients, residual sum of squares, df)."""
  design = np.column_stack([np.ones(len(y)), *columns])
  beta = np.linalg.lstsq(design, y, rcond=None)[0]
  rss = float(np.sum((y - design @ beta) ** 2))
  return beta, rss, len(y) - design.shape[1]


def test_confounder_regression_matches_lstsq():
  c = _cohort(0)
  annotated = 0.5 + 1.1 * c["predicted_ml"] + 0.02 * c["ventricle_ml"] + 0.8 * c["noise"]
  names = ("ventricle_ml", "white_matter_ml", "csf_ml")
  out = stats.confounder_regression(annotated, c["predicted_ml"], {k: c[k] for k in names})

  tss = float(np.sum((annotated - annotated.mean()) ** 2))
  beta_b, rss_b, df_b = _lstsq_fit(annotated, [c["predicted_ml"]])
  beta_f, rss_f, df_f = _lstsq_fit(annotated, [c["predicted_ml"], *(c[k] for k in names)])
  assert out["n"] == 40
  assert out["r2_base"] == pytest.approx(1 - rss_b / tss, rel=1e-10)
  assert out["r2_full"] == pytest.approx(1 - rss_f / tss, rel=1e-10)
  assert out["coef_base"] == pytest.approx(beta_b[1], rel=1e-10)
  assert out["coef_full"] == pytest.approx(beta_f[1], rel=1e-10)

  # t-test of the predicted-volume slope in the base model, by hand.
  design = np.column_stack([np.ones(40), c["predicted_ml"]])
  se = np.sqrt(rss_b / df_b * np.linalg.inv(design.T @ design)[1, 1])
  assert out["p_base"] == pytest.approx(2 * scipy.stats.t.sf(abs(beta_b[1] / se), df_b),
                                        rel=1e-8)
  # Nested-model F-test of the three confounders, by hand.
  f_value = ((rss_b - rss_f) / 3) / (rss_f / df_f)
  assert out["f_confounders"] == pytest.approx(f_value, rel=1e-10)
  assert out["p_f_confounders"] == pytest.approx(scipy.stats.f.sf(f_value, 3, df_f),
                                                 rel=1e-8)
  assert out["df_confounders"] == 3
  assert set(out["confounder_p"]) == set(names)


def test_confounder_regression_known_construction():
  # annotated = 1 + 2 predicted + 3 ventricle + tiny noise: the full model
  # recovers slope 2, the ventricle is highly significant, the others are not.
  c = _cohort(1)
  annotated = 1.0 + 2.0 * c["predicted_ml"] + 3.0 * c["ventricle_ml"] + 1e-3 * c["noise"]
  out = stats.confounder_regression(annotated, c["predicted_ml"],
                                    {"ventricle_ml": c["ventricle_ml"], "csf_ml": c["csf_ml"]})
  assert out["coef_full"] == pytest.approx(2.0, abs=1e-3)
  assert out["r2_full"] == pytest.approx(1.0, abs=1e-8)
  assert out["r2_base"] < 0.5
  assert out["confounder_p"]["ventricle_ml"] < 1e-30
  assert out["confounder_p"]["csf_ml"] > 1e-3
  assert out["p_f_confounders"] < 1e-30 and out["p_full"] < 1e-30


def test_confounder_regression_bad_input():
  c = _cohort(2, n=5)
  with pytest.raises(ValueError, match="at least one confounder"):
    stats.confounder_regression(c["predicted_ml"], c["predicted_ml"], {})
  with pytest.raises(ValueError, match="at least 6 scans"):
    stats.confounder_regression(c["noise"], c["predicted_ml"],
                                {k: c[k] for k in ("ventricle_ml", "white_matter_ml", "csf_ml")})
  with pytest.raises(ValueError, match="differ in length"):
    stats.confounder_regression(c["noise"], c["predicted_ml"][:4], {"csf_ml": c["csf_ml"]})
  bad = c["csf_ml"].copy()
  bad[0] = np.nan
  with pytest.raises(ValueError, match="csf_ml contains NaN"):
    stats.confounder_regression(c["noise"], c["predicted_ml"], {"csf_ml": bad})


def test_pearson_with_confounders_matches_corrcoef():
  c = _cohort(3)
  annotated = c["predicted_ml"] + 0.1 * c["ventricle_ml"]
  out = stats.pearson_with_confounders(annotated, {"ventricle_ml": c["ventricle_ml"],
                                                   "csf_ml": c["csf_ml"]})
  assert out["ventricle_ml"] == pytest.approx(np.corrcoef(annotated, c["ventricle_ml"])[0, 1],
                                              rel=1e-10)
  assert out["csf_ml"] == pytest.approx(np.corrcoef(annotated, c["csf_ml"])[0, 1], rel=1e-10)
  assert np.isnan(stats.pearson_with_confounders(annotated, {"c": np.ones(40)})["c"])


def test_correlation_values():
  x = np.arange(1.0, 9.0)
  out = stats.correlation(x, x ** 3)
  assert out["spearman_rho"] == pytest.approx(1.0)
  r = np.corrcoef(x, x ** 3)[0, 1]
  t = r * np.sqrt(6 / (1 - r ** 2))
  assert out["pearson_r"] == pytest.approx(r, rel=1e-12)
  assert out["pearson_p"] == pytest.approx(2 * scipy.stats.t.sf(t, 6), rel=1e-8)
  y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0, 8.0, 7.0])
  # Spearman = 1 - 6 sum d^2 / (n (n^2 - 1)) with d = +-1: 1 - 48 / 504.
  assert stats.correlation(x, y)["spearman_rho"] == pytest.approx(1 - 48 / 504)
  with pytest.raises(ValueError, match="at least 3"):
    stats.correlation(x[:2], y[:2])


def _icc_pair(seed: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  annotated = rng.gamma(2.0, 5.0, n)
  return annotated, annotated * 0.9 + rng.normal(0.5, 1.5, n)


def test_bootstrap_icc_vectorised_equals_loop_and_contains_estimate():
  annotated, predicted = _icc_pair(5)
  fast = stats.bootstrap_ci(metrics.icc_2_1, annotated, predicted, n_boot=500, seed=7,
                            vectorized=True)
  slow = stats.bootstrap_ci(metrics.icc_2_1, annotated, predicted, n_boot=500, seed=7)
  # Two programs (batched reductions over (500, 30) vs one resample at a time):
  # float64 sums of 2 x 30 values and ~20 more ops per ICC, whose mean-square
  # differences may cancel up to ~30x here (tests/tolerances.py).
  assert fast == pytest.approx(slow, rel=30 * float64_rtol(2 * 30, ops=20, sides=2))
  point = metrics.icc_2_1(annotated, predicted)
  assert fast[0] < point < fast[1]
  assert 0.5 < fast[0] and fast[1] < 1.0


def test_bootstrap_is_seeded():
  annotated, predicted = _icc_pair(6)
  run = lambda seed: stats.bootstrap_ci(metrics.icc_2_1, annotated, predicted,  # noqa: E731
                                        n_boot=200, seed=seed, vectorized=True)
  assert run(0) == run(0)
  assert run(0) != run(1)


def test_bootstrap_mean_matches_normal_theory():
  # 5-95% CI of a mean: mean -+ 1.645 sd / sqrt(n) (sd with ddof=0).
  x = np.random.default_rng(8).normal(10.0, 2.0, 400)
  low, high = stats.bootstrap_ci(lambda a: a.mean(axis=-1), x, n_boot=4000, seed=0,
                                 vectorized=True)
  half = 1.645 * x.std() / np.sqrt(len(x))
  assert low == pytest.approx(x.mean() - half, abs=0.1 * half)
  assert high == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_bootstrap_resamples_rows_jointly():
  a = np.arange(10.0)
  assert stats.bootstrap_ci(lambda u, v: float(np.max(np.abs(u - v))), a, a.copy(),
                            n_boot=50) == (0.0, 0.0)


def test_bootstrap_bad_input():
  a = np.arange(5.0)
  with pytest.raises(ValueError, match="differ in length"):
    stats.bootstrap_ci(metrics.icc_2_1, a, a[:4])
  with pytest.raises(ValueError, match="percentiles"):
    stats.bootstrap_ci(np.mean, a, levels=(5, 105))
  with pytest.raises(ValueError, match="expected \\(10,\\)"):
    stats.bootstrap_ci(lambda u: u, a, n_boot=10, vectorized=True)
  with pytest.raises(ValueError, match="n_boot >= 1"):
    stats.bootstrap_ci(np.mean, a, n_boot=0)
