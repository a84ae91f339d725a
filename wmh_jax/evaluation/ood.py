"""An out-of-distribution score per scan, from the volume head's standardised features.

The GP head (``model.pooled_norm="running"``) and the count head standardise
their pooled features g (C,) with running statistics of the training batches
(`models.RunningStandardize`: g = (x - mean) / std per channel). The score is
``mean(g ** 2)``: the squared Mahalanobis distance of the scan's features
from the training distribution under a diagonal covariance, divided by C, so
a typical training scan scores about 1 whatever the width. A scan from
another scanner moves the features the volume is read from, which is the
shift that matters for its volume. The flag threshold is the 99th percentile
of the training scans' scores under the same checkpoint (stored by training
with the validation predictions). Models without standardised features (the
paper recipe's head, strong, severity) have no score.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

FLAG_PERCENTILE = 99.0


def available(model_config: ml_collections.ConfigDict) -> bool:
  """Whether the model's ``pooled`` output is standardised (so the score means something)."""
  if model_config.kind not in ("weak", "joint"):
    return False
  return (model_config.get("volume_head", "gap") == "count"
          or model_config.pooled_norm == "running")


def scores(pooled: np.ndarray) -> np.ndarray:
  """(n, C) standardised pooled features -> (n,) scores ``mean(g ** 2)``."""
  pooled = np.asarray(pooled, np.float64)
  return np.mean(np.square(pooled), axis=1)


def threshold(train_scores: Sequence[float], percentile: float = FLAG_PERCENTILE) -> float:
  """The flag threshold: the ``percentile`` of the training scans' scores."""
  return float(np.percentile(np.asarray(train_scores, np.float64), percentile))


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
