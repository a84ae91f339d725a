"""predict CLI: native-space round trip, end to end, bad inputs, ensembles, resume, TTA,
BIDS derivatives."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

import tiny_data
from tolerances import bfloat16_rtol, float32_rtol
from wmh_jax.data import cache, manifest, nifti, pipeline, records
from wmh_jax.evaluation import conformal
from wmh_jax.inference import derivatives, predict, restore
from wmh_jax.models import kinds
from wmh_jax.runtime import checkpoint, sharding
from wmh_jax.training import train

REPO = Path(__file__).resolve().parents[1]
MODEL_VOXEL_ML = 1.5 ** 3 / 1000  # tiny_config grid: 1.5 mm isotropic
NATIVE_VOXEL_ML = 1e-3            # tiny_data scans: 1 mm isotropic


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a > 0.5, b > 0.5
  return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _rows(path: Path) -> list[dict[str, str]]:
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, programs) -> dict[str, Path]:
  """A 2-seed weak sweep (seed_1 = a copy of seed_0) and a strong run in bfloat16 compute,
  1 epoch each.

  Also returns the tiny dataset's folder ("data").
  """
  root = tmp_path_factory.mktemp("predict")
  manifest_path = tiny_data.make_tiny_dataset(root / "data", n=12)
  config = tiny_data.tiny_config(manifest_path, root / "cache")
  # Fill the preprocessing cache in-process: the training run then spawns no workers.
  cache.preprocessed_records(manifest.read_manifest(manifest_path),
                             records.preprocess_spec(config), root / "cache", workers=1)
  train.run(config, root / "weak" / "seed_0", programs)
  shutil.copytree(root / "weak" / "seed_0", root / "weak" / "seed_1")
  strong = tiny_data.tiny_config(manifest_path, root / "cache", kind="strong")
  strong.model.dtype = "bfloat16"  # a mixed-precision run goes through every predict test
  train.run(strong, root / "strong", programs)
  return {"weak": root / "weak", "strong": root / "strong", "data": root / "data"}


# ---------------------------------------------------------------------------
# Native-space round trip (no model)


def test_native_round_trip_restores_lesion_and_grid(tmp_path):
  shape = (40, 36, 20)
  # Native axes: 0 -> posterior (0.9 mm), 1 -> left (1.2 mm), 2 -> superior (3 mm): "PLS".
  affine = np.array([[0.0, -1.2, 0.0, 20.0],
                     [-0.9, 0.0, 0.0, 15.0],
                     [0.0, 0.0, 3.0, -30.0],
                     [0.0, 0.0, 0.0, 1.0]])
  mm = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) \
      * np.array([0.9, 1.2, 3.0])
  centre = np.array(shape) * np.array([0.9, 1.2, 3.0]) / 2
  brain = (((mm - centre) / np.array([16.0, 19.0, 26.0])) ** 2).sum(-1) < 1
  lesion = (((mm - centre - np.array([5.0, -6.0, 6.0])) / np.array([6.0, 6.0, 9.0])) ** 2
            ).sum(-1) < 1
  image = np.where(brain, 1.0, 0.0) + 2.0 * lesion
  nib.save(nib.Nifti1Image(image.astype(np.float32), affine), tmp_path / "flair.nii.gz")
  nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), tmp_path / "wmh.nii.gz")

  scan = nifti.load_image(tmp_path / "flair.nii.gz")
  labels = nifti.load_labels(tmp_path / "wmh.nii.gz", scan)
  pre = nifti.preprocess(scan, labels, nifti.PreprocessSpec((32, 32, 16), (1.5, 1.5, 3.0)))
  assert pre.mask.sum() > 100  # the lesion is on the model grid
  predict.save_native(tmp_path / "mask.nii.gz", pre.mask, pre.geometry, order=0)
  predict.save_native(tmp_path / "map.nii.gz", pre.mask, pre.geometry, order=1)

  for name in ("mask.nii.gz", "map.nii.gz"):
    written = nib.load(tmp_path / name)
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
  back = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
  assert back.dtype == np.uint8
  assert _dice(back, lesion) >= 0.9
  assert _dice(np.asarray(nib.load(tmp_path / "map.nii.gz").dataobj), lesion) >= 0.9


# ---------------------------------------------------------------------------
# End to end


def test_cli_end_to_end(runs, tmp_path):
  """Real CLI on 2 devices: 3 scans (one in a non-RAS orientation) + 1 corrupt file."""
  data = runs["data"]
  ras = nib.load(data / "s00_flair.nii.gz")
  pls = ras.as_reoriented(nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("PLS")))
  nib.save(pls, tmp_path / "s00_pls.nii.gz")
  (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
  scans = [data / "s00_flair.nii.gz", tmp_path / "s00_pls.nii.gz", data / "s01_flair.nii.gz",
           tmp_path / "bad.nii.gz"]
  out = tmp_path / "preds"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "wmh_jax.predict", f"--checkpoints={runs['weak']},{runs['strong']}",
       f"--out={out}", *map(str, scans)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"{tmp_path / 'bad.nii.gz'}: corrupt or not a NIfTI file" in proc.stderr
  assert "3 scans processed, 1 failed" in proc.stdout

  rows = _rows(out / "volumes.csv")
  assert [r["scan_id"] for r in rows] == ["s00_flair", "s00_pls", "s01_flair", "bad"]
  assert [r["status"] for r in rows[:3]] == ["ok"] * 3
  assert rows[3]["status"].startswith("corrupt or not a NIfTI file")
  assert rows[3]["weak_mean_ml"] == "" and rows[3]["strong_volume_ml"] == ""
  assert rows[0]["native_shape"] == "24x24x12" and rows[0]["native_spacing_mm"] == "1x1x1"
  assert rows[0]["weak_model_shape"] == "16x16x8"
  assert rows[0]["strong_model_spacing_mm"] == "1.5x1.5x1.5"
  for row in rows[:3]:
    seeds = [float(row["weak_seed_0_volume_ml"]), float(row["weak_seed_1_volume_ml"])]
    assert np.isfinite(seeds).all() and seeds[0] == seeds[1]  # seed_1 is a copy
    assert float(row["weak_mean_ml"]) == pytest.approx(seeds[0], rel=1e-12)
    assert float(row["weak_sd_ml"]) == 0.0
    strong = float(row["strong_volume_ml"])
    assert strong / MODEL_VOXEL_ML == pytest.approx(round(strong / MODEL_VOXEL_ML), abs=1e-6)
    assert 0.0 < float(row["strong_soft_volume_ml"]) < 16 * 16 * 8 * MODEL_VOXEL_ML
    assert np.isnan(float(row["strong_sd_ml"]))  # one seed: SD undefined
  # The same image in another voxel order gives the same prediction.
  for column in ("weak_mean_ml", "strong_volume_ml", "strong_soft_volume_ml"):
    assert float(rows[1][column]) == pytest.approx(float(rows[0][column]), rel=1e-5)

  for row, src in zip(rows[:3], scans[:3]):
    source = nib.load(src)
    maps = {}
    for name in ("weak_attention", "weak_attention_mask", "strong_prob", "strong_mask"):
      img = nib.load(out / row["scan_id"] / f"{name}.nii.gz")
      assert img.shape == source.shape
      np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
      maps[name] = np.asarray(img.dataobj)
    # Native masks keep the model-grid volume to within half a native voxel.
    weak_voxels = np.rint(float(row["weak_mean_ml"]) / MODEL_VOXEL_ML)
    assert abs(maps["weak_attention_mask"].sum() - weak_voxels * MODEL_VOXEL_ML
               / NATIVE_VOXEL_ML) <= 0.5 + 1e-9
    assert abs(maps["strong_mask"].sum() - float(row["strong_volume_ml"])
               / NATIVE_VOXEL_ML) <= 0.5 + 1e-9
    assert ((maps["strong_prob"] >= 0) & (maps["strong_prob"] <= 1)).all()
    assert json.loads((out / row["scan_id"] / "done.json").read_text())["row"]["status"] == "ok"
  pls_mask = nib.as_closest_canonical(nib.load(out / "s00_pls" / "strong_mask.nii.gz"))
  np.testing.assert_array_equal(
      np.asarray(pls_mask.dataobj), np.asarray(nib.load(out / "s00_flair" / "strong_mask.nii.gz")
                                               .dataobj))
  assert not (out / "bad").exists()
  assert not [p for p in out.rglob(".*")]  # no temp files left behind


def test_models_on_different_grids_get_their_own_preprocessing(runs, tmp_path, monkeypatch):
  """Two stand-in "strong" models (probability = input image) on two grids."""
  specs = {"fine": nifti.PreprocessSpec((16, 16, 8), (1.5, 1.5, 1.5)),
           "coarse": nifti.PreprocessSpec((8, 8, 4), (3.0, 3.0, 3.0))}
  stand_ins = [restore.Network(name, name, "strong", spec, 1.0,
                                float(np.prod(spec.spacing_mm)) / 1000, name, {},
                                lambda params, x: {"seg_prob": x[..., 0]})
               for name, spec in specs.items()]
  calls = []
  real_preprocess = nifti.preprocess

  def counting_preprocess(scan, labels, spec):
    calls.append(spec)
    return real_preprocess(scan, labels, spec)

  monkeypatch.setattr(nifti, "preprocess", counting_preprocess)
  scans = [runs["data"] / f"s0{i}_flair.nii.gz" for i in (5, 6)]
  summary = predict.predict(predict.collect_inputs(map(str, scans)), stand_ins,
                            tmp_path, sharding.make_mesh())
  assert (summary.processed, summary.failed) == (2, 0)
  assert sorted(calls, key=str) == sorted(list(specs.values()) * 2, key=str)
  for row, path in zip(_rows(tmp_path / "volumes.csv"), scans):
    for name, spec in specs.items():
      image = real_preprocess(nifti.load_image(path), None, spec).image
      # A float32 sum of the model-grid voxels against a float64 reference.
      assert float(row[f"{name}_soft_volume_ml"]) == pytest.approx(
          image.sum(dtype=np.float64) * np.prod(spec.spacing_mm) / 1000,
          rel=float32_rtol(int(np.prod(spec.shape)), ops=4))
      assert row[f"{name}_model_shape"] == "x".join(map(str, spec.shape))
      assert nib.load(tmp_path / row["scan_id"] / f"{name}_prob.nii.gz").shape == (24, 24, 12)


# ---------------------------------------------------------------------------
# Bad inputs


def test_each_bad_input_gets_its_reason_and_others_run(runs, tmp_path, write_nifti, capsys):
  good = runs["data"] / "s02_flair.nii.gz"
  volume = np.ones((8, 8, 8), np.float32)
  nan = volume.copy()
  nan[2, 3, 4] = np.nan
  (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
  bad = {
      "corrupt": (tmp_path / "corrupt.nii.gz", "corrupt or not a NIfTI file"),
      "missing": (tmp_path / "missing.nii.gz", "file not found"),
      "flat": (write_nifti("flat.nii.gz", np.ones((8, 8), np.float32)), "not a 3D volume"),
      "series": (write_nifti("series.nii.gz", np.ones((8, 8, 8, 2), np.float32)),
                 "not a 3D volume (shape (8, 8, 8, 2))"),
      "nan": (write_nifti("nan.nii.gz", nan), "contains NaN or Inf values"),
      "zero": (write_nifti("zero.nii.gz", np.zeros((8, 8, 8), np.float32)),
               "image is all zero"),
      "huge": (write_nifti("huge.nii.gz", volume, np.diag([50.0, 50.0, 50.0, 1.0])),
               "invalid voxel spacing (50.0, 50.0, 50.0) mm"),
  }
  paths = [str(good)] + [str(path) for path, _ in bad.values()]
  out = tmp_path / "preds"
  code = predict.main([f"--checkpoints={runs['strong']}", f"--out={out}", *paths])
  assert code == 1
  err_lines = [line for line in capsys.readouterr().err.splitlines() if ": " in line
               and line.split(": ")[0] in paths]
  assert len(err_lines) == len(bad)
  rows = {r["scan_id"]: r for r in _rows(out / "volumes.csv")}
  assert list(rows) == ["s02_flair", *bad]
  assert rows["s02_flair"]["status"] == "ok"
  assert np.isfinite(float(rows["s02_flair"]["strong_volume_ml"]))
  for name, (path, reason) in bad.items():
    assert rows[name]["status"].startswith(reason), (name, rows[name]["status"])
    assert rows[name]["path"] == str(path)
    assert any(line.startswith(f"{path}: {reason}") for line in err_lines), name


def test_usage_errors_exit_2(runs, tmp_path, capsys):
  assert predict.main([f"--checkpoints={tmp_path}", f"--out={tmp_path / 'o'}",
                       str(runs["data"])]) == 2
  assert "no checkpoints here nor in seed_*/" in capsys.readouterr().err
  empty = tmp_path / "empty"
  empty.mkdir()
  assert predict.main([f"--checkpoints={runs['weak']}", f"--out={tmp_path / 'o'}",
                       str(empty)]) == 2
  assert "no input scans found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Resume and TTA


def test_resume_skips_finished_scans_and_tta_reruns(runs, tmp_path, capsys):
  scans = [str(runs["data"] / f"s0{i}_flair.nii.gz") for i in (3, 4)]
  out = tmp_path / "preds"
  args = [f"--checkpoints={runs['weak']}", f"--out={out}", *scans]
  assert predict.main(args) == 0
  files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "volumes.csv")
  assert len(files) == 2 * 3  # attention, attention_mask, done.json per scan
  mtimes = {p: p.stat().st_mtime_ns for p in files}
  first = _rows(out / "volumes.csv")

  capsys.readouterr()
  assert predict.main(args + ["--resume"]) == 0
  assert "0 scans processed, 0 failed, 2 skipped" in capsys.readouterr().out
  assert {p: p.stat().st_mtime_ns for p in files} == mtimes
  assert _rows(out / "volumes.csv") == first

  # A different setting (TTA) does not match the stored outputs: recomputed.
  assert predict.main(args + ["--resume", "--tta"]) == 0
  assert "2 scans processed" in capsys.readouterr().out
  tta = _rows(out / "volumes.csv")
  for row in tta:
    assert row["status"] == "ok" and np.isfinite(float(row["weak_mean_ml"]))
  done = json.loads((out / "s03_flair" / "done.json").read_text())
  assert done["signature"]["tta"] is True
  assert done["row"]["weak_mean_ml"] == pytest.approx(float(tta[0]["weak_mean_ml"]))


def test_bids_derivatives_beside_a_non_bids_input_that_fails(runs, tmp_path, capsys):
  """import-bids -> predict --bids-out: the derivative dataset's files, sidecars and TSV;
  a non-BIDS input gets its reason and the others go on; --resume re-exports the same."""
  data, raw = runs["data"], tmp_path / "ds"
  sources = {"sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz": "s00_flair.nii.gz",
             "sub-02/anat/sub-02_FLAIR.nii.gz": "s01_flair.nii.gz"}
  for target, source in sources.items():
    (raw / target).parent.mkdir(parents=True)
    shutil.copyfile(data / source, raw / target)
  (raw / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
  assert manifest.main(["import-bids", str(raw), f"--out={tmp_path / 'm.csv'}"]) == 0
  out, deriv = tmp_path / "preds", raw / "derivatives" / "wmh_jax"
  args = [str(tmp_path / "m.csv"), str(data / "s02_flair.nii.gz"),
          f"--checkpoints={runs['weak']},{runs['strong']}", f"--out={out}", f"--bids-out={deriv}"]
  capsys.readouterr()
  assert predict.main(args) == 1
  err = capsys.readouterr().err
  assert f"{data / 's02_flair.nii.gz'}: not a BIDS name: " in err

  description = json.loads((deriv / "dataset_description.json").read_text())
  assert description["DatasetType"] == "derivative"
  generated = description["GeneratedBy"][0]
  assert generated["Name"] == "wmh-jax" and generated["Version"]
  assert generated["Description"].startswith("command: python -m wmh_jax.predict ")
  assert f"--bids-out={deriv}" in generated["Description"]
  assert description["DatasetLinks"] == {"raw": raw.as_uri()}
  anat = deriv / "sub-01" / "ses-1" / "anat"
  stem = "sub-01_ses-1_space-orig_desc-"
  expected = {f"{stem}wmhWeak_mask": "weak_attention_mask",
              f"{stem}wmhWeakAttention_map": "weak_attention",
              f"{stem}wmhStrong_mask": "strong_mask", f"{stem}wmhStrong_probseg": "strong_prob"}
  assert sorted(p.name for p in anat.iterdir()) == sorted(
      f"{name}{ext}" for name in expected for ext in (".nii.gz", ".json"))
  for name, produced in expected.items():
    np.testing.assert_array_equal(nib.load(anat / f"{name}.nii.gz").get_fdata(),
                                  nib.load(out / "sub-01_ses-1" / f"{produced}.nii.gz").get_fdata())
    sidecar = json.loads((anat / f"{name}.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz"]
  assert (deriv / "sub-02" / "anat" / "sub-02_space-orig_desc-wmhStrong_mask.nii.gz").is_file()

  with (deriv / "volumes.tsv").open(newline="") as f:
    tsv = list(csv.DictReader(f, delimiter="\t"))
  by_scan = {r["scan_id"]: r for r in _rows(out / "volumes.csv")}
  assert [(r["participant_id"], r["session_id"]) for r in tsv] == [("sub-01", "ses-1"),
                                                                  ("sub-02", "n/a")]
  for row in tsv:
    assert row["weak_mean_ml"] == by_scan[row["scan_id"]]["weak_mean_ml"]
    assert row["strong_sd_ml"] == "nan"  # one strong seed
  assert by_scan["s02_flair"]["status"].startswith("not a BIDS name")
  units = json.loads((deriv / "volumes.json").read_text())
  assert units["weak_mean_ml"]["Units"] == "mL"

  before = (deriv / "volumes.tsv").read_text()
  assert predict.main(args + ["--resume"]) == 1
  assert "0 scans processed, 1 failed, 2 skipped" in capsys.readouterr().out
  assert (deriv / "volumes.tsv").read_text() == before
  assert not [p for p in deriv.rglob(".*")]  # no temp files left behind


def test_desc_label_and_map_names():
  assert derivatives.desc_label("seed_sweep-2", ["seed_sweep-2"]) == "wmh"
  assert derivatives.desc_label("seed_sweep-2", ["a", "seed_sweep-2"]) == "wmhSeedsweep2"
  assert derivatives.map_entities("attention_mask", "wmh", has_segmentation=False)[:2] == (
      "wmh", "mask")
  assert derivatives.map_entities("attention_mask", "wmh", has_segmentation=True)[:2] == (
      "wmhAttention", "mask")


def test_bfloat16_run_restores_under_either_dtype(runs):
  """The bfloat16 strong run stored float32 parameters (predict runs it in every test here);
  under float32 compute the same checkpoint gives the same logits within `bfloat16_rtol`."""
  data = runs["data"]
  restored = checkpoint.restore_for_inference(runs["strong"])
  assert restored.config.model.dtype == "bfloat16"
  assert {leaf.dtype for leaf in jax.tree.leaves(restored.variables)} == {np.dtype(np.float32)}
  image = np.stack([pipeline.load_record(r)["image"] for r in
                    records.load_records(data / "manifest.csv", restored.config)[:4]])
  logits = {}
  for dtype in ("bfloat16", "float32"):
    restored.config.model.dtype = dtype
    model = kinds.build_model(restored.config.model)
    logits[dtype] = np.asarray(model.apply(restored.variables, image)["seg_logits"])
  # tiny_config's depth-2 body: 10 convolutions on the longest path.
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], rtol=0,
                             atol=bfloat16_rtol(10) * np.abs(logits["float32"]).max())


def test_volume_intervals_from_the_runs_stored_validation_predictions(runs, tmp_path):
  """Each volume group's lo/hi columns: the split-conformal interval calibrated on the
  validation predictions its runs stored for the restored checkpoints (ensemble mean)."""
  mesh = sharding.make_mesh()
  models = restore.load_networks([runs["weak"], runs["strong"]], mesh)
  groups = restore.group_networks(models)
  weak = groups["weak"]
  assert all(m.val_predictions is not None for m in models)
  calibration = conformal.ensemble_calibration([m.val_predictions for m in weak], 0.8)
  mean = np.mean([m.val_predictions["predicted_ml"] for m in weak], axis=0)
  assert calibration == conformal.calibrate(weak[0].val_predictions["annotated_ml"], mean, 0.8)
  out = tmp_path / "preds"
  scans = [str(runs["data"] / f"s0{i}_flair.nii.gz") for i in (7, 8)]
  assert predict.main([f"--checkpoints={runs['weak']},{runs['strong']}", f"--out={out}",
                       "--interval_level=0.8", "--qc", *scans]) == 0
  for row in _rows(out / "volumes.csv"):
    for group in ("weak", "strong"):
      low, mean_ml, high = (float(row[f"{group}_{k}"]) for k in ("lo_ml", "mean_ml", "hi_ml"))
      assert 0.0 <= low <= max(mean_ml, 0.0) <= high, row
    low, high = conformal.interval(calibration, float(row["weak_mean_ml"]))
    assert float(row["weak_lo_ml"]) == pytest.approx(float(low))
    assert float(row["weak_hi_ml"]) == pytest.approx(float(high))
  assert predict.main([f"--checkpoints={runs['weak']}", f"--out={out}", "--interval_level=1",
                       *scans]) == 2
  # Out-of-distribution score: the weak runs' mean, flagged above their training threshold.
  threshold = float(np.mean([m.ood_reference.threshold for m in weak]))
  assert threshold > 0
  for row in _rows(out / "volumes.csv"):
    assert float(row["weak_ood_score"]) >= 0
    assert row["weak_ood_flag"] == str(int(float(row["weak_ood_score"]) > threshold))
  # --qc: a montage per scan, and an index sorted by OOD score (highest first).
  rows = _rows(out / "volumes.csv")
  for row in rows:
    assert (out / row["scan_id"] / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  index = (out / "qc.md").read_text()
  ordered = sorted(rows, key=lambda r: -float(r["weak_ood_score"]))
  positions = [index.index(f"({r['scan_id']}/qc.png)") for r in ordered]
  assert positions == sorted(positions)
  assert f"{ordered[0]['scan_id']}: weak {float(ordered[0]['weak_mean_ml']):.1f} mL [" in index


def test_tta_average_flips_maps_back():
  rng = np.random.default_rng(0)
  prob = rng.uniform(size=(4, 3, 2)).astype(np.float32)
  raw = {"seg_prob": np.stack([prob, prob[::-1]]), "volume": np.array([1.0, 3.0])}
  out = restore._average_tta(raw)  # pylint: disable=protected-access
  np.testing.assert_allclose(out["seg_prob"], prob[None], rtol=1e-6)
  np.testing.assert_allclose(out["volume"], [2.0])


# ---------------------------------------------------------------------------
# Ensembles and inputs (pure functions)


def test_mean_sd_and_vote():
  mean, sd = predict.mean_sd([1.0, 2.0, 4.0])
  assert mean == pytest.approx(7 / 3, rel=1e-12)
  assert sd == pytest.approx(np.sqrt(7 / 3), rel=1e-12)  # ddof=1: sum of squares 14/3 over 2
  mean, sd = predict.mean_sd([0.5])
  assert mean == 0.5 and np.isnan(sd)
  assert predict.majority_vote([3, 1, 3, 2]) == 3
  assert predict.majority_vote([4, 2, 2, 4]) == 2  # tie -> lower class


def test_ensemble_of_joint_and_severity_outputs():
  att = [np.array([[[0.0, 1.0]]]), np.array([[[2.0, 3.0]]])]
  prob = [np.array([[[0.2, 0.9]]]), np.array([[[0.6, 0.7]]])]
  joint = [{"volume_ml": 1.0, "seg_volume_ml": 2.0, "soft_volume_ml": 3.0,
            "attention": att[0], "seg_prob": prob[0]},
           {"volume_ml": 3.0, "seg_volume_ml": 2.0, "soft_volume_ml": 5.0,
            "attention": att[1], "seg_prob": prob[1]}]
  ens = predict.ensemble(joint)
  assert (ens["mean_ml"], ens["sd_ml"]) == (2.0, pytest.approx(np.sqrt(2.0)))
  assert (ens["seg_mean_ml"], ens["seg_sd_ml"]) == (2.0, 0.0)
  assert (ens["soft_mean_ml"], ens["soft_sd_ml"]) == (4.0, pytest.approx(np.sqrt(2.0)))
  np.testing.assert_allclose(ens["attention"], [[[1.0, 2.0]]])
  np.testing.assert_allclose(ens["seg_prob"], [[[0.4, 0.8]]])
  votes = predict.ensemble([{"severity": 1}, {"severity": 4}, {"severity": 4}])
  assert votes == {"severity_vote": 4}

  maps = predict.group_maps(ens, (10.0, 10.0, 10.0))  # 1 mL voxels: 2 mL -> 2 voxels
  assert {k: order for k, (_, order) in maps.items()} == {
      "attention": 1, "attention_mask": 0, "prob": 1, "mask": 0}
  np.testing.assert_array_equal(maps["attention_mask"][0], [[[True, True]]])
  np.testing.assert_array_equal(maps["mask"][0], [[[False, True]]])
  maps = predict.group_maps({**ens, "mean_ml": 1.0}, (10.0, 10.0, 10.0))
  np.testing.assert_array_equal(maps["attention_mask"][0], [[[False, True]]])


def test_csv_columns_per_kind():
  spec = nifti.PreprocessSpec((16, 16, 8), (1.5, 1.5, 1.5))

  def model(name, group, kind):
    return restore.Network(name, group, kind, spec, 1.0, 1.0, "", None, None)

  groups = restore.group_networks([model("w_seed_0", "w", "weak"),
                                    model("w_seed_1", "w", "weak"), model("j", "j", "joint"),
                                    model("sev", "sev", "severity")])
  assert predict.csv_columns(groups) == [
      "scan_id", "path", "status",
      "w_seed_0_volume_ml", "w_seed_1_volume_ml", "w_mean_ml", "w_sd_ml", "w_lo_ml", "w_hi_ml",
      "w_ood_score", "w_ood_flag", "w_model_spacing_mm", "w_model_shape",
      "j_volume_ml", "j_seg_volume_ml", "j_soft_volume_ml", "j_mean_ml", "j_sd_ml", "j_lo_ml",
      "j_hi_ml", "j_seg_mean_ml", "j_seg_sd_ml", "j_soft_mean_ml", "j_soft_sd_ml",
      "j_ood_score", "j_ood_flag", "j_model_spacing_mm", "j_model_shape",
      "sev_severity", "sev_severity_vote", "sev_model_spacing_mm", "sev_model_shape",
      "native_spacing_mm", "native_shape"]


def test_collect_inputs_files_folders_manifests(tmp_path, write_nifti):
  one = write_nifti("a/x.nii.gz", np.ones((4, 4, 4), np.float32))
  write_nifti("a/y.nii", np.ones((4, 4, 4), np.float32))
  (tmp_path / "a" / "notes.txt").write_text("ignored")
  (tmp_path / "m.csv").write_text("subject_id,scan_id,image\nsub1,id/1,a/x.nii.gz\n")
  inputs = predict.collect_inputs([str(one), str(tmp_path / "a"), str(tmp_path / "m.csv")])
  assert [(s.scan_id, s.path.name, s.folder) for s in inputs] == [
      ("x", "x.nii.gz", "x"), ("x", "x.nii.gz", "x_2"), ("y", "y.nii", "y"),
      ("id/1", "x.nii.gz", "id_1")]


def test_a_full_disk_reports_the_scan_and_leaves_no_half_written_file(runs, tmp_path,
                                                                      monkeypatch, capsys):
  """ENOSPC in the middle of writing one scan's map: that scan is reported (one line, its
  status), its partial temp file is gone, no done.json marks it, the other scans finish."""
  real_save = nifti.nib.save

  def save(image, filename):
    if "s05_flair" in str(filename) and "attention_mask" in str(filename):
      Path(filename).write_bytes(b"\0" * 100)  # half a file, then the disk is full
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(image, filename)

  monkeypatch.setattr(nifti.nib, "save", save)
  out = tmp_path / "preds"
  scans = [str(runs["data"] / f"s0{i}_flair.nii.gz") for i in (4, 5, 6)]
  assert predict.main([f"--checkpoints={runs['weak']}", f"--out={out}", *scans]) == 1
  assert "s05_flair.nii.gz: could not write its outputs: No space left on device" in (
      capsys.readouterr().err)
  rows = {r["scan_id"]: r for r in _rows(out / "volumes.csv")}
  assert rows["s04_flair"]["status"] == rows["s06_flair"]["status"] == "ok"
  assert rows["s05_flair"]["status"].startswith("could not write its outputs")
  assert not (out / "s05_flair" / "done.json").exists()
  assert not [p for p in out.rglob(".*")]  # no temp file left anywhere
