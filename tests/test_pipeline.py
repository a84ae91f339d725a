"""Tests of the Grain input pipeline (wmh_jax/data/pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from etils import epath

from tolerances import device_resample_atol, float32_rtol
from wmh_jax import configs
from wmh_jax.data import cache, nifti, pipeline

SPEC = nifti.PreprocessSpec(shape=(16, 16, 8), spacing_mm=(1.5, 1.5, 3.0))
NATIVE_SHAPE = (20, 20, 20)  # 1.2 mm voxels
NUM_RECORDS = 8
SEED = 7


def _write_scan(directory: Path, index: int, rng: np.random.Generator) -> tuple[str, str]:
  """An off-centre ellipsoid brain with a gradient and one lesion; (image, mask) paths."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in NATIVE_SHAPE], indexing="ij"), -1)
  centre = (np.array(NATIVE_SHAPE) - 1) / 2 + rng.uniform(-1, 1, 3)
  brain = (((grid - centre) / np.array([9.0, 8.0, 8.0])) ** 2).sum(-1) < 1.0
  lesion = ((grid - centre - rng.uniform(-3, 3, 3)) ** 2).sum(-1) < rng.uniform(1.5, 3) ** 2
  image = np.where(brain, 0.4 + 0.02 * grid[..., 1] + 0.01 * index, 0.0) + lesion * brain
  affine = np.diag([1.2, 1.2, 1.2, 1.0])
  paths = directory / f"s{index}.nii.gz", directory / f"s{index}_wmh.nii.gz"
  nib.save(nib.Nifti1Image(image.astype(np.float32), affine), paths[0])
  nib.save(nib.Nifti1Image((lesion & brain).astype(np.uint8), affine), paths[1])
  return str(paths[0]), str(paths[1])


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
  """8 cached records: even ones with a mask, odd ones weak-only (volume i mL)."""
  directory = tmp_path_factory.mktemp("scans")
  rng = np.random.default_rng(0)
  rows = []
  for i in range(NUM_RECORDS):
    image, mask = _write_scan(directory, i, rng)
    weak = i % 2 == 1
    rows.append({"subject_id": f"sub{i}", "scan_id": f"s{i}", "image": image,
                 "mask": "" if weak else mask, "severity": i % 5,
                 "wmh_volume_ml": float(i) if weak else None})
  recs, failures = cache.preprocessed_records(rows, SPEC, directory / "cache", workers=1)
  assert not failures
  return recs


def _config(worker_count: int = 0, enabled: bool = True) -> ml_collections.ConfigDict:
  config = configs.get_config()
  config.loader.worker_count = worker_count
  config.augment.enabled = enabled
  return config


def _take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_layout_and_volume_labels(records):
  batch = next(pipeline.make_train_iterator(records, _config(), SEED,
                                            batch_size_per_process=4))
  assert batch["image"].shape == batch["mask"].shape == (4, 16, 16, 8, 1)
  assert batch["image"].dtype == batch["mask"].dtype == np.float32
  assert batch["volume_ml"].dtype == batch["has_mask"].dtype == np.float32
  assert batch["severity"].dtype == np.int32
  voxel_ml = np.prod(SPEC.spacing_mm) / 1000
  by_volume = {r["wmh_volume_ml"]: r for r in records if not r["has_mask"]}
  for i in range(4):
    mask = batch["mask"][i]
    assert set(np.unique(mask)) <= {0.0, 1.0}
    if batch["has_mask"][i]:
      # An exact voxel count times the voxel volume, rounded to float32 (2 ops).
      assert batch["volume_ml"][i] == pytest.approx(mask.sum() * voxel_ml,
                                                    rel=float32_rtol(0, ops=2))
    else:
      assert not mask.any()
      assert by_volume[float(batch["volume_ml"][i])]["severity"] == batch["severity"][i]


def test_augmentation_comes_from_seed_record_and_epoch_and_epochs_reshuffle(records):
  """Each row equals its record augmented with (seed, record, epoch); epochs reorder."""
  iterator = pipeline.make_train_iterator(records, _config(), SEED, batch_size_per_process=4)
  batches = _take(iterator, 4)  # 2 epochs of 8 records
  source = pipeline.CachedScans(records)
  transform = pipeline.AugmentRecord(SEED, NUM_RECORDS, _config().augment)
  orders = []
  for epoch in range(2):
    rows = [(b, i) for b in batches[2 * epoch:2 * epoch + 2] for i in range(4)]
    order = []
    candidates = [transform.map_with_index(epoch * NUM_RECORDS, source[r])["image"]
                  for r in range(NUM_RECORDS)]
    for batch, i in rows:
      matches = [r for r in range(NUM_RECORDS)
                 if np.array_equal(candidates[r], batch["image"][i])]
      assert len(matches) == 1
      order.append(matches[0])
    assert sorted(order) == list(range(NUM_RECORDS))
    orders.append(order)
  assert orders[0] != orders[1]
  # The same record in two epochs gets a different draw.
  first = transform.map_with_index(0, source[0])["image"]
  assert not np.array_equal(first, transform.map_with_index(NUM_RECORDS, source[0])["image"])


def test_two_processes_concatenated_equal_one_process(records):
  config = _config()
  single = _take(pipeline.make_train_iterator(records, config, SEED,
                                              batch_size_per_process=4), 3)
  halves = [_take(pipeline.make_train_iterator(records, config, SEED, p, 2,
                                               batch_size_per_process=2), 3)
            for p in range(2)]
  joined = [{k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in single[0]}
            for i in range(3)]
  _assert_same(single, joined)


