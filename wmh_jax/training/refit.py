"""Closed-form refit of a volume head's Dense layer on the frozen network's features.

Both volume heads (`models.architectures.VolumeHead`, `CountHead`) end in
``volume = pooled . W + bias``, with ``pooled`` (b, K) their standardised
pooled features (a model output). With everything before the Dense layer
fixed, the best W and bias for the training scans are a ridge least-squares
fit (:class:`RidgeReadout`, its penalty chosen by leave-one-out error on
the training scans): milliseconds, against the hundreds of noisy Adam steps
a Dense layer needs to follow a body that is still changing.

The fit goes into the state's ``readout`` collection (`models.architectures.RefittableDense`),
which inference uses and training ignores: fed back into training, the
refitted weights of a GP head made the next steps' loss explode (BUILD_NOTES,
"Weak labels that measure lesions"). ``train.refit_head`` says when:
``"epoch"`` (every epoch end, before validation), ``"end"`` (after the last
step) or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


# Ridge penalties tried (standardised features, so each column's x.x is n); the
# leave-one-out best is kept.
RIDGES = tuple(10.0 ** k for k in range(-3, 6))


class RidgeReadout:
  """Ridge least squares on standardised features, penalty chosen by leave-one-out error.

  Attributes:
    ridge: the chosen penalty.
    mean, scale: (P,) training feature mean and SD (1 where constant).
    weights: (P,) coefficients of the standardised features; intercept ``offset``.
  """

  def __init__(self, features: np.ndarray, target: np.ndarray,
               ridges: Sequence[float] = RIDGES):
    """Fits on (n, P) ``features`` and (n,) ``target``."""
    self.mean = features.mean(axis=0)
    sd = features.std(axis=0)
    self.scale = np.where(sd > 0, sd, 1.0)
    x = (features - self.mean) / self.scale
    self.offset = float(target.mean())
    y = target - self.offset
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    best = None
    for ridge in ridges:
      shrink = s ** 2 / (s ** 2 + ridge)
      fitted = u @ (shrink * uty)
      leverage = (u ** 2) @ shrink + 1.0 / len(y)  # + the intercept's
      loo = np.mean(((y - fitted) / (1.0 - leverage)) ** 2)
      if best is None or loo < best[0]:
        best = (loo, ridge, vt.T @ (s / (s ** 2 + ridge) * uty))
    _, self.ridge, self.weights = best

  def predict(self, features: np.ndarray) -> np.ndarray:
    """(n,) predictions of (n, P) features."""
    return (features - self.mean) / self.scale @ self.weights + self.offset

  def dense(self) -> tuple[np.ndarray, float]:
    """The same map on the raw features: ``(w (P,) float32, b)``, prediction ``x . w + b``."""
    weights = self.weights / self.scale
    return weights.astype(np.float32), float(self.offset - self.mean @ weights)


def features_of(outputs: dict) -> np.ndarray:
  """The features a readout is fitted on: the `CountReadout`'s ``counts`` where the model has
  one (``model.readout="counts"``), else the volume head's ``pooled`` Dense input; (n, K)."""
  return np.asarray(outputs["counts"] if "counts" in outputs else outputs["pooled"], np.float64)


def fitted_readout(readout: dict, weights: np.ndarray, bias: float) -> dict:
  """The ``readout`` collection with the fit set to ``weights`` (K,) and ``bias``.

  ``readout`` is a train state's ``readout`` collection: the fit goes to
  ``count_readout`` (`models.architectures.CountReadout`) where it exists, else to
  ``volume_head/dense`` (`models.architectures.RefittableDense`); nothing else changes.
  """
  fit = {"kernel": np.asarray(weights, np.float32), "bias": np.float32(bias),
         "fitted": np.float32(1.0)}
  if "count_readout" in readout:
    return {**readout, "count_readout": fit}
  return {**readout, "volume_head": {**readout["volume_head"], "dense": fit}}


def unfitted(readout: dict) -> dict:
  """The ``readout`` collection with every fit switched off: inference uses the trained Dense."""
  result = dict(readout)
  if "count_readout" in result:
    result["count_readout"] = {**result["count_readout"], "fitted": np.float32(0.0)}
  head = dict(result["volume_head"])
  head["dense"] = {**head["dense"], "fitted": np.float32(0.0)}
  return {**result, "volume_head": head}
