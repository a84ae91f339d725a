"""Tests for wmh_jax.data.nifti: loading, validation, preprocessing and its inverse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tolerances import float64_rtol
from wmh_jax.data import nifti
from wmh_jax.errors import InputError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"

# A non-RAS file grid: native axis 0 runs inferior (3 mm), axis 1 posterior
# (1.1 mm), axis 2 left (0.9 mm); world origin at the grid centre.
NATIVE_SHAPE = (12, 33, 40)
_COLUMNS = np.array([[0.0, 0.0, -0.9], [0.0, -1.1, 0.0], [-3.0, 0.0, 0.0]])


def _native_affine() -> np.ndarray:
  affine = np.eye(4)
  affine[:3, :3] = _COLUMNS
  affine[:3, 3] = -_COLUMNS @ ((np.asarray(NATIVE_SHAPE) - 1) / 2)
  return affine


def _world(shape, affine) -> np.ndarray:
  """World coordinates (mm) of every voxel centre, (3, *shape)."""
  idx = np.indices(shape).reshape(3, -1)
  return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape((3,) + tuple(shape))


def _ellipsoid(world, centre, radii) -> np.ndarray:
  """bool mask of a world-space ellipsoid."""
  d = [(world[i] - centre[i]) / radii[i] for i in range(3)]
  return d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= 1.0


def _phantom(shape, affine):
  """(image, labels) defined in world space: brain with an x-gradient, a WMH
  lesion (label 1, bright) and a small other-pathology region (label 2)."""
  world = _world(shape, affine)
  brain = _ellipsoid(world, (0, 0, 0), (16, 16, 15))
  lesion = _ellipsoid(world, (5, -4, 3), (8, 7, 9))
  other = _ellipsoid(world, (-8, 6, -6), (4, 4, 6))
  image = np.where(brain, 100.0 + 10.0 * world[0] / 16, 0.0)
  image[lesion] = 200.0
  labels = lesion.astype(np.int16)
  labels[other] = 2
  return image.astype(np.float32), labels


def _dice(a, b) -> float:
  a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
  return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture
def phantom_files(write_nifti):
  image, labels = _phantom(NATIVE_SHAPE, _native_affine())
  return (write_nifti("flair.nii.gz", image, _native_affine()),
          write_nifti("wmh.nii.gz", labels, _native_affine()), image, labels)


SMALL_SPEC = nifti.PreprocessSpec(shape=(24, 24, 8), spacing_mm=(1.4, 1.4, 4.2))


# ---------------------------------------------------------------------------
# Loading


def test_load_matches_nibabel_closest_canonical():
  path = NIBABEL_DATA / "anatomical.nii"  # big-endian int16, LAS, 2 mm
  scan = nifti.load_image(path)
  canonical = nib.as_closest_canonical(nib.load(path))
  np.testing.assert_allclose(scan.data, canonical.get_fdata(), rtol=1e-6)
  np.testing.assert_allclose(scan.affine, canonical.affine)
  assert scan.data.dtype == np.float32
  assert scan.spacing_mm == (2.0, 2.0, 2.0)
  assert scan.native_shape == (33, 41, 25)
  assert scan.native_affine[0, 0] == -2.0
  out = nifti.preprocess(scan, None, nifti.PreprocessSpec((48, 64, 16)))  # covers the FOV
  back = nifti.to_native(out.brain, out.geometry, order=0)
  assert back.shape == scan.native_shape
  native_brain = np.asanyarray(nib.load(path).dataobj) != 0
  assert native_brain.mean() > 0.99 and _dice(back, native_brain) > 0.99


def test_load_reorients_non_ras_anisotropic(phantom_files):
  flair, _, native_image, _ = phantom_files
  scan = nifti.load_image(flair)
  assert scan.data.shape == (40, 33, 12)
  np.testing.assert_allclose(scan.spacing_mm, (0.9, 1.1, 3.0), rtol=1e-6)
  np.testing.assert_allclose(np.diag(scan.affine)[:3], (0.9, 1.1, 3.0), rtol=1e-6)
  assert scan.native_shape == NATIVE_SHAPE
  np.testing.assert_allclose(scan.native_affine, _native_affine(), atol=1e-5)
  # Every RAS voxel holds the value of the same world point.
  expected, _ = _phantom(scan.data.shape, scan.affine)
  np.testing.assert_allclose(scan.data, expected, atol=1e-3)
  # The same float32 values in another voxel order, summed in float64.
  assert scan.data.sum(dtype=np.float64) == pytest.approx(
      native_image.sum(dtype=np.float64), rel=float64_rtol(scan.data.size, sides=2))


def test_load_accepts_trailing_singleton_dim(write_nifti):
  data = np.arange(1, 16 * 16 * 8 + 1, dtype=np.float32).reshape(16, 16, 8, 1)
  scan = nifti.load_image(write_nifti("v.nii", data))
  assert scan.data.shape == (16, 16, 8)
  assert scan.native_shape == (16, 16, 8)
  np.testing.assert_array_equal(scan.data, data[..., 0])


def _raw_header(path: Path, shape, pixdim=None) -> Path:
  """A .nii whose header declares ``shape`` (and ``pixdim``) over 64 bytes of data."""
  header = nib.Nifti1Header()
  header.set_data_dtype(np.float32)
  header.set_data_shape(shape)
  if pixdim is not None:
    header["pixdim"][1:4] = pixdim
  header["vox_offset"] = 352
  path.write_bytes(header.binaryblock + b"\0" * 4 + np.ones(16, np.float32).tobytes())
  return path


def _good(tmp_path: Path, name: str = "good.nii.gz") -> Path:
  data = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32) + 0.1
  path = tmp_path / name
  nib.save(nib.Nifti1Image(data, np.eye(4)), path)
  return path


def _truncated(tmp_path: Path) -> Path:
  raw = _good(tmp_path).read_bytes()
  path = tmp_path / "truncated.nii.gz"
  path.write_bytes(raw[: len(raw) * 6 // 10])
  return path


def _truncated_nii(tmp_path: Path) -> Path:
  raw = _good(tmp_path, "good.nii").read_bytes()
  path = tmp_path / "truncated.nii"
  path.write_bytes(raw[: len(raw) // 2])
  return path


def _with_affine(tmp_path, name, affine, data=None) -> Path:
  data = np.ones((16, 16, 8), np.float32) if data is None else data
  path = tmp_path / name
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def _bytes(path: Path, content: bytes) -> Path:
  path.write_bytes(content)
  return path


def _directory(tmp_path: Path) -> Path:
  path = tmp_path / "dir.nii.gz"
  path.mkdir()
  return path


def _singular():
  a = np.eye(4)
  a[:3, 1] = a[:3, 0]
  return a


def _sheared():
  a = np.eye(4)
  a[0, 1] = 0.3
  return a


def _with_value(value):
  data = np.ones((16, 16, 8), np.float32)
  data[3, 4, 5] = value
  return data


BAD_INPUTS = {
    "missing": (lambda t: t / "missing.nii.gz", "not found"),
    "directory": (_directory, "directory"),
    "truncated": (_truncated, "truncated"),
    "truncated_nii": (_truncated_nii, "truncated"),
    "wrong_magic": (lambda t: _bytes(t / "magic.nii", b"not nifti" * 100), "corrupt"),
    "gzip_garbage": (lambda t: _bytes(t / "garbage.nii.gz", b"x" * 500), "corrupt"),
    "2d": (lambda t: _with_affine(t, "2d.nii", np.eye(4), np.ones((16, 16), np.float32)),
           "3D"),
    "4d": (lambda t: _with_affine(t, "4d.nii", np.eye(4), np.ones((16, 16, 8, 2), np.float32)),
           "3D"),
    "5d": (lambda t: _with_affine(t, "5d.nii", np.eye(4),
                                  np.ones((16, 16, 8, 1, 2), np.float32)), "3D"),
    "huge_dim": (lambda t: _raw_header(t / "huge.nii", (3000, 16, 8)), "absurd dimensions"),
    "huge_total": (lambda t: _raw_header(t / "huge2.nii", (2000, 2000, 200)),
                   "absurd dimensions"),
    "nan": (lambda t: _with_affine(t, "nan.nii", np.eye(4), _with_value(np.nan)), "NaN"),
    "inf": (lambda t: _with_affine(t, "inf.nii", np.eye(4), _with_value(np.inf)), "Inf"),
    "all_zero": (lambda t: _with_affine(t, "zero.nii", np.eye(4), np.zeros((16, 16, 8))),
                 "all zero"),
    "zero_spacing": (lambda t: _raw_header(t / "sp0.nii", (2, 2, 4), (0.0, 1.0, 1.0)),
                     "spacing"),
    "negative_spacing": (lambda t: _raw_header(t / "spneg.nii", (2, 2, 4), (-1.0, 1.0, 1.0)),
                         "spacing"),
    "tiny_spacing": (lambda t: _with_affine(t, "sptiny.nii", np.diag([0.01, 1, 1, 1])),
                     "spacing"),
    "huge_spacing": (lambda t: _with_affine(t, "sphuge.nii", np.diag([1, 30, 1, 1])),
                     "spacing"),
    "singular_affine": (lambda t: _with_affine(t, "singular.nii", _singular()), "singular"),
    "sheared_affine": (lambda t: _with_affine(t, "sheared.nii", _sheared()), "sheared"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_load_image_rejects_bad_input(kind, tmp_path):
  make, reason = BAD_INPUTS[kind]
  path = make(tmp_path)
  with pytest.raises(InputError) as err:
    nifti.load_image(path)
  message = str(err.value)
  assert path.name in message and reason in message
  assert "\n" not in message
  assert err.value.path == str(path)


def test_load_image_rejects_unreadable(tmp_path, monkeypatch):
  path = _good(tmp_path)  # root can read anything: simulate the permission check
  monkeypatch.setattr(nifti.os, "access", lambda p, mode: False)
  with pytest.raises(InputError, match=r"good\.nii\.gz: unreadable"):
    nifti.load_image(path)


def test_load_image_rejects_non_nifti():
  with pytest.raises(InputError, match="not a NIfTI"):
    nifti.load_image(NIBABEL_DATA / "test.mgz")


# ---------------------------------------------------------------------------
# Labels


def test_load_labels_reoriented_like_image(phantom_files):
  flair, wmh, _, native_labels = phantom_files
  scan = nifti.load_image(flair)
  labels = nifti.load_labels(wmh, scan)
  assert labels.dtype == np.int16 and labels.shape == scan.data.shape
  _, expected = _phantom(scan.data.shape, scan.affine)
  np.testing.assert_array_equal(labels, expected)
  assert np.count_nonzero(labels == 1) == np.count_nonzero(native_labels == 1)


@pytest.mark.parametrize("kind, reason", [
    ("shape", "shape"), ("affine", "affine"), ("three", "3.0"), ("half", "0.5"),
    ("negative", "-1.0")])
def test_load_labels_rejects(kind, reason, write_nifti):
  scan = nifti.load_image(write_nifti("img.nii", np.ones((16, 16, 8), np.float32)))
  labels = np.zeros((16, 16, 8), np.float32)
  affine = np.eye(4)
  if kind == "shape":
    labels = np.zeros((16, 16, 9), np.float32)
  elif kind == "affine":
    affine[0, 3] = 0.5
  else:
    labels[1, 2, 3] = {"three": 3.0, "half": 0.5, "negative": -1.0}[kind]
  path = write_nifti(f"lab_{kind}.nii", labels, affine)
  with pytest.raises(InputError) as err:
    nifti.load_labels(path, scan)
  assert path.name in str(err.value) and reason in str(err.value)


def test_wmh_mask_excludes_label_2():
  labels = np.array([[[0, 1, 2, 1, 2]]], np.int16)
  mask = nifti.wmh_mask(labels)
  assert mask.dtype == np.float32
  np.testing.assert_array_equal(mask, [[[0, 1, 0, 1, 0]]])


def test_volume_ml_exact():
  mask = np.zeros((4, 4, 4), np.float32)
  mask.flat[:10] = 1.0
  assert nifti.volume_ml(mask, (0.5, 2.0, 3.0)) == pytest.approx(0.03, abs=1e-12)
  assert nifti.volume_ml(mask > 0, (1.0, 1.0, 1.0)) == pytest.approx(0.01, abs=1e-12)


# ---------------------------------------------------------------------------
# Saving


def test_save_nifti_dtypes_and_atomic(tmp_path):
  affine = np.diag([-0.9, 1.1, 3.0, 1.0])
  affine[:3, 3] = (10, -5, 2)
  mask = np.zeros((5, 6, 7), bool)
  mask[1, 2, 3] = True
  nifti.save_nifti(tmp_path / "out" / "mask.nii.gz", mask, affine)
  nifti.save_nifti(tmp_path / "out" / "map.nii", mask * 0.25, affine)
  m = nib.load(tmp_path / "out" / "mask.nii.gz")
  f = nib.load(tmp_path / "out" / "map.nii")
  assert m.get_data_dtype() == np.uint8 and f.get_data_dtype() == np.float32
  np.testing.assert_array_equal(np.asanyarray(m.dataobj), mask)
  assert f.get_fdata()[1, 2, 3] == 0.25
  np.testing.assert_allclose(m.affine, affine, atol=1e-6)
  assert int(m.header["sform_code"]) == 1
  assert sorted(os.listdir(tmp_path / "out")) == ["map.nii", "mask.nii.gz"]


# ---------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("native_mm, target_mm", [
    ((0.5, 0.5, 2.5), (1.4, 1.4, 4.2)),   # paper's local data to the model grid
    ((1.0, 1.0, 1.0), (1.4, 1.4, 4.2)),
    ((0.9, 1.1, 3.0), (1.4, 1.4, 4.2)),
    ((2.0, 2.0, 6.0), (1.4, 1.4, 4.2)),   # upsampling
    ((1.0, 1.0, 1.0), (3.0, 3.0, 3.0)),   # coarse
])
def test_mask_resampling_preserves_volume(native_mm, target_mm):
  fov_mm = np.array([36.0, 36.0, 36.0])
  shape = tuple(int(s) for s in np.round(fov_mm / native_mm))
  affine = np.diag(native_mm + (1.0,))
  affine[:3, 3] = -np.asarray(native_mm) * (np.asarray(shape) - 1) / 2
  image, labels = _phantom(shape, affine)
  scan = nifti.Scan(data=image, affine=affine, spacing_mm=native_mm)
  spec = nifti.PreprocessSpec(shape=(40, 40, 40), spacing_mm=target_mm)
  out = nifti.preprocess(scan, labels, spec)
  for native, resampled in [(labels == 1, out.mask), (labels == 2, out.label2),
                            (image > 0, out.brain)]:
    before = nifti.volume_ml(native, native_mm)
    after = nifti.volume_ml(resampled, target_mm)
    assert abs(after - before) / before < 0.02, (before, after)
  assert out.mask.dtype == np.float32 and set(np.unique(out.mask)) <= {0.0, 1.0}
  assert out.label2.dtype == bool and out.brain.dtype == bool
  assert not (out.mask.astype(bool) & out.label2).any()


def test_normalise_percentiles_over_brain():
  image = np.zeros((10, 10, 2), np.float32)
  brain = np.zeros(image.shape, bool)
  brain[:, :, 0] = True
  image[:, :, 0] = np.arange(100, dtype=np.float32).reshape(10, 10) + 1000
  image[:, :, 1] = 5000  # outside the brain: ignored, and set to 0
  out = nifti.normalise(image, brain, (1.0, 99.0))
  lo, hi = 1000.99, 1098.01
  np.testing.assert_allclose(out[:, :, 0].ravel()[1:-1],
                             (np.arange(1, 99) + 1000 - lo) / (hi - lo), atol=1e-5)
  assert out[0, 0, 0] == 0.0 and out[9, 9, 0] == 1.0
  assert (out[:, :, 1] == 0).all()


def test_crop_pad_centres_on_brain():
  image = np.zeros((30, 20, 6), np.float32)
  image[2:12, 4:10, 1:3] = 1.0  # brain box, off-centre
  scan = nifti.Scan(data=image, affine=np.eye(4), spacing_mm=(1.0, 1.0, 1.0))
  spec = nifti.PreprocessSpec(shape=(14, 10, 4), spacing_mm=(1.0, 1.0, 1.0))
  out = nifti.preprocess(scan, None, spec)
  assert out.mask is None and out.label2 is None
  idx = np.nonzero(out.brain)
  assert [(int(i.min()), int(i.max())) for i in idx] == [(2, 11), (2, 7), (1, 2)]
  assert out.geometry.crop_start == (0, 2, 0)
  np.testing.assert_allclose(out.geometry.model_affine[:3, 3], (0, 2, 0))
  # Crop: a window smaller than the brain along x keeps its centre.
  small = nifti.preprocess(scan, None, nifti.PreprocessSpec((6, 10, 4), (1, 1, 1)))
  assert small.geometry.crop_start[0] == 4 and small.brain[:, 2:8, 1:3].all()
  assert small.image.max() == 1.0 and (small.image[~small.brain] == 0).all()


def test_round_trip_to_native(phantom_files):
  flair, wmh, native_image, native_labels = phantom_files
  scan = nifti.load_image(flair)
  labels = nifti.load_labels(wmh, scan)
  out = nifti.preprocess(scan, labels, SMALL_SPEC)
  assert out.image.shape == SMALL_SPEC.shape and out.image.dtype == np.float32
  assert out.image.min() == 0.0 and out.image.max() == 1.0
  geometry = out.geometry
  # The lesion centroid sits at the same world position on the model grid.
  lesion_world = _world(SMALL_SPEC.shape, geometry.model_affine)[:, out.mask > 0]
  np.testing.assert_allclose(lesion_world.mean(axis=1), (5, -4, 3), atol=0.7)
  back = nifti.to_native(out.mask, geometry, order=0)
  assert back.shape == NATIVE_SHAPE and back.dtype == np.float32
  native_lesion = native_labels == 1
  assert _dice(back, native_lesion) >= 0.9
  assert nifti.volume_ml(back, (3.0, 1.1, 0.9)) == pytest.approx(
      nifti.volume_ml(native_lesion, (3.0, 1.1, 0.9)), rel=0.02)
  image_back = nifti.to_native(out.image, geometry, order=1)
  assert image_back.shape == NATIVE_SHAPE
  bright = image_back > 0.5
  assert _dice(bright, native_lesion) >= 0.85
  # A float map written with native_affine overlays the input file.
  path = flair.parent / "back.nii.gz"
  nifti.save_nifti(path, back, geometry.native_affine)
  reloaded = nib.load(path)
  np.testing.assert_allclose(reloaded.affine, nib.load(flair).affine, atol=1e-5)
  np.testing.assert_array_equal(reloaded.get_fdata(), back)


def test_geometry_json_round_trip(phantom_files):
  flair, _, _, _ = phantom_files
  out = nifti.preprocess(nifti.load_image(flair), None, SMALL_SPEC)
  d = json.loads(json.dumps(out.geometry.to_dict()))
  restored = nifti.Geometry.from_dict(d)
  assert restored.to_dict() == out.geometry.to_dict()
  np.testing.assert_array_equal(nifti.to_native(out.image, restored),
                                nifti.to_native(out.image, out.geometry))


def test_to_native_rejects_wrong_shape(phantom_files):
  flair, _, _, _ = phantom_files
  out = nifti.preprocess(nifti.load_image(flair), None, SMALL_SPEC)
  with pytest.raises(ValueError, match="model grid"):
    nifti.to_native(np.zeros((3, 3, 3)), out.geometry)


def test_voxel_limit_is_configurable_and_refuses_from_the_header_alone(tmp_path, monkeypatch):
  """$WMH_JAX_MAX_VOXELS lowers the limit; a header over it is refused without reading data
  (the file's data section here is 64 bytes, far short of what the header declares)."""
  path = _raw_header(tmp_path / "big.nii", (64, 64, 32))
  monkeypatch.setenv(nifti.MAX_VOXELS_ENV, "100000")
  with pytest.raises(InputError, match=r"at most 100000 voxels.*refused before reading data"):
    nifti.load_image(path)
  good = _good(tmp_path)  # 16 x 16 x 8 = 2048 voxels
  monkeypatch.setenv(nifti.MAX_VOXELS_ENV, "2047")
  with pytest.raises(InputError, match="absurd dimensions"):
    nifti.load_image(good)
  monkeypatch.setenv(nifti.MAX_VOXELS_ENV, "2048")
  assert nifti.load_image(good).data.shape == (16, 16, 8)
  monkeypatch.setenv(nifti.MAX_VOXELS_ENV, "lots")
  with pytest.raises(ValueError, match="positive integer"):
    nifti.max_voxels()
