"""Two non-deep baselines: the floor a WMH network has to beat.

Both work on preprocessed records of one model grid
(:func:`wmh_jax.data.pipeline.load_record`: image ``(x, y, z, 1)`` in [0, 1]
after percentile normalisation, brain ``(x, y, z)``), are fitted on the
training split only and are deterministic (no random state).

- :class:`IntensityVolumeRegression`: least squares of the annotated WMH
  volume (mL) on global intensity features of the brain
  (:func:`intensity_features`), among them the brain volume (mL) above
  several intensity levels. It sees no lesion shape or position, only how
  much of the brain is how bright: the strongest simple floor we measured
  (BUILD_NOTES, "The floor"). Volumes above a level, not fractions: a lesion
  volume is a fraction times the brain volume, which a linear fit on
  fractions cannot form.
- :class:`ThresholdSegmentation`: brain voxels with intensity >= t are WMH,
  with t the candidate that maximises the mean Dice on the training scans
  with a mask. The 1/99 % percentile clip maps many lesion voxels to exactly
  1.0, so the candidates include 1.0 and the comparison is ``>=``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np

from wmh_jax.data import nifti, pipeline
from wmh_jax.evaluation import metrics

# Normalised intensities above which the brain volume (mL) is a feature.
INTENSITY_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
# Percentiles (%) of the brain intensities that are features.
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
FEATURES = ("brain_ml", "brain_mean", "brain_sd", *(f"p{p}" for p in PERCENTILES),
            *(f"ml_ge_{level}" for level in INTENSITY_LEVELS))
# Candidate thresholds of the intensity baseline: 0.50, 0.51, ..., 1.00.
THRESHOLDS = tuple(round(0.5 + 0.01 * i, 2) for i in range(51))


def intensity_features(image: np.ndarray, brain: np.ndarray,
                       spacing_mm: Sequence[float]) -> np.ndarray:
  """Global intensity features of one scan (:data:`FEATURES`).

  Args:
    image: ``(x, y, z)`` normalised intensities in [0, 1].
    brain: bool ``(x, y, z)``, non-empty.
    spacing_mm: voxel size (mm).

  Returns:
    float64 ``(F,)``: the brain volume (mL), the brain voxels' mean and SD,
    their :data:`PERCENTILES`, and the brain volume (mL) with intensity >=
    each of :data:`INTENSITY_LEVELS`.
  """
  values = np.asarray(image, np.float64)[brain]
  voxel_ml = float(np.prod(spacing_mm)) / 1000.0
  above_ml = [np.count_nonzero(values >= level) * voxel_ml for level in INTENSITY_LEVELS]
  return np.array([nifti.volume_ml(brain, spacing_mm), values.mean(), values.std(),
                   *np.percentile(values, PERCENTILES), *above_ml])


def record_features(record: dict) -> np.ndarray:
  """:func:`intensity_features` of one cached record, ``(F,)``."""
  scan = pipeline.load_record(record)
  return intensity_features(scan["image"][..., 0], scan["brain"], scan["spacing_mm"])


@dataclasses.dataclass
class IntensityVolumeRegression:
  """Least squares of WMH volume (mL) on :func:`intensity_features`, with intercept.

  Features are standardised with the training mean and SD (a constant
  feature is only centred), so that ``ridge`` penalises every coefficient on
  one scale; the intercept is never penalised.

  Attributes:
    ridge: L2 penalty on the standardised coefficients (0: ordinary least squares).
    mean: ``(F,)`` training feature means; None before fitting.
    scale: ``(F,)`` training feature SDs (1 where constant); None before fitting.
    coef: ``(F + 1,)`` intercept (mL), then mL per standardised feature;
      None before fitting or when no training scan has a volume.
    n_train: training scans used.
  """
  ridge: float = 0.0
  mean: np.ndarray | None = None
  scale: np.ndarray | None = None
  coef: np.ndarray | None = None
  n_train: int = 0

  def fit_features(self, features: np.ndarray, volume_ml: np.ndarray) -> Self:
    """Fits on ``(n, F)`` features and ``(n,)`` volumes (mL); rows with a NaN are left out."""
    features, volume_ml = np.asarray(features, np.float64), np.asarray(volume_ml, np.float64)
    ok = np.isfinite(features).all(axis=1) & np.isfinite(volume_ml)
    features, volume_ml = features[ok], volume_ml[ok]
    self.n_train = len(volume_ml)
    if not self.n_train:
      self.mean = self.scale = self.coef = None
      return self
    self.mean = features.mean(axis=0)
    sd = features.std(axis=0)
    self.scale = np.where(sd > 0, sd, 1.0)
    design = self._design(features)
    penalty = math.sqrt(self.ridge) * np.eye(design.shape[1])[1:]
    self.coef = np.linalg.lstsq(np.vstack([design, penalty]),
                                np.concatenate([volume_ml, np.zeros(len(penalty))]),
                                rcond=None)[0]
    return self

  def predict_features(self, features: np.ndarray) -> np.ndarray:
    """Predicted volumes (mL), ``(n,)``, of ``(n, F)`` features; NaN when not fitted."""
    features = np.asarray(features, np.float64)
    if self.coef is None:
      return np.full(len(features), math.nan)
    return self._design(features) @ self.coef

  def fit(self, records: Sequence[dict]) -> Self:
    """Fits on cached training records and their ``wmh_volume_ml``."""
    volumes = np.array([r["wmh_volume_ml"] for r in records], np.float64)
    return self.fit_features(self._features(records), volumes)

  def predict(self, records: Sequence[dict]) -> np.ndarray:
    """Predicted WMH volumes (mL) of cached records, ``(n,)``."""
    return self.predict_features(self._features(records))

  def describe(self) -> str:
    """One line on the fit, for the report."""
    if self.coef is None:
      return "not fitted: no training scan has a WMH volume"
    return (f"least squares (ridge {self.ridge:g}) on {len(FEATURES)} intensity features "
            f"(brain mL above {len(INTENSITY_LEVELS)} levels, moments, percentiles) of "
            f"{self.n_train} training scans")

  def _design(self, features: np.ndarray) -> np.ndarray:
    """``(n, F + 1)``: a column of ones, then the standardised features."""
    return np.hstack([np.ones((len(features), 1)), (features - self.mean) / self.scale])

  @staticmethod
  def _features(records: Sequence[dict]) -> np.ndarray:
    return np.array([record_features(r) for r in records], np.float64).reshape(
        -1, len(FEATURES))


def dice_per_threshold(image: np.ndarray, brain: np.ndarray, reference: np.ndarray,
                       thresholds: Sequence[float]) -> np.ndarray:
  """Dice of ``brain & (image >= t)`` against ``reference`` for every t.

  Equal to :func:`wmh_jax.evaluation.metrics.dice` of
  :func:`threshold_mask` (1.0 when both masks are empty), for all
  thresholds at once by counting on the sorted intensities.

  Args:
    image: ``(x, y, z)`` normalised intensities.
    brain: bool ``(x, y, z)``.
    reference: bool ``(x, y, z)`` WMH mask.
    thresholds: ``(T,)`` intensities.

  Returns:
    float64 ``(T,)``.
  """
  image = np.asarray(image, np.float64)
  t = np.asarray(thresholds, np.float64)

  def at_or_above(values: np.ndarray) -> np.ndarray:
    values = np.sort(values)
    return len(values) - np.searchsorted(values, t, side="left")

  predicted, hits = at_or_above(image[brain]), at_or_above(image[brain & reference])
  total = predicted + int(np.count_nonzero(reference))
  return np.where(total > 0, 2.0 * hits / np.maximum(total, 1), 1.0)


def threshold_mask(image: np.ndarray, brain: np.ndarray, threshold: float) -> np.ndarray:
  """bool ``(x, y, z)``: brain voxels with intensity >= ``threshold``."""
  return brain & (np.asarray(image, np.float64) >= threshold)


@dataclasses.dataclass(frozen=True)
class ThresholdPrediction:
  """The intensity baseline on one scan.

  Attributes:
    mask: bool ``(x, y, z)`` segmentation; None when the baseline is not fitted.
    volume_ml: the segmentation's volume (mL); NaN when not fitted.
    dice: Dice against the scan's WMH mask; NaN without a mask or when not fitted.
  """
  mask: np.ndarray | None
  volume_ml: float
  dice: float


@dataclasses.dataclass
class ThresholdSegmentation:
  """WMH = brain voxels with intensity >= one threshold, fitted for mean Dice.

  Attributes:
    candidates: thresholds tried, ascending; ties go to the lowest.
    threshold: the fitted threshold; None when no training scan has a mask.
    train_dice: mean training Dice at ``threshold`` (NaN when not fitted).
    n_train: training scans with a mask.
  """
  candidates: tuple[float, ...] = THRESHOLDS
  threshold: float | None = None
  train_dice: float = math.nan
  n_train: int = 0

  def fit(self, records: Sequence[dict]) -> Self:
    """Picks the candidate with the highest mean Dice over the records with a mask."""
    dices = [self._candidate_dice(pipeline.load_record(r)) for r in records if r["has_mask"]]
    self.n_train = len(dices)
    if not dices:
      self.threshold, self.train_dice = None, math.nan
      return self
    mean = np.mean(dices, axis=0)
    best = int(np.argmax(mean))
    self.threshold, self.train_dice = float(self.candidates[best]), float(mean[best])
    return self

  def predict(self, records: Sequence[dict]) -> Iterator[ThresholdPrediction]:
    """The segmentation, its volume and its Dice per cached record, in order."""
    for record in records:
      if self.threshold is None:
        yield ThresholdPrediction(None, math.nan, math.nan)
        continue
      scan = pipeline.load_record(record)
      mask = threshold_mask(scan["image"][..., 0], scan["brain"], self.threshold)
      dice = metrics.dice(scan["mask"][..., 0] > 0, mask) if scan["has_mask"] else math.nan
      yield ThresholdPrediction(mask, nifti.volume_ml(mask, scan["spacing_mm"]), dice)

  def describe(self) -> str:
    """One line on the fit, for the report."""
    if self.threshold is None:
      return "not fitted: no training scan has a mask"
    return (f"threshold {self.threshold:.2f}, mean Dice {self.train_dice:.3f} on "
            f"{self.n_train} training scans with a mask")

  def _candidate_dice(self, scan: dict[str, np.ndarray]) -> np.ndarray:
    """``(T,)`` Dice of every candidate on one loaded scan."""
    return dice_per_threshold(scan["image"][..., 0], scan["brain"], scan["mask"][..., 0] > 0,
                              self.candidates)
