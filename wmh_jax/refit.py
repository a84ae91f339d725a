"""Closed-form refit of a volume head's Dense layer on the frozen network's features.

Both volume heads (`models.VolumeHead`, `models.CountHead`) end in
``volume = pooled . W + bias``, with ``pooled`` (b, K) their standardised
pooled features (a model output). With everything before the Dense layer
fixed, the best W and bias for the training scans are a ridge least-squares
fit: a few milliseconds, against the hundreds of noisy Adam steps a Dense
layer needs to follow a body that is still changing. `train.refit_head`
applies it at every epoch end (before validation, so the checkpoint holds the
refitted head).
"""

from __future__ import annotations

import numpy as np


def ridge_readout(pooled: np.ndarray, target: np.ndarray, ridge: float
                  ) -> tuple[np.ndarray, float]:
  """Ridge least squares ``target ~ pooled . w + b``; the intercept is not penalised.

  Minimises ``|target - pooled w - b|^2 + ridge * n * |w|^2``.

  Args:
    pooled: (n, K) features (standardised, so one penalty suits every column).
    target: (n,) regression targets (scaled units).
    ridge: penalty per scan (>= 0).

  Returns:
    w (K,) float32 and b, the intercept.
  """
  pooled, target = np.asarray(pooled, np.float64), np.asarray(target, np.float64)
  n, k = pooled.shape
  centre, offset = pooled.mean(axis=0), target.mean()
  x = pooled - centre
  weights = np.linalg.solve(x.T @ x + ridge * n * np.eye(k), x.T @ (target - offset))
  return weights.astype(np.float32), float(offset - centre @ weights)


def with_dense(params: dict, weights: np.ndarray, bias: float) -> dict:
  """``params`` with ``volume_head/dense`` set to kernel ``weights[:, None]`` and ``bias``."""
  head = dict(params["volume_head"])
  head["dense"] = {"kernel": np.asarray(weights, np.float32)[:, None],
                   "bias": np.asarray([bias], np.float32)}
  return {**params, "volume_head": head}
