"""Tests of domain randomisation (wmh_jax/data/domain.py) and its pipeline hook."""

from __future__ import annotations

import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from wmh_jax import configs
from wmh_jax.data import cache, domain, nifti, pipeline

SHAPE = (16, 16, 8)
SPACING_MM = (1.4, 1.4, 4.2)   # the paper grid's spacing: the resolution step is active
CPU_SPACING_MM = (2.8, 2.8, 8.4)  # the :cpu grid: coarser than every target
SEED = 7
NUM_RECORDS = 6


def _domain_config(**changes) -> ml_collections.ConfigDict:
  config = configs.get_config().augment.domain
  config.enabled = True
  config.probability = 1.0
  config.update(changes)
  return config


def _scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A normalised record: (image float32 in [0, 1], 0 outside; brain; lesions)."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
  centre = (np.array(SHAPE) - 1) / 2
  brain = (((grid - centre) / np.array([7.0, 7.0, 3.6])) ** 2).sum(-1) < 1.0
  lesions = ((grid - centre - [2, 1, 0]) ** 2).sum(-1) < 4.0
  image = np.where(brain, 0.3 + 0.02 * grid[..., 0] + 0.05 * rng.standard_normal(SHAPE), 0.0)
  image = np.where(lesions, 0.95, image)
  image = nifti.normalise(image.astype(np.float32), brain, (1.0, 99.0))
  return image.astype(np.float32), brain, lesions & brain


def _identity_params(**changes) -> domain.DomainParams:
  params = dict(contrast=True, bias=True, resolution=True, noise=True, gamma=1.0,
                curve_y=np.linspace(0.0, 1.0, 6), bias_coefficients=np.zeros((4, 4, 4)),
                inplane_mm=1.0, thickness_mm=3.0, phases=np.zeros(3), noise_std=0.0,
                rician=False, percentiles=(0.0, 100.0))
  params.update(changes)
  return domain.DomainParams(**params)


# ---- whole draws --------------------------------------------------------------

def test_identity_parameters_give_identity_output():
  image, brain, _ = _scan()
  out = domain.apply(image, brain, SPACING_MM, _identity_params(), np.random.default_rng(0))
  np.testing.assert_allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("spacing_mm", [SPACING_MM, CPU_SPACING_MM])
def test_draws_keep_shape_dtype_range_and_zero_background(spacing_mm):
  image, brain, _ = _scan()
  rng = np.random.default_rng(1)
  config = _domain_config(noise_std=(0.0, 0.5), bias_log_std=(0.0, 2.0))  # beyond the defaults
  for _ in range(30):
    out = domain.randomise(rng, image, brain, spacing_mm, config)
    assert out.shape == SHAPE and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not out[~brain].any()
    assert out[brain].max() == 1.0 and out[brain].min() == 0.0  # re-normalised


def test_deterministic_for_a_seed_and_different_across_seeds():
  image, brain, _ = _scan()
  config = _domain_config()
  first = domain.randomise(np.random.default_rng(3), image, brain, SPACING_MM, config)
  again = domain.randomise(np.random.default_rng(3), image, brain, SPACING_MM, config)
  other = domain.randomise(np.random.default_rng(4), image, brain, SPACING_MM, config)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert not np.array_equal(first, image)


def test_domain_rng_is_a_separate_stream_per_record_and_epoch():
  draws = {(r, e): domain.domain_rng(SEED, r, e).random()
           for r in range(3) for e in range(2)}
  assert len(set(draws.values())) == 6
  assert domain.domain_rng(SEED, 1, 1).random() == draws[(1, 1)]
  assert draws[(0, 0)] != pipeline.record_rng(SEED, 0, 0).random()


