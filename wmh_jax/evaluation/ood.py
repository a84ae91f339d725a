"""An out-of-distribution score per scan: the Mahalanobis distance of its volume-head features.

The volume head of the weak and joint networks reads the volume from the
pooled features g (C,) (`models.architectures.VolumeHead` / `CountHead`, output
``pooled``). At every epoch end, training fits their distribution on the
unaugmented training scans (`train.refit_volume_head`): the mean m and a
Ledoit-Wolf shrunk covariance Σ (C features from a few hundred scans: the
sample covariance alone is near singular). A scan's score is
``(g - m)ᵀ Σ⁻¹ (g - m) / C``, averaging about 1 over the training scans; the flag
threshold is the 99th percentile of the training scans' own scores. A scan
from another scanner moves the features the volume is read from, the shift
that matters for its volume.

The running statistics the GP head already keeps (a per-channel diagonal,
EMA over the training batches) were tried first: on the built-in cohort they
did not separate any external domain from the local test set (AUROC
0.41–0.54), while the fitted full covariance reached 0.77–0.96
(BUILD_NOTES, issue 21).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

FLAG_PERCENTILE = 99.0


def ledoit_wolf(features: np.ndarray) -> tuple[np.ndarray, float]:
  """The Ledoit-Wolf (2004) shrunk covariance of ``features`` (n, C) and its shrinkage.

  ``(1 - a) S + a (tr(S) / C) I`` with S the maximum-likelihood covariance and
  the analytic, data-driven shrinkage a in [0, 1] (the estimator of
  scikit-learn's ``ledoit_wolf``).
  """
  x = np.asarray(features, np.float64)
  x = x - x.mean(axis=0)
  n, c = x.shape
  covariance = x.T @ x / n
  mu = np.trace(covariance) / c
  x2 = x ** 2
  beta = ((x2.T @ x2).sum() / n - (covariance ** 2).sum()) / (n * c)
  delta = ((covariance ** 2).sum() - 2 * mu * np.trace(covariance) + c * mu ** 2) / c
  beta = min(beta, delta)
  shrinkage = 0.0 if beta <= 0 else float(beta / delta)
  return (1 - shrinkage) * covariance + shrinkage * mu * np.eye(c), shrinkage


@dataclasses.dataclass(frozen=True)
class Reference:
  """The training distribution of one network's volume-head features.

  Attributes:
    mean: (C,) feature mean of the training scans.
    precision: (C, C) inverse of their shrunk covariance.
    threshold: the flag threshold, :data:`FLAG_PERCENTILE` of their own scores.
    shrinkage: the Ledoit-Wolf shrinkage used.
  """
  mean: np.ndarray
  precision: np.ndarray
  threshold: float
  shrinkage: float

  @classmethod
  def fit(cls, train_features: np.ndarray, percentile: float = FLAG_PERCENTILE) -> "Reference":
    """Fits the reference on the training scans' pooled features (n, C)."""
    train_features = np.asarray(train_features, np.float64)
    covariance, shrinkage = ledoit_wolf(train_features)
    unflagged = cls(train_features.mean(axis=0), np.linalg.pinv(covariance, hermitian=True),
                    np.inf, shrinkage)
    threshold = float(np.percentile(unflagged.scores(train_features), percentile))
    return dataclasses.replace(unflagged, threshold=threshold)

  def scores(self, features: np.ndarray) -> np.ndarray:
    """(n, C) pooled features -> (n,) squared Mahalanobis distances / C."""
    d = np.asarray(features, np.float64) - self.mean
    return np.einsum("ij,jk,ik->i", d, self.precision, d) / self.mean.size

  def to_json(self) -> dict:
    return {"mean": self.mean.tolist(), "precision": self.precision.tolist(),
            "threshold": self.threshold, "shrinkage": self.shrinkage}

  @classmethod
  def from_json(cls, stored: dict) -> "Reference":
    return cls(np.asarray(stored["mean"], np.float64), np.asarray(stored["precision"], np.float64),
               float(stored["threshold"]), float(stored["shrinkage"]))


def ensemble_threshold(references: Sequence[Reference]) -> float:
  """The flag threshold of an ensemble, whose score is the mean of its runs' scores: the mean
  of their thresholds (used alike by predict and the study report)."""
  return float(np.mean([r.threshold for r in references]))


def auroc(inside: Sequence[float], outside: Sequence[float]) -> float:
  """Area under the ROC curve of the score separating ``outside`` from ``inside`` scans.

  The Mann-Whitney estimate: the probability that a random outside scan scores
  above a random inside one, ties counting half. 0.5 = no separation.
  """
  inside, outside = (np.asarray(a, np.float64) for a in (inside, outside))
  if inside.size == 0 or outside.size == 0:
    return float("nan")
  greater = (outside[:, None] > inside[None, :]).sum()
  ties = (outside[:, None] == inside[None, :]).sum()
  return float((greater + 0.5 * ties) / (inside.size * outside.size))
