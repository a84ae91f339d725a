"""Split-conformal intervals for per-scan WMH volumes.

Calibration (Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle
introduction to conformal prediction", §1): on n held-out scans with
annotated volumes y_i and predictions p_i, compute a non-conformity score
s_i = s(y_i, p_i) and its ``ceil((n + 1) level) / n`` empirical quantile q.
For a new scan exchangeable with the calibration scans, the interval
``{y : s(y, p) <= q}`` holds its true volume with probability at least
``level``. That guarantee is marginal and assumes exchangeability: on a
scanner the calibration scans did not come from, coverage can fall, which the
study report measures.

Scores (:data:`SCORES`), with p clipped at 0:
  * ``log``: ``|log1p(y) - log1p(p)|`` — errors grow with the volume, so the
    interval is relative: ``[expm1(log1p(p) - q), expm1(log1p(p) + q)]``
    (never negative). The default.
  * ``absolute``: ``|y - p|`` — ``[max(p - q, 0), p + q]``, one width for
    every scan.
The few lines are written here rather than taken from MAPIE, crepes or
puncc: each brings scikit-learn-style estimator wrappers around what is a
quantile of n numbers (BUILD_NOTES, issue 21).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SCORES = ("log", "absolute")
DEFAULT_SCORE = "log"
DEFAULT_LEVEL = 0.9


@dataclasses.dataclass(frozen=True)
class Calibration:
  """A split-conformal calibration.

  Attributes:
    score: one of :data:`SCORES`.
    level: nominal coverage in (0, 1).
    quantile: q, the calibrated score threshold (inf when n is too small for
      ``level``: the interval is then unbounded above).
    n: calibration scans.
  """
  score: str
  level: float
  quantile: float
  n: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _scores(score: str, annotated: np.ndarray, predicted: np.ndarray) -> np.ndarray:
  predicted = np.maximum(predicted, 0.0)
  if score == "log":
    return np.abs(np.log1p(np.maximum(annotated, 0.0)) - np.log1p(predicted))
  if score == "absolute":
    return np.abs(annotated - predicted)
  raise ValueError(f"unknown conformal score {score!r}; expected one of {SCORES}")


def calibrate(annotated: Sequence[float], predicted: Sequence[float],
              level: float = DEFAULT_LEVEL, score: str = DEFAULT_SCORE) -> Calibration:
  """The split-conformal threshold of ``score`` at ``level`` from calibration scans (mL).

  Raises:
    ValueError: an unknown score, a level outside (0, 1), mismatched or empty
      inputs, or non-finite values.
  """
  annotated, predicted = (np.asarray(a, np.float64) for a in (annotated, predicted))
  if not 0.0 < level < 1.0:
    raise ValueError(f"conformal level must be in (0, 1), got {level}")
  if annotated.shape != predicted.shape or annotated.ndim != 1 or annotated.size == 0:
    raise ValueError(f"need equal-length, non-empty 1-D volumes, got {annotated.shape} "
                     f"and {predicted.shape}")
  if not (np.isfinite(annotated).all() and np.isfinite(predicted).all()):
    raise ValueError("conformal calibration needs finite volumes")
  scores = np.sort(_scores(score, annotated, predicted))
  n = scores.size
  rank = math.ceil((n + 1) * level)  # 1-based rank of the finite-sample quantile
  quantile = float(scores[rank - 1]) if rank <= n else math.inf
  return Calibration(score=score, level=float(level), quantile=quantile, n=int(n))


def ensemble_calibration(stored: Sequence[dict | None], level: float = DEFAULT_LEVEL,
                         score: str = DEFAULT_SCORE) -> Calibration | None:
  """The calibration of an ensemble's mean volume from its runs' validation predictions.

  Args:
    stored: per run, ``{"scan_id", "annotated_ml", "predicted_ml"}`` lists
      (`train.write_val_predictions`), or None for a run without them.
    level, score: see :func:`calibrate`.

  Returns:
    :func:`calibrate` of the annotated volumes against the runs' mean
    prediction over the scans every run has; None when a run has no
    predictions or the runs share no scan.
  """
  if not stored or any(s is None for s in stored):
    return None
  by_run = [dict(zip(s["scan_id"], s["predicted_ml"])) for s in stored]
  annotated = dict(zip(stored[0]["scan_id"], stored[0]["annotated_ml"]))
  ids = [i for i in stored[0]["scan_id"] if all(i in run for run in by_run)]
  if not ids:
    return None
  predicted = np.mean([[run[i] for i in ids] for run in by_run], axis=0)
  return calibrate([annotated[i] for i in ids], predicted, level, score)


def interval(calibration: Calibration, predicted: Sequence[float] | float
             ) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) volume bounds in mL for predictions in mL, each clipped at 0."""
  p = np.maximum(np.asarray(predicted, np.float64), 0.0)
  q = calibration.quantile
  if calibration.score == "log":
    return np.expm1(np.maximum(np.log1p(p) - q, 0.0)), np.expm1(np.log1p(p) + q)
  if calibration.score == "absolute":
    return np.maximum(p - q, 0.0), p + q
  raise ValueError(f"unknown conformal score {calibration.score!r}; expected one of {SCORES}")


def coverage(calibration: Calibration, annotated: Sequence[float], predicted: Sequence[float]
             ) -> tuple[float, float]:
  """(share of annotated volumes inside their interval, mean interval width in mL)."""
  low, high = interval(calibration, predicted)
  annotated = np.asarray(annotated, np.float64)
  inside = (annotated >= low) & (annotated <= high)
  return float(inside.mean()), float(np.mean(high - low))