def test_sampled_parameters_stay_in_their_ranges_and_cover_them():
  config = _domain_config(probability=0.8)
  rng = np.random.default_rng(5)
  draws = [domain.sample_params(rng, config) for _ in range(400)]

  def values(name):
    return np.array([getattr(d, name) for d in draws])

  for name, (low, high) in [("gamma", config.gamma), ("inplane_mm", config.inplane_resolution_mm),
                            ("thickness_mm", config.slice_thickness_mm),
                            ("noise_std", config.noise_std)]:
    v = values(name)
    assert v.min() >= low and v.max() <= high, name
    assert v.min() < low + 0.05 * (high - low) and v.max() > high - 0.05 * (high - low), name
  low, high = np.array([d.percentiles for d in draws]).T
  assert 0.0 <= low.min() and low.max() <= 2.0 and 97.0 <= high.min() and high.max() <= 100.0
  for coin in ("contrast", "bias", "resolution", "noise"):
    assert 0.72 < values(coin).mean() < 0.88, coin
  assert 0.4 < values("rician").mean() < 0.6
  for d in draws:
    assert d.curve_y[0] == 0.0 and d.curve_y[-1] == pytest.approx(1.0)
    slopes = np.diff(d.curve_y) * (len(d.curve_y) - 1)  # relative to the identity's 1
    assert np.all(slopes > 0)
    assert slopes.max() / slopes.min() <= 4.0 + 1e-9
  amplitudes = [np.sqrt((d.bias_coefficients ** 2).sum()) for d in draws]
  assert max(amplitudes) > 0


# ---- 1. contrast ----------------------------------------------------------------

def test_intensity_remap_never_reorders_voxels():
  rng = np.random.default_rng(6)
  values = np.concatenate([rng.random(20000, dtype=np.float32),
                           np.float32([0.0, 1.0, 0.5, 0.5, 1 / 256, 255 / 256])])
  order = np.argsort(values, kind="stable")
  config = _domain_config()
  for _ in range(50):
    params = domain.sample_params(rng, config)
    table = domain.remap_table(params.gamma, params.curve_y)
    assert np.all(np.diff(table) > 0)  # strictly increasing
    out = domain.remap_intensity(values, table)
    assert out.dtype == np.float32
    assert np.all(np.diff(out[order]) >= 0)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[values == 0.0][0] == 0.0 and out[values == 1.0][0] == 1.0


def test_contrast_only_draw_keeps_lesions_the_brightest_voxels():
  image, brain, lesions = _scan()
  assert image[lesions].min() > image[brain & ~lesions].max()
  rng = np.random.default_rng(7)
  config = _domain_config()
  for _ in range(20):
    params = domain.sample_params(rng, config)
    out = domain.apply(image, brain, SPACING_MM,
                       _identity_params(gamma=params.gamma, curve_y=params.curve_y,
                                        percentiles=params.percentiles), rng)
    # Monotone remap + affine re-normalisation: voxel order kept (ties allowed
    # where the upper percentile clips lesions to 1).
    order = np.argsort(image[brain], kind="stable")
    assert np.all(np.diff(out[brain][order]) >= 0)
    assert out[lesions].min() >= out[brain & ~lesions].max()
    assert np.argmax(out) in np.flatnonzero(lesions)


def test_gamma_alone_is_a_power_law():
  table = domain.remap_table(0.6, np.linspace(0.0, 1.0, 6))
  x = np.linspace(0.0, 1.0, domain.REMAP_SEGMENTS + 1).astype(np.float32)
  np.testing.assert_allclose(domain.remap_intensity(x, table), x ** 0.6, atol=1e-6)
  mid = np.float32([0.3, 0.7])
  np.testing.assert_allclose(domain.remap_intensity(mid, table), mid ** 0.6, atol=2e-4)


# ---- 2. bias field ---------------------------------------------------------------

def test_bias_field_is_smooth_positive_and_has_the_drawn_std():
  config = _domain_config(bias_log_std=(0.3, 0.3))
  params = domain.sample_params(np.random.default_rng(8), config)
  log_field = domain.log_bias_field(SHAPE, params.bias_coefficients)
  assert log_field.shape == SHAPE and log_field.dtype == np.float32
  assert abs(log_field.mean()) < 1e-5
  assert log_field.std() == pytest.approx(0.3, rel=1e-4)
  field = domain.bias_field(SHAPE, params.bias_coefficients)
  assert field.min() > 0
  # Smooth: neighbours differ by far less than the field's spread.
  for axis in range(3):
    assert np.abs(np.diff(log_field, axis=axis)).max() < 0.5 * np.ptp(log_field)