def test_worker_count_does_not_change_batches(records):
  in_process = _take(pipeline.make_train_iterator(records, _config(0), SEED,
                                                  batch_size_per_process=4), 3)
  iterator = pipeline.make_train_iterator(records, _config(2), SEED, batch_size_per_process=4)
  try:
    _assert_same(in_process, _take(iterator, 3))
  finally:
    iterator.close()


def test_default_worker_count_is_the_free_cores(monkeypatch):
  loader = configs.get_config().loader
  assert loader.worker_count == -1
  monkeypatch.setattr(pipeline, "available_cores", lambda: 16)
  assert pipeline.worker_count(loader) == 15
  monkeypatch.setattr(pipeline, "available_cores", lambda: 1)
  assert pipeline.worker_count(loader) == 1
  loader.worker_count = 0
  assert pipeline.worker_count(loader) == 0
  loader.worker_count = -2
  with pytest.raises(ValueError, match="worker_count=-2"):
    pipeline.worker_count(loader)


@pytest.mark.parametrize("worker_count", [0, 2])
def test_restored_state_continues_identically(records, worker_count):
  iterator = pipeline.make_train_iterator(records, _config(worker_count), SEED,
                                          batch_size_per_process=4)
  try:
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 2)
    iterator.set_state(state)
    _assert_same(expected, _take(iterator, 2))
  finally:
    iterator.close()


def test_orbax_handler_restores_into_a_fresh_iterator(records, tmp_path):
  """Grain's Orbax handler (``grain.checkpoint.CheckpointSave/Restore``) round trip."""
  handler = grain.checkpoint.CheckpointHandler()
  running = pipeline.make_train_iterator(records, _config(), SEED, batch_size_per_process=4)
  _take(running, 3)
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(running))
  fresh = pipeline.make_train_iterator(records, _config(), SEED, batch_size_per_process=4)
  restored = handler.restore(epath.Path(tmp_path),
                             args=grain.checkpoint.CheckpointRestore(fresh))
  _assert_same(_take(running, 2), _take(restored, 2))


def test_weak_only_records_keep_their_brain_in_view(records):
  iterator = pipeline.make_train_iterator(records, _config(), SEED, batch_size_per_process=4)
  by_volume = {r["wmh_volume_ml"]: r for r in records if not r["has_mask"]}
  ratios = []
  for batch in _take(iterator, 6):  # 3 epochs
    for i in np.flatnonzero(batch["has_mask"] == 0):
      original = pipeline.load_record(by_volume[float(batch["volume_ml"][i])])["image"]
      ratios.append(batch["image"][i].sum() / original.sum())
  assert len(ratios) == 12
  np.testing.assert_allclose(ratios, 1.0, atol=0.05)  # image mass kept: nothing left the view


def test_eval_batches_are_padded_and_unaugmented(records):
  batches = list(pipeline.eval_batches(records[:5], 3))
  assert len(batches) == 2
  assert batches[1]["scan_id"] == ["s3", "s4", "s4"]
  np.testing.assert_array_equal(batches[0]["valid"], [1, 1, 1])
  np.testing.assert_array_equal(batches[1]["valid"], [1, 1, 0])
  loaded = pipeline.load_record(records[4])
  np.testing.assert_array_equal(batches[1]["image"][2], loaded["image"])
  np.testing.assert_array_equal(batches[1]["mask"][1], loaded["mask"])
  expected_ml = [records[3]["wmh_volume_ml"]] + [records[4]["wmh_volume_ml"]] * 2
  np.testing.assert_array_equal(batches[1]["volume_ml"], np.float32(expected_ml))
  assert batches[0]["image"].shape == (3, 16, 16, 8, 1)
  assert batches[0]["severity"].dtype == np.int32


def test_on_device_augmentation_equals_the_host_path(records):
  """``augment.on_device``: the loader ships each draw's matrix with the untransformed scan;
  `device_augment.augment_batch` (jit) then gives the host path's batches, labels included."""
  import jax  # pylint: disable=import-outside-toplevel
  from wmh_jax.data import device_augment  # pylint: disable=import-outside-toplevel
  host = _take(pipeline.make_train_iterator(records, _config(), SEED,
                                            batch_size_per_process=4), 4)
  config = _config()
  config.augment.on_device = True
  shipped = _take(pipeline.make_train_iterator(records, config, SEED,
                                               batch_size_per_process=4), 4)
  voxel_ml = float(np.prod(SPEC.spacing_mm)) / 1000.0
  augment_batch = jax.jit(device_augment.augment_batch, static_argnums=1)
  for expected, raw in zip(host, shipped):
    assert raw["affine"].shape == (4, 4, 4) and raw["affine"].dtype == np.float32
    moved = jax.tree.map(np.asarray, augment_batch(raw, voxel_ml))
    assert moved.keys() == expected.keys()
    value_range = float(np.abs(raw["image"]).max())
    for row, matrix in enumerate(raw["affine"]):
      np.testing.assert_allclose(moved["image"][row], expected["image"][row], rtol=0,
                                 atol=device_resample_atol(matrix, SPEC.shape, value_range))
    assert np.count_nonzero(moved["mask"] != expected["mask"]) <= 2 * len(raw["affine"])
    # Equal voxel counts times the voxel volume: float32 against float64, 2 roundings.
    np.testing.assert_allclose(moved["volume_ml"], expected["volume_ml"],
                               rtol=float32_rtol(1, ops=2, sides=2))
    for key in ("severity", "has_mask"):
      np.testing.assert_array_equal(moved[key], expected[key])
