"""Host-side timings: training augmentation and inference (``wmh_jax.inference.predict``).

Augmentation is timed single-threaded (numpy and scipy resampling run on one
core), so pairs per second are per core. Inference runs the predict CLI's own
code path (``wmh_jax.inference.predict.predict``) on synthetic native-resolution NIfTI
scans with untrained parameters from ``wmh_jax.training.train.make_init``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
from scipy import ndimage

from bench import report
from wmh_jax.data import augment, records
from wmh_jax.inference import forward, predict, restore
from wmh_jax.models import kinds
from wmh_jax.runtime import sharding
from wmh_jax.training import train

AUGMENT_SHAPE = (112, 128, 32)
AUGMENT_SPACING_MM = (1.4, 1.4, 4.2)
# A clinical FLAIR grid for the inference scans: 240x240x48 voxels of
# 0.96x0.96x3 mm (230x230x144 mm field of view).
NATIVE_SHAPE = (240, 240, 48)
NATIVE_SPACING_MM = (0.96, 0.96, 3.0)


def phantom(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float],
            seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A synthetic FLAIR-like scan and its lesion mask.

  An ellipsoidal "brain" filling ~80% of the field of view (intensity ~0.5,
  noisy, zero outside) with five bright ellipsoidal lesions of 3-8 mm radius.

  Returns:
    (image float32 ``shape`` >= 0, mask float32 ``shape`` in {0, 1}).
  """
  rng = np.random.default_rng(seed)
  spacing = np.asarray(spacing_mm)
  mm = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                            indexing="ij"), axis=-1)
  centre = (np.asarray(shape) - 1) * spacing / 2
  radii = 0.4 * np.asarray(shape) * spacing
  brain = (((mm - centre) / radii) ** 2).sum(-1) < 1.0
  mask = np.zeros(shape, bool)
  for _ in range(5):
    lesion_centre = centre + rng.uniform(-0.5, 0.5, 3) * radii
    lesion_radius = rng.uniform(3.0, 8.0)
    mask |= (((mm - lesion_centre) / lesion_radius) ** 2).sum(-1) < 1.0
  mask &= brain
  image = np.where(brain, 0.5 + 0.05 * rng.standard_normal(shape), 0.0)
  image = np.where(mask, 1.0, image)
  return np.clip(image, 0.0, None).astype(np.float32), mask.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentResult:
  """Throughput of one augmentation method.

  Attributes:
    method: what was timed.
    pairs_per_s: median image+mask pairs per second (one core), or None if skipped.
    note: how it was done, or why it was skipped.
  """
  method: str
  pairs_per_s: float | None
  note: str


def _pairs_per_s(augment_pair: Callable[[], object], pairs: int, repeats: int) -> float:
  """Median over ``repeats`` of ``pairs`` calls per second, after one warm-up call."""
  _, times = report.measure(lambda: [augment_pair() for _ in range(pairs)], repeats)
  return pairs / statistics.median(times)