# ---- 3. resolution ---------------------------------------------------------------

def test_resolution_is_a_no_op_where_the_grid_is_coarser():
  image, _, _ = _scan()
  assert domain.resolution_matrix(16, 2.8, 2.0, 0.3) is None
  assert domain.resolution_matrix(8, 8.4, 8.0, 0.3) is None
  out = domain.simulate_resolution(image, CPU_SPACING_MM, 2.0, 8.0, (0.5, 0.5, 0.5))
  np.testing.assert_array_equal(out, image)


def test_resolution_matrix_rows_sum_to_one_and_blur_to_about_the_target():
  spread = []
  for target in (3.0, 5.0, 8.0):
    columns = []
    for phase in np.linspace(0.0, 1.0, 8, endpoint=False):
      matrix = domain.resolution_matrix(81, 1.0, target, phase).toarray()
      assert matrix.shape == (81, 81) and matrix.dtype == np.float32
      np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
      columns.append(matrix[:, 40])
    psf = np.mean(columns, axis=0)
    offsets = np.arange(81) - 40
    std = np.sqrt((psf * offsets ** 2).sum() / psf.sum())
    # At least the target's Gaussian, plus the linear re-gridding (measured
    # 1.38x at 3 mm, 1.39x at 8 mm).
    sigma = target / domain.FWHM_PER_SIGMA
    assert sigma < std < 1.6 * sigma
    spread.append(std)
  assert spread[0] < spread[1] < spread[2]


def test_simulated_resolution_matches_dense_matrices_and_keeps_constants():
  image, _, _ = _scan()
  inplane, thickness, phases = 1.9, 7.0, (0.2, 0.5, 0.9)
  expected = image
  for axis, target in enumerate((inplane, inplane, thickness)):
    matrix = domain.resolution_matrix(SHAPE[axis], SPACING_MM[axis], target,
                                      phases[axis]).toarray()
    expected = np.moveaxis(np.tensordot(matrix, expected, axes=([1], [axis])), 0, axis)
  out = domain.simulate_resolution(image, SPACING_MM, inplane, thickness, phases)
  assert out.shape == SHAPE and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-6)
  assert np.abs(out - image).max() > 0.05  # it did blur
  flat = np.full(SHAPE, 0.4, np.float32)
  np.testing.assert_allclose(domain.simulate_resolution(flat, SPACING_MM, 2.0, 8.0, phases),
                             0.4, atol=1e-6)


# ---- 4. noise ----------------------------------------------------------------------

def test_noise_levels():
  rng = np.random.default_rng(9)
  zeros = np.zeros(200000, np.float32)
  gaussian = domain.add_noise(zeros + 0.5, rng, 0.05, rician=False)
  assert gaussian.dtype == np.float32
  assert gaussian.mean() == pytest.approx(0.5, abs=1e-3)
  assert gaussian.std() == pytest.approx(0.05, rel=0.02)
  rician = domain.add_noise(zeros, rng, 0.05, rician=True)
  assert rician.min() >= 0.0
  assert rician.mean() == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.02)  # Rayleigh at 0


# ---- 5. percentile normalisation ----------------------------------------------------

def test_renormalise_maps_the_percentiles_to_zero_and_one():
  values = np.random.default_rng(10).normal(0.5, 0.2, 5000).astype(np.float32)
  out = domain.renormalise(values, (2.0, 98.0))
  assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
  assert np.mean(out == 0.0) == pytest.approx(0.02, abs=0.002)
  assert np.mean(out == 1.0) == pytest.approx(0.02, abs=0.002)
  np.testing.assert_array_equal(domain.renormalise(np.full(9, 0.3, np.float32), (1, 99)), 1.0)


# ---- the pipeline hook ------------------------------------------------------------

