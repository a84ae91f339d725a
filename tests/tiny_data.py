"""A tiny on-disk NIfTI dataset and a tiny config for training-level tests.

Images are 24x24x12 voxels at 1 mm: an ellipsoidal "brain" with a tissue
gradient and 0–3 bright spherical lesions, whose masks are the ground truth.
"""

from __future__ import annotations

import csv
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np

from wmh_jax import configs

SHAPE = (24, 24, 12)


def _scan(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
  centre = (np.array(SHAPE) - 1) / 2
  radii = np.array([10.0, 10.0, 5.0])
  brain = (((grid - centre) / radii) ** 2).sum(-1) < 1.0
  image = np.where(brain, 0.5 + 0.1 * rng.standard_normal(SHAPE), 0.0)
  mask = np.zeros(SHAPE, np.uint8)
  for _ in range(rng.integers(0, 4)):
    c = centre + rng.uniform(-4, 4, 3) * np.array([1, 1, 0.4])
    r = rng.uniform(1.0, 2.5)
    mask[(((grid - c) / np.array([1, 1, 1])) ** 2).sum(-1) < r * r] = 1
  mask &= brain
  image = np.where(mask > 0, 1.0 + 0.05 * rng.standard_normal(SHAPE), image)
  return np.clip(image, 0, None).astype(np.float32), mask


def make_tiny_dataset(directory: Path, n: int = 20, seed: int = 0) -> Path:
  """Writes ``n`` image/mask pairs and a manifest; returns the manifest path."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  affine = np.diag([1.0, 1.0, 1.0, 1.0])
  rows = []
  for i in range(n):
    image, mask = _scan(rng)
    nib.save(nib.Nifti1Image(image, affine), directory / f"s{i:02d}_flair.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), directory / f"s{i:02d}_wmh.nii.gz")
    rows.append({"subject_id": f"sub{i:02d}", "scan_id": f"s{i:02d}",
                 "image": f"s{i:02d}_flair.nii.gz", "mask": f"s{i:02d}_wmh.nii.gz",
                 "dataset": "tiny"})
  path = directory / "manifest.csv"
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def tiny_config(manifest: Path, cache_dir: Path, kind: str = "weak",
                flags: str = "") -> ml_collections.ConfigDict:
  """A config small enough for a test: 16x16x8 grid, 2 base filters, 1 epoch.

  ``flags`` are the config flags (e.g. "paper" for the paper recipe).
  """
  config = configs.get_config(flags)
  config.model.kind = kind
  config.model.base_filters = 2
  config.data.manifest = str(manifest)
  config.data.cache_dir = str(cache_dir)
  config.data.shape = (16, 16, 8)
  config.data.spacing_mm = (1.5, 1.5, 1.5)
  config.data.volume_scale_ml = 0.05
  config.loader.worker_count = 0
  config.train.num_epochs = 1
  config.train.log_every_steps = 1
  return config
