"""From a config to preprocessed, split records: the one entry to the data layer.

Training, analysis and prediction all resolve their data here, so the built-in
cohort and a user's manifest take exactly the same path:
manifest → validated rows → split → preprocessed cache → records.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from wmh_jax.data import cache, cohort, manifest, nifti

SPLITS = ("train", "val", "test")


def default_cache_root() -> Path:
  """``$WMH_JAX_CACHE`` or ``~/.cache/wmh_jax``."""
  return Path(os.environ.get("WMH_JAX_CACHE", Path.home() / ".cache" / "wmh_jax"))


def preprocess_spec(config: ml_collections.ConfigDict) -> nifti.PreprocessSpec:
  """The model grid of a run: shape (voxels), spacing (mm), percentiles."""
  return nifti.PreprocessSpec(shape=tuple(int(s) for s in config.data.shape),
                              spacing_mm=tuple(float(s) for s in config.data.spacing_mm),
                              percentiles=tuple(float(p) for p in config.data.percentiles))


def voxel_ml(config: ml_collections.ConfigDict) -> float:
  """Volume of one model-grid voxel in mL."""
  x, y, z = preprocess_spec(config).spacing_mm
  return x * y * z / 1000.0


def cohort_manifests(config: ml_collections.ConfigDict,
                     domains: list[str] | None = None) -> dict[str, Path]:
  """Generates (or reuses) the built-in synthetic cohort; domain → manifest."""
  out = Path(config.data.cohort_dir or default_cache_root() / "cohort")
  return cohort.ensure_cohort(out, n_local=config.data.cohort_n_local,
                              seed=config.data.cohort_seed, domains=domains)


def training_manifest(config: ml_collections.ConfigDict) -> Path:
  """The configured manifest, or the built-in cohort's ``local`` domain."""
  if config.data.manifest:
    return Path(config.data.manifest)
  return cohort_manifests(config, ["local"])["local"]


def load_records(manifest_path: str | Path, config: ml_collections.ConfigDict,
                 *, assign: bool = True) -> list[dict]:
  """Validated, preprocessed (cached) records of one manifest.

  Rows without a ``split`` get a seeded 60/20/20 split grouped by subject when
  ``assign`` is true. Scans that fail to load are reported (by the cache, one
  line each) and skipped.
  """
  rows = manifest.read_manifest(manifest_path)
  if assign:
    rows = manifest.assign_splits(rows, seed=config.data.split_seed)
  cache_dir = Path(config.data.cache_dir or default_cache_root() / "preprocessed")
  records, _ = cache.preprocessed_records(rows, preprocess_spec(config), cache_dir)
  return records


def split_records(records: list[dict]) -> dict[str, list[dict]]:
  """Groups records by their ``split`` field (train/val/test)."""
  return {name: [r for r in records if r.get("split") == name] for name in SPLITS}