@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
  """6 cached 16x16x8 records (1.5x1.5x3 mm): even ones with a mask, odd ones weak-only."""
  directory = tmp_path_factory.mktemp("domain_scans")
  rows = []
  for i in range(NUM_RECORDS):
    image, brain, lesions = _scan(i)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image_path, mask_path = directory / f"s{i}.nii.gz", directory / f"s{i}_wmh.nii.gz"
    nib.save(nib.Nifti1Image(image + 0.01 * brain, affine), image_path)
    nib.save(nib.Nifti1Image(lesions.astype(np.uint8), affine), mask_path)
    weak = i % 2 == 1
    rows.append({"subject_id": f"sub{i}", "scan_id": f"s{i}", "image": str(image_path),
                 "mask": "" if weak else str(mask_path), "severity": i % 5,
                 "wmh_volume_ml": float(i) if weak else None})
  spec = nifti.PreprocessSpec(shape=SHAPE, spacing_mm=(1.5, 1.5, 3.0))
  recs, failures = cache.preprocessed_records(rows, spec, directory / "cache", workers=1)
  assert not failures
  return recs


def _pipeline_config(worker_count: int = 0, domain_on: bool = True) -> ml_collections.ConfigDict:
  config = configs.get_config()
  config.loader.worker_count = worker_count
  config.augment.domain.enabled = domain_on
  return config


def _take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def test_off_by_default():
  assert configs.get_config().augment.domain.enabled is False
  assert configs.get_config("cpu,paper").augment.domain.enabled is False


def test_pipeline_changes_the_image_only(records):
  """Domain on vs off: the same masks, labels and geometric draws; other images."""
  on = _take(pipeline.make_train_iterator(records, _pipeline_config(), SEED,
                                          batch_size_per_process=3), 4)
  off = _take(pipeline.make_train_iterator(records, _pipeline_config(domain_on=False), SEED,
                                           batch_size_per_process=3), 4)
  for a, b in zip(on, off):
    for key in ("mask", "volume_ml", "severity", "has_mask"):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["image"].shape == b["image"].shape and a["image"].dtype == np.float32
    assert not np.array_equal(a["image"], b["image"])
    assert np.isfinite(a["image"]).all()
    assert a["image"].min() >= 0.0 and a["image"].max() <= 1.0
  masked = np.concatenate([b["mask"][b["has_mask"] == 1] for b in on])
  assert masked.any()


def test_pipeline_draw_equals_the_module_draw(records):
  """Geometric augmentation off: a row is exactly domain.randomise of its record."""
  config = _pipeline_config()
  config.augment.enabled = False
  transform = pipeline.AugmentRecord(SEED, NUM_RECORDS, config.augment)
  source = pipeline.CachedScans(records)
  for index in (2, NUM_RECORDS + 2):  # record 2, epochs 0 and 1
    element = source[2]
    out = transform.map_with_index(index, element)
    expected = domain.randomise(domain.domain_rng(SEED, 2, index // NUM_RECORDS),
                                element["image"][..., 0], element["brain"],
                                element["spacing_mm"], config.augment.domain)
    np.testing.assert_array_equal(out["image"][..., 0], expected)
    np.testing.assert_array_equal(out["mask"], element["mask"])
    assert out["volume_ml"] == pytest.approx(nifti.volume_ml(element["mask"][..., 0],
                                                             element["spacing_mm"]))


def test_worker_count_does_not_change_batches(records):
  in_process = _take(pipeline.make_train_iterator(records, _pipeline_config(0), SEED,
                                                  batch_size_per_process=3), 4)
  iterator = pipeline.make_train_iterator(records, _pipeline_config(2), SEED,
                                          batch_size_per_process=3)
  try:
    with_workers = _take(iterator, 4)
  finally:
    iterator.close()
  for a, b in zip(in_process, with_workers):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_domain_config_argument_turns_it_on_and_nothing_else():
  plain = configs.get_config("cpu")
  on = configs.get_config("cpu,domain")
  assert not plain.augment.domain.enabled and on.augment.domain.enabled
  assert configs.changed_fields(json.loads(plain.to_json()),
                                json.loads(on.to_json())) == ["augment.domain.enabled"]
