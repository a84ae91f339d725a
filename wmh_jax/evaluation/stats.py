"""Statistics of the paper's evaluation (§2.4, §3).

- `confounder_regression`: OLS of annotated WMH volume on predicted volume,
  without and with confounder volumes (ventricles, white matter, CSF), with
  R², coefficient p-values and the nested-model F-test of the confounders.
- `pearson_with_confounders`, `correlation`: Pearson / Spearman correlations.
- `bootstrap_ci`: percentile bootstrap over scans (Fig. 2 shows 5%-95% CIs),
  vectorised over replicates for metrics that accept a batch (e.g.
  `metrics.icc_2_1`), with a per-replicate loop for any other metric.

All volumes are in mL; inputs are 1-D arrays over scans, `(n,)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import scipy.stats
import statsmodels.api as sm


def _vector(values: np.ndarray, name: str) -> np.ndarray:
  """A finite 1-D float64 array, or ValueError naming `name`."""
  x = np.asarray(values, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name} must be 1-D (one value per scan); got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or infinite values")
  return x


def _same_length(arrays: Mapping[str, np.ndarray], minimum: int) -> int:
  """Common length of the named arrays; ValueError if unequal or < minimum."""
  lengths = {name: len(a) for name, a in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"arrays differ in length: {lengths}")
  n = next(iter(lengths.values()))
  if n < minimum:
    raise ValueError(f"need at least {minimum} scans; got {n}")
  return n


def confounder_regression(annotated_ml: np.ndarray, predicted_ml: np.ndarray,
                          confounders: Mapping[str, np.ndarray]) -> dict:
  """OLS of annotated on predicted WMH volume, without and with confounders.

  Models: `annotated ~ 1 + predicted` (base) and
  `annotated ~ 1 + predicted + confounders` (full).

  Args:
    annotated_ml: `(n,)` WMH volume from the annotations (mL).
    predicted_ml: `(n,)` predicted WMH volume (mL).
    confounders: name -> `(n,)` volume (mL), e.g. `ventricle_ml`,
      `white_matter_ml`, `csf_ml`; at least one.

  Returns:
    dict with `n`; `r2_base`, `r2_full` (coefficients of determination);
    `coef_base`, `coef_full`, `p_base`, `p_full` (slope of predicted volume and
    its two-sided t-test p-value in each model); `confounder_p` (name -> p of
    each confounder's coefficient in the full model); `f_confounders`,
    `p_f_confounders`, `df_confounders` (F-test of the full against the base
    model, statsmodels `compare_f_test`).

  Raises:
    ValueError: no confounder, non-finite values, unequal lengths, or fewer
      scans than full-model parameters + 1.
  """
  if not confounders:
    raise ValueError("confounder_regression needs at least one confounder")
  y = _vector(annotated_ml, "annotated_ml")
  x = _vector(predicted_ml, "predicted_ml")
  extra = {name: _vector(v, name) for name, v in confounders.items()}
  n = _same_length({"annotated_ml": y, "predicted_ml": x, **extra}, len(extra) + 3)
  base = sm.OLS(y, np.column_stack([np.ones(n), x])).fit()
  full = sm.OLS(y, np.column_stack([np.ones(n), x, *extra.values()])).fit()
  f_value, f_p, df_diff = full.compare_f_test(base)
  return {
      "n": n,
      "r2_base": float(base.rsquared),
      "r2_full": float(full.rsquared),
      "coef_base": float(base.params[1]),
      "coef_full": float(full.params[1]),
      "p_base": float(base.pvalues[1]),
      "p_full": float(full.pvalues[1]),
      "confounder_p": {name: float(p) for name, p in zip(extra, full.pvalues[2:])},
      "f_confounders": float(f_value),
      "p_f_confounders": float(f_p),
      "df_confounders": int(df_diff),
  }


def pearson_with_confounders(annotated_ml: np.ndarray,
                             confounders: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Pearson r between annotated WMH volume `(n,)` and each confounder `(n,)`.

  Returns name -> r (the paper reports 0.41 ventricles, 0.47 white matter,
  0.45 CSF). NaN for a constant confounder.
  """
  y = _vector(annotated_ml, "annotated_ml")
  result = {}
  for name, values in confounders.items():
    x = _vector(values, name)
    _same_length({"annotated_ml": y, name: x}, 3)
    result[name] = _pearson(y, x)[0]
  return result


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Pearson (r, p); (NaN, NaN) when either input is constant."""
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return float("nan"), float("nan")
  r, p = scipy.stats.pearsonr(x, y)
  return float(r), float(p)


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Pearson and Spearman correlation of two `(n,)` arrays, n >= 3.

  E.g. Dice against ICC across networks. Returns `pearson_r`, `pearson_p`,
  `spearman_rho`, `spearman_p` (two-sided); NaN for a constant input.
  """
  x, y = _vector(x, "x"), _vector(y, "y")
  _same_length({"x": x, "y": y}, 3)
  r, p = _pearson(x, y)
  if np.isnan(r):
    rho, rho_p = float("nan"), float("nan")
  else:
    rho, rho_p = (float(v) for v in scipy.stats.spearmanr(x, y))
  return {"pearson_r": r, "pearson_p": p, "spearman_rho": rho, "spearman_p": rho_p}


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
  """`(n_boot, n)` int scan indices drawn with replacement (numpy PCG64, `seed`)."""
  if n < 1 or n_boot < 1:
    raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1; got {n}, {n_boot}")
  return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(metric_fn: Callable[..., float | np.ndarray], *arrays: np.ndarray,
                 n_boot: int = 1000, seed: int = 0,
                 levels: tuple[float, float] = (5, 95),
                 vectorized: bool = False) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of `metric_fn(*arrays)`.

  Scans (the first axis of every array, `(n, ...)`) are resampled with
  replacement, the same rows for all arrays.

  Args:
    metric_fn: the statistic. With `vectorized=False` it is called once per
      replicate on arrays `(n, ...)` and returns a float. With
      `vectorized=True` it is called once on all replicates, arrays
      `(n_boot, n, ...)`, and returns `(n_boot,)` (e.g. `metrics.icc_2_1`).
    *arrays: one or more arrays with the same first dimension n.
    n_boot: number of bootstrap replicates.
    seed: seed of the resampling; equal seeds give equal intervals.
    levels: lower and upper percentiles (0-100); the paper's Fig. 2 uses 5, 95.
    vectorized: whether `metric_fn` accepts the batch of replicates.

  Returns:
    `(low, high)`. Replicates where the metric is NaN (e.g. an ICC of a
    resample whose ratings are all identical) are left out.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array")
  arrays = tuple(np.asarray(a) for a in arrays)
  n = _same_length({f"array {i}": a for i, a in enumerate(arrays)}, 2)
  if not all(0 <= q <= 100 for q in levels):
    raise ValueError(f"levels must be percentiles in [0, 100]; got {levels}")
  idx = bootstrap_indices(n, n_boot, seed)
  if vectorized:
    values = np.asarray(metric_fn(*(a[idx] for a in arrays)), dtype=np.float64)
  else:
    values = np.array([metric_fn(*(a[i] for a in arrays)) for i in idx], dtype=np.float64)
  if values.shape != (n_boot,):
    raise ValueError(f"metric_fn returned shape {values.shape}; expected ({n_boot},)")
  low, high = np.nanpercentile(values, levels)
  return float(low), float(high)
