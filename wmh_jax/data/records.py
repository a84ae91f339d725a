"""From a config to preprocessed, split records: the one entry to the data layer.

Training, analysis and prediction all resolve their data here, so the built-in
cohort and a user's manifest take exactly the same path:
manifest → validated rows → split → preprocessed cache → records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from wmh_jax.data import cache, cohort, manifest, nifti
from wmh_jax.data.synthetic import sites
from wmh_jax.errors import WMHError
from wmh_jax.runtime import fileio

SPLITS = manifest.SPLITS
# The training domain's test split is the "local" test set; the others are external.
LOCAL = "local"
EXTERNAL_DOMAINS = tuple(name for name in sites.DOMAINS if name != LOCAL)


def preprocess_spec(config: ml_collections.ConfigDict) -> nifti.PreprocessSpec:
  """The model grid of a run: shape (voxels), spacing (mm), percentiles."""
  return nifti.PreprocessSpec(shape=tuple(int(s) for s in config.data.shape),
                              spacing_mm=tuple(float(s) for s in config.data.spacing_mm),
                              percentiles=tuple(float(p) for p in config.data.percentiles))


def voxel_ml(config: ml_collections.ConfigDict) -> float:
  """Volume of one model-grid voxel in mL."""
  x, y, z = preprocess_spec(config).spacing_mm
  return x * y * z / 1000.0


def voxel_target(config: ml_collections.ConfigDict) -> float:
  """One model-grid voxel in regression-target units: voxel_ml / volume_scale_ml."""
  return voxel_ml(config) / float(config.data.volume_scale_ml)


def cohort_manifests(config: ml_collections.ConfigDict,
                     domains: list[str] | None = None) -> dict[str, Path]:
  """Generates (or reuses) the built-in synthetic cohort; domain → manifest."""
  out = Path(config.data.cohort_dir or fileio.default_cache_root() / "cohort")
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
  cache_dir = Path(config.data.cache_dir or fileio.default_cache_root() / "preprocessed")
  records, _ = cache.preprocessed_records(rows, preprocess_spec(config), cache_dir)
  return records


def split_records(records: list[dict]) -> dict[str, list[dict]]:
  """Groups records by their ``split`` field (train/val/test)."""
  return {name: [r for r in records if r.get("split") == name] for name in SPLITS}


# ---------------------------------------------------------------------------
# Test sets of a trained run


def dataset_name(manifest_path: str | Path) -> str:
  """``data/wmhseg/manifest.csv`` → ``wmhseg``; ``lists/msseg.csv`` → ``msseg``."""
  path = Path(manifest_path)
  return path.parent.absolute().name if path.name == cohort.MANIFEST_NAME else path.stem


def external_manifests(config: ml_collections.ConfigDict,
                       keep: Callable[[str], bool] = lambda name: True) -> dict[str, Path]:
  """External test manifests of a run, name → path, in configured order.

  The ``config.data.external_manifests`` CSVs (named by :func:`dataset_name`);
  with the built-in cohort and none configured, its external domains
  (:data:`EXTERNAL_DOMAINS`). ``keep`` filters names before the built-in
  cohort generates any domain.

  Raises:
    WMHError: two external manifests with the same name, or one named ``local``.
  """
  if config.data.external_manifests:
    named: dict[str, Path] = {}
    for item in (p for p in config.data.external_manifests.split(",") if p.strip()):
      path = Path(item.strip())
      name = dataset_name(path)
      if name in named or name == LOCAL:
        raise WMHError(path, f"external dataset name {name!r} is taken; give the manifest "
                       "its own folder or file name")
      named[name] = path
    return {name: path for name, path in named.items() if keep(name)}
  if config.data.manifest:
    return {}
  names = [name for name in EXTERNAL_DOMAINS if keep(name)]
  return cohort_manifests(config, names) if names else {}


def evaluation_sets(config: ml_collections.ConfigDict,
                    datasets: Sequence[str] | None = None) -> dict[str, list[dict]]:
  """Preprocessed (cached) test records of a run, dataset name → records.

  ``local``: the ``test`` split of the training manifest; then every external
  manifest (:func:`external_manifests`), all of whose rows are test scans.

  Args:
    config: the run's config (its grid, manifests, cache and split seed).
    datasets: names to keep (None: all).
  """
  keep = (lambda name: True) if datasets is None else (lambda name: name in datasets)
  sets = {}
  if keep(LOCAL):
    sets[LOCAL] = split_records(load_records(training_manifest(config), config))["test"]
  for name, path in external_manifests(config, keep).items():
    sets[name] = load_records(path, config, assign=False)
  return sets
