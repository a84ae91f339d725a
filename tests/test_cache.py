"""Tests of the preprocessed-array cache (wmh_jax/data/cache.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from wmh_jax.data import cache, nifti

SPEC = nifti.PreprocessSpec(shape=(16, 16, 8), spacing_mm=(1.5, 1.5, 3.0))
SHAPE = (20, 20, 10)  # native voxels, 1.2 mm


def _write_scan(directory: Path, name: str, lesion_radius: float) -> tuple[str, str]:
  """A bright-ellipsoid brain with one spherical lesion; returns (image, mask) paths."""
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
  centre = (np.array(SHAPE) - 1) / 2
  brain = (((grid - centre) / np.array([8.0, 8.0, 4.0])) ** 2).sum(-1) < 1.0
  lesion = ((grid - centre) ** 2).sum(-1) < lesion_radius ** 2
  image = np.where(brain, 0.5 + 0.01 * grid[..., 0], 0.0) + lesion
  affine = np.diag([1.2, 1.2, 1.2, 1.0])
  image_path, mask_path = directory / f"{name}.nii.gz", directory / f"{name}_wmh.nii.gz"
  nib.save(nib.Nifti1Image(image.astype(np.float32), affine), image_path)
  nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), mask_path)
  return str(image_path), str(mask_path)


@pytest.fixture
def rows(tmp_path: Path) -> list[dict]:
  """Three scans: with mask; weak-only with a volume and severity; corrupt."""
  image0, mask0 = _write_scan(tmp_path, "a", 2.0)
  image1, _ = _write_scan(tmp_path, "b", 3.0)
  broken = tmp_path / "broken.nii.gz"
  broken.write_bytes(b"not a nifti file")
  return [{"subject_id": "s0", "scan_id": "a", "image": image0, "mask": mask0,
           "dataset": "tiny", "split": "train", "site": "x"},
          {"subject_id": "s1", "scan_id": "b", "image": image1, "mask": "",
           "wmh_volume_ml": "1.25", "severity": "3"},
          {"subject_id": "s2", "scan_id": "c", "image": str(broken)}]


def test_records_contents_and_failures(rows, tmp_path, capsys):
  records, failures = cache.preprocessed_records(rows, SPEC, tmp_path / "cache", workers=1)
  assert [r["scan_id"] for r in records] == ["a", "b"]
  assert len(failures) == 1 and failures[0].startswith(rows[2]["image"] + ": ")
  reported = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
  assert reported == [f"skipped {failures[0]}"]
  first, second = records
  assert first["has_mask"] and not second["has_mask"]
  assert (first["severity"], second["severity"]) == (-1, 3)
  assert (first["dataset"], first["split"], first["site"]) == ("tiny", "train", "x")
  assert (second["dataset"], second["split"]) == ("", "")
  assert second["wmh_volume_ml"] == 1.25
  # No volume in the manifest: the mask file's own volume, 32 voxels of 1.2 mm.
  assert first["wmh_volume_ml"] == pytest.approx(32 * 1.2 ** 3 / 1000)

  expected = nifti.preprocess(nifti.load_image(rows[0]["image"]),
                              nifti.load_labels(rows[0]["mask"],
                                                nifti.load_image(rows[0]["image"])), SPEC)
  with np.load(first["path"]) as data:
    assert data["image"].dtype == np.float32 and data["image"].shape == SPEC.shape
    np.testing.assert_array_equal(data["image"], expected.image)
    assert data["mask"].dtype == np.uint8 and data["brain"].dtype == np.uint8
    np.testing.assert_array_equal(data["mask"], expected.mask)
    np.testing.assert_array_equal(data["brain"], expected.brain)
    np.testing.assert_array_equal(data["spacing_mm"], SPEC.spacing_mm)
    geometry = nifti.Geometry.from_dict(json.loads(str(data["geometry_json"])))
    assert geometry.native_shape == SHAPE
  with np.load(second["path"]) as data:
    assert "mask" not in data
  assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]


def test_second_call_reuses_the_cache(rows, tmp_path, monkeypatch):
  good = rows[:2]
  first, _ = cache.preprocessed_records(good, SPEC, tmp_path / "cache", workers=1)

  def fail(*args):
    raise AssertionError("preprocess ran again")

  monkeypatch.setattr(nifti, "preprocess", fail)
  again, failures = cache.preprocessed_records(good, SPEC, tmp_path / "cache", workers=1)
  assert again == first and failures == []


def test_key_follows_file_identity_and_spec(rows, tmp_path):
  row = rows[0]
  key = cache.cache_key(row, SPEC)
  assert cache.cache_key(dict(row), SPEC) == key
  assert cache.cache_key(row, nifti.PreprocessSpec(shape=(16, 16, 4))) != key
  assert cache.cache_key({**row, "mask": ""}, SPEC) != key
  stat = os.stat(row["mask"])
  os.utime(row["mask"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
  assert cache.cache_key(row, SPEC) != key


def test_process_pool_gives_the_same_entries(rows, tmp_path):
  serial, _ = cache.preprocessed_records(rows, SPEC, tmp_path / "serial", workers=1)
  pooled, failures = cache.preprocessed_records(rows, SPEC, tmp_path / "pool", workers=2)
  assert len(failures) == 1
  assert [Path(r["path"]).name for r in pooled] == [Path(r["path"]).name for r in serial]
  for a, b in zip(serial, pooled):
    with np.load(a["path"]) as x, np.load(b["path"]) as y:
      assert sorted(x.files) == sorted(y.files)
      for name in x.files:
        np.testing.assert_array_equal(x[name], y[name])