def _sequential_scipy(image: np.ndarray, mask: np.ndarray, matrices: list[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Applies the pull ``matrices`` one after another to both arrays (order 1)."""
  def resample(array: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return ndimage.affine_transform(array, matrix[:3, :3], matrix[:3, 3], order=1,
                                    prefilter=False, mode="constant", cval=0.0)

  for matrix in matrices:
    image, mask = resample(image, matrix), resample(mask, matrix)
  return image, mask > 0.5


def _torchio_pair(image: np.ndarray, mask: np.ndarray,
                  config_augment: ml_collections.ConfigDict) -> Callable[[], object]:
  """One TorchIO RandomAffine (+ RandomFlip) draw of an image+mask subject."""
  import torch  # pylint: disable=import-outside-toplevel
  import torchio  # pylint: disable=import-outside-toplevel
  affine = np.diag([*AUGMENT_SPACING_MM, 1.0])
  subject = torchio.Subject(
      image=torchio.ScalarImage(tensor=torch.from_numpy(image[None]), affine=affine),
      mask=torchio.LabelMap(tensor=torch.from_numpy(mask[None]), affine=affine))
  translation_mm = [config_augment.translate_fraction * n * s
                    for n, s in zip(AUGMENT_SHAPE, AUGMENT_SPACING_MM)]
  rotate = config_augment.rotate_deg
  transform = torchio.Compose([
      torchio.RandomAffine(scales=0, degrees=(0, 0, 0, 0, -rotate, rotate),
                           translation=translation_mm, image_interpolation="linear",
                           label_interpolation="nearest"),
      torchio.RandomFlip(axes=tuple(config_augment.flip_axes), flip_probability=0.5)])
  return lambda: transform(subject)


def _monai_pair(image: np.ndarray, mask: np.ndarray,
                config_augment: ml_collections.ConfigDict) -> Callable[[], object]:
  """One MONAI RandAffined (+ RandFlipd) draw of an image+mask dict."""
  from monai import transforms  # pylint: disable=import-outside-toplevel
  keys = ("image", "mask")
  transform = transforms.Compose([
      transforms.RandAffined(
          keys=keys, prob=1.0, rotate_range=(0.0, 0.0, np.deg2rad(config_augment.rotate_deg)),
          translate_range=[config_augment.translate_fraction * n for n in AUGMENT_SHAPE],
          mode=("bilinear", "nearest"), padding_mode="zeros"),
      transforms.RandFlipd(keys=keys, prob=0.5, spatial_axis=tuple(config_augment.flip_axes))])
  data = {"image": image[None], "mask": mask[None]}
  return lambda: transform(data)


def time_augmentation(config_augment: ml_collections.ConfigDict, repeats: int,
                      pairs: int) -> list[AugmentResult]:
  """Image+mask pairs per second per core at 112x128x32, for each method.

  Args:
    config_augment: ``config.augment`` (translation, rotation, flips).
    repeats: timed rounds (median reported) after one warm-up round.
    pairs: pairs per round for the fused path (the slower methods do fewer,
      at least one).
  """
  image, mask = phantom(AUGMENT_SHAPE, AUGMENT_SPACING_MM, seed=0)
  rng = np.random.default_rng(0)

  def fused() -> object:
    matrix = augment.sample_affine(rng, AUGMENT_SHAPE, AUGMENT_SPACING_MM, config_augment)
    return augment.apply_affine(image, mask, matrix)

  def sequential() -> object:
    angle = rng.uniform(-config_augment.rotate_deg, config_augment.rotate_deg)
    shift = (rng.uniform(-1.0, 1.0, 3) * config_augment.translate_fraction
             * np.asarray(AUGMENT_SHAPE))
    flips = [rng.random() < 0.5 and axis in tuple(config_augment.flip_axes)
             for axis in range(3)]
    none = (False, False, False)
    forward = [augment.forward_affine(AUGMENT_SHAPE, AUGMENT_SPACING_MM, angle, none, (0, 0, 0)),
               augment.forward_affine(AUGMENT_SHAPE, AUGMENT_SPACING_MM, 0.0, flips, (0, 0, 0)),
               augment.forward_affine(AUGMENT_SHAPE, AUGMENT_SPACING_MM, 0.0, none, shift)]
    return _sequential_scipy(image, mask, [np.linalg.inv(m) for m in forward])

  slow_pairs = max(1, pairs // 4)
  results = [
      AugmentResult("fused `augment.apply_affine` (one resample, shared coordinates)",
                    _pairs_per_s(fused, pairs, repeats),
                    "sample_affine + apply_affine; mask kept volume-preserving (top-k)"),
      AugmentResult("three sequential scipy resamples (rotate, flip, translate)",
                    _pairs_per_s(sequential, slow_pairs, repeats),
                    "3x `scipy.ndimage.affine_transform` per array, order 1, mask > 0.5")]
  for module, method, make in (("torchio", "TorchIO `RandomAffine` + `RandomFlip`",
                                _torchio_pair),
                               ("monai", "MONAI `RandAffined` + `RandFlipd`", _monai_pair)):
    if importlib.util.find_spec(module) is None:
      results.append(AugmentResult(method, None, f"skipped: `{module}` is not installed"))
      continue
    import torch  # pylint: disable=import-outside-toplevel
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
      rate = _pairs_per_s(make(image, mask, config_augment), slow_pairs, repeats)
      results.append(AugmentResult(method, rate, "1 torch thread"))
    finally:
      torch.set_num_threads(threads)
  return results


@dataclasses.dataclass(frozen=True)
class InferenceResult:
  """Median seconds per scan by stage of ``wmh_jax.inference.predict.predict``.

  Attributes:
    kind: model kind.
    shape: model grid (x, y, z).
    scans: scans timed (the first, which compiles, excluded).
    preprocess_s, model_s, write_s: medians per stage, seconds.
  """
  kind: str
  shape: tuple[int, int, int]
  scans: int
  preprocess_s: float
  model_s: float
  write_s: float

  @property
  def total_s(self) -> float:
    """Sum of the stage medians, seconds per scan."""
    return self.preprocess_s + self.model_s + self.write_s


def write_native_scans(folder: Path, count: int) -> None:
  """Writes ``count`` synthetic FLAIR NIfTI scans on `NATIVE_SHAPE` into ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  affine = np.diag([*NATIVE_SPACING_MM, 1.0])
  for index in range(count):
    image, _ = phantom(NATIVE_SHAPE, NATIVE_SPACING_MM, seed=index)
    nib.save(nib.Nifti1Image(image, affine), folder / f"scan{index:02d}.nii.gz")


def time_inference(config: ml_collections.ConfigDict, scans_dir: Path,
                   repeats: int) -> InferenceResult:
  """Runs ``predict.predict`` on the first ``repeats + 1`` scans of ``scans_dir``.

  The model has untrained parameters (``train.make_init``), wrapped as a
  ``restore.Network`` exactly as ``restore.load_networks`` builds one.
  """
  mesh = sharding.make_mesh()
  model = kinds.build_model(config.model)
  shape = tuple(int(s) for s in config.data.shape)
  state = train.make_init(model, train.make_optimizer(config.train, total_steps=1), mesh,
                          shape)(config.seed)
  kind = config.model.kind
  loaded = restore.Network(
      name=kind, group=kind, kind=kind, spec=records.preprocess_spec(config),
      volume_scale_ml=float(config.data.volume_scale_ml), voxel_ml=records.voxel_ml(config),
      source=f"untrained {kind}", variables=sharding.replicate(train.model_variables(state), mesh),
      forward=forward.make_forward(model, mesh))
  inputs = predict.collect_inputs([str(scans_dir)])[:repeats + 1]
  with tempfile.TemporaryDirectory(prefix="wmh_bench_predict_") as out:
    summary = predict.predict(inputs, [loaded], Path(out), mesh)
  if summary.failed or len(summary.timings) < 2:
    raise RuntimeError(f"predict processed {summary.processed} scans, {summary.failed} failed")
  timed = summary.timings[1:]
  return InferenceResult(
      kind=kind, shape=shape, scans=len(timed),
      preprocess_s=statistics.median(t["preprocess"] for t in timed),
      model_s=statistics.median(t["model"] for t in timed),
      write_s=statistics.median(t["write"] for t in timed))
