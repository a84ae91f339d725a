"""Tests for wmh_jax.data.manifest: schema, validation, splits, importers, CLI."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from wmh_jax.data import manifest
from wmh_jax.errors import ManifestError


def _touch(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"x")
  return path


@pytest.fixture
def study(tmp_path) -> Path:
  """A study folder with two relative-path images, one mask and a manifest."""
  folder = tmp_path / "study"
  _touch(folder / "img" / "a.nii.gz")
  _touch(folder / "img" / "b.nii.gz")
  _touch(folder / "lab" / "a.nii.gz")
  return folder


def _write(folder: Path, text: str, name: str = "manifest.csv") -> Path:
  path = folder / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def test_read_types_and_relative_paths(study, tmp_path):
  outside = _touch(tmp_path / "elsewhere" / "c.nii")
  path = _write(study, (
      "subject_id,scan_id,image,mask,wmh_volume_ml,severity,split,scanner,csf_ml\n"
      "s1,a,img/a.nii.gz,lab/a.nii.gz,2.5,3,train,GE,\n"
      f"s1,b, img/b.nii.gz ,,,,,Siemens,101.25\n"
      f"s2,c,{outside},,0,0.0,test,,\n"))
  rows = manifest.read_manifest(path)
  assert [r["scan_id"] for r in rows] == ["a", "b", "c"]
  a, b, c = rows
  assert a["image"] == str(study / "img" / "a.nii.gz")
  assert a["mask"] == str(study / "lab" / "a.nii.gz")
  assert b["image"] == str(study / "img" / "b.nii.gz") and b["mask"] is None
  assert c["image"] == str(outside)
  assert a["wmh_volume_ml"] == 2.5 and a["severity"] == 3 and a["split"] == "train"
  assert b["wmh_volume_ml"] is None and b["severity"] is None and b["split"] is None
  assert b["csf_ml"] == 101.25 and c["severity"] == 0 and c["wmh_volume_ml"] == 0.0
  assert a["scanner"] == "GE" and c["scanner"] == ""
  assert set(manifest.COLUMNS) <= set(a) and a["dataset"] is None


def test_inference_manifest_without_labels(study):
  path = _write(study, "subject_id,scan_id,image\ns1,a,img/a.nii.gz\n")
  (row,) = manifest.read_manifest(path)
  assert row["mask"] is None and row["wmh_volume_ml"] is None


def test_write_round_trip_keeps_extras_and_relative_paths(study, tmp_path):
  outside = _touch(tmp_path / "elsewhere" / "c.nii")
  text = ("subject_id,scan_id,image,mask,wmh_volume_ml,site,zeta,alpha\n"
          "s1,a,img/a.nii.gz,lab/a.nii.gz,0.1,x,1,one\n"
          f"s2,c,{outside},,3.333333333333333,,2,\n")
  rows = manifest.read_manifest(_write(study, text))
  out = study / "copy.csv"
  manifest.write_manifest(out, rows)
  written = out.read_text()
  assert written.splitlines()[0] == "subject_id,scan_id,image,mask,wmh_volume_ml,site,zeta,alpha"
  assert written.splitlines()[1] == "s1,a,img/a.nii.gz,lab/a.nii.gz,0.1,x,1,one"
  assert str(outside) in written.splitlines()[2]
  assert manifest.read_manifest(out) == rows
  assert [p.name for p in study.iterdir() if p.name.startswith(".")] == []


def test_write_paths_absolute_outside_folder(study, tmp_path):
  rows = manifest.read_manifest(_write(study, "subject_id,scan_id,image\ns,a,img/a.nii.gz\n"))
  out = tmp_path / "other" / "m.csv"
  manifest.write_manifest(out, rows)
  assert manifest.read_manifest(out) == rows
  assert str(study / "img" / "a.nii.gz") in out.read_text()


HEADER = "subject_id,scan_id,image,mask,wmh_volume_ml,severity,split\n"
GOOD = "s1,a,img/a.nii.gz,,1.0,1,train\n"

BAD_MANIFESTS = {
    "empty": ("", None, None, "empty"),
    "header_only": (HEADER, None, None, "no data rows"),
    "missing_column": ("subject_id,image\ns1,img/a.nii.gz\n", None, "scan_id", "missing"),
    "duplicate_column": ("subject_id,scan_id,image,image\n", None, "image", "duplicate"),
    "unnamed_column": ("subject_id,scan_id,image,\n", None, None, "no name"),
    "duplicate_scan": (HEADER + GOOD + "s2,a,img/b.nii.gz,,,,\n", 2, "scan_id", "duplicate"),
    "negative_volume": (HEADER + "s1,a,img/a.nii.gz,,-0.5,,\n", 1, "wmh_volume_ml", "negative"),
    "text_volume": (HEADER + GOOD + "s1,b,img/b.nii.gz,,lots,,\n", 2, "wmh_volume_ml",
                    "not a number"),
    "nan_volume": (HEADER + "s1,a,img/a.nii.gz,,nan,,\n", 1, "wmh_volume_ml", "finite"),
    "severity_5": (HEADER + "s1,a,img/a.nii.gz,,,5,\n", 1, "severity", "0-4"),
    "severity_frac": (HEADER + "s1,a,img/a.nii.gz,,,2.5,\n", 1, "severity", "0-4"),
    "bad_split": (HEADER + "s1,a,img/a.nii.gz,,,,training\n", 1, "split", "train, val, test"),
    "image_missing": (HEADER + "s1,a,img/nope.nii.gz,,,,\n", 1, "image", "not found"),
    "image_is_dir": (HEADER + "s1,a,img,,,,\n", 1, "image", "not a regular file"),
    "mask_missing": (HEADER + "s1,a,img/a.nii.gz,lab/b.nii.gz,,,\n", 1, "mask", "not found"),
    "empty_subject": (HEADER + ",a,img/a.nii.gz,,,,\n", 1, "subject_id", "empty"),
    "too_many_fields": (HEADER + GOOD + "s1,b,img/b.nii.gz,,,,,extra\n", 2, None,
                        "more fields"),
}


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_read_rejects(kind, study):
  text, row, column, reason = BAD_MANIFESTS[kind]
  path = _write(study, text)
  with pytest.raises(ManifestError) as err:
    manifest.read_manifest(path)
  assert (err.value.row, err.value.column) == (row, column)
  message = str(err.value)
  assert str(path) in message and reason in message and "\n" not in message
  if row is not None:
    assert f"row {row}" in message


def test_read_missing_manifest(tmp_path):
  with pytest.raises(ManifestError, match="manifest file not found"):
    manifest.read_manifest(tmp_path / "none.csv")


def _cohort(n_subjects: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for s in range(n_subjects):
    for t in range(int(rng.integers(1, 4))):
      rows.append({"subject_id": f"sub{s:03d}", "scan_id": f"sub{s:03d}_t{t}",
                   "image": "x", "split": None})
  return rows


def test_assign_splits_grouped_and_proportional():
  rows = _cohort(150, seed=1)
  rows[0]["split"] = "test"  # pre-assigned: its subject follows it
  out = manifest.assign_splits(rows, seed=7)
  assert rows[1]["split"] is None  # input untouched
  by_subject = collections.defaultdict(set)
  for row in out:
    by_subject[row["subject_id"]].add(row["split"])
  assert all(len(s) == 1 for s in by_subject.values())
  assert by_subject["sub000"] == {"test"}
  counts = collections.Counter(r["split"] for r in out)
  n = len(out)
  for split, fraction in zip(manifest.SPLITS, (0.6, 0.2, 0.2)):
    assert abs(counts[split] / n - fraction) < 0.03, counts
  # Deterministic, independent of row order, and seed-dependent.
  again = manifest.assign_splits(list(reversed(rows)), seed=7)
  assert {r["scan_id"]: r["split"] for r in again} == {r["scan_id"]: r["split"] for r in out}
  other = manifest.assign_splits(rows, seed=8)
  assert [r["split"] for r in other] != [r["split"] for r in out]


def test_assign_splits_rejects_bad_fractions():
  with pytest.raises(ValueError, match="fractions"):
    manifest.assign_splits(_cohort(3, 0), seed=0, fractions=(0.5, 0.2, 0.2))


def _challenge_tree(root: Path) -> None:
  for site, scan, with_mask in [("Utrecht", "10", True), ("Utrecht", "2", True),
                                ("Singapore", "50", False)]:
    _touch(root / site / scan / "pre" / "FLAIR.nii.gz")
    _touch(root / site / scan / "pre" / "T1.nii.gz")
    if with_mask:
      _touch(root / site / scan / "wmh.nii.gz")
  _touch(root / "Utrecht" / "notes" / "readme.txt")


def test_from_challenge_layout(tmp_path):
  _challenge_tree(tmp_path / "wmh")
  rows = manifest.from_challenge_layout(tmp_path / "wmh")
  assert [r["scan_id"] for r in rows] == ["Singapore_50", "Utrecht_2", "Utrecht_10"]
  s50, u2, _ = rows
  assert s50["subject_id"] == "Singapore_50" and s50["mask"] is None
  assert s50["site"] == "Singapore" and s50["dataset"] == "Singapore"
  assert u2["image"] == str(tmp_path / "wmh" / "Utrecht" / "2" / "pre" / "FLAIR.nii.gz")
  assert u2["mask"] == str(tmp_path / "wmh" / "Utrecht" / "2" / "wmh.nii.gz")
  named = manifest.from_challenge_layout(tmp_path / "wmh", dataset="wmh_challenge")
  assert {r["dataset"] for r in named} == {"wmh_challenge"}


def test_from_challenge_layout_empty(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ManifestError, match="no <site>/<id>/pre/FLAIR"):
    manifest.from_challenge_layout(tmp_path / "empty")


def test_from_globs_pairs_by_id_and_by_order(tmp_path):
  for s in ("sub-02", "sub-01", "sub-10"):
    _touch(tmp_path / "bids" / s / "anat" / "FLAIR.nii.gz")
    _touch(tmp_path / "bids" / s / "anat" / "wmh.nii.gz")
  rows = manifest.from_globs(str(tmp_path / "bids/*/anat/FLAIR.nii.gz"),
                             str(tmp_path / "bids/**/wmh.nii.gz"))
  assert [r["scan_id"] for r in rows] == ["sub-01", "sub-02", "sub-10"]
  assert all(Path(r["mask"]).parent == Path(r["image"]).parent for r in rows)
  for s in ("b", "a"):
    _touch(tmp_path / "flat" / f"{s}_FLAIR.nii")
    _touch(tmp_path / "flat" / f"{s}_wmh.nii")
  rows = manifest.from_globs(str(tmp_path / "flat/*_FLAIR.nii"),
                             str(tmp_path / "flat/*_wmh.nii"))
  assert [(r["scan_id"], Path(r["mask"]).name) for r in rows] == [
      ("a_FLAIR", "a_wmh.nii"), ("b_FLAIR", "b_wmh.nii")]
  assert manifest.from_globs(str(tmp_path / "flat/*_FLAIR.nii"))[0]["mask"] is None


def test_from_globs_errors(tmp_path):
  _touch(tmp_path / "a.nii")
  _touch(tmp_path / "b.nii")
  _touch(tmp_path / "m" / "a.nii")
  with pytest.raises(ManifestError, match="1 masks for 2 images"):
    manifest.from_globs(str(tmp_path / "*.nii"), str(tmp_path / "m/*.nii"))
  with pytest.raises(ManifestError, match="no files match"):
    manifest.from_globs(str(tmp_path / "*.mgz"))


def test_cli_import_challenge(tmp_path, capsys):
  _challenge_tree(tmp_path / "wmh")
  out = tmp_path / "m.csv"
  assert manifest.main(["import-challenge", str(tmp_path / "wmh"), f"--out={out}",
                        "--seed=3"]) == 0
  rows = manifest.read_manifest(out)
  assert len(rows) == 3 and all(r["split"] in manifest.SPLITS for r in rows)
  assert "wrote 3 rows" in capsys.readouterr().out
  assert manifest.main(["import-challenge", str(tmp_path / "none"), f"--out={out}"]) == 1


def test_cli_import_glob_and_validate(tmp_path, write_nifti, capsys):
  image = np.ones((16, 16, 8), np.float32)
  labels = np.zeros((16, 16, 8), np.int16)
  labels[4:8, 4:8, 2:4] = 1
  write_nifti("scans/a.nii.gz", image)
  write_nifti("scans/b.nii.gz", image)
  write_nifti("labels/a.nii.gz", labels)
  write_nifti("labels/b.nii.gz", labels * 3)  # bad label value
  out = tmp_path / "m.csv"
  assert manifest.main(["import-glob", f"--images={tmp_path}/scans/*.nii.gz",
                        f"--masks={tmp_path}/labels/*.nii.gz", f"--out={out}"]) == 0
  assert [r["scan_id"] for r in manifest.read_manifest(out)] == ["a", "b"]
  capsys.readouterr()
  assert manifest.main(["validate", str(out)]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and "labels/b.nii.gz" in lines[0] and "3.0" in lines[0]
  write_nifti("labels/b.nii.gz", labels)
  assert manifest.main(["validate", str(out)]) == 0


def test_cli_help_and_bad_flags(capsys):
  """absl flags on the command's own FlagValues: --help lists them even though --out and the
  command are missing; an unknown flag is a usage error (exit 2), as it was under argparse."""
  with pytest.raises(SystemExit) as exit_info:
    manifest.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m wmh_jax.data.manifest [flags] import-challenge")
  assert "--mask_desc" in out and "--compilation_cache" in out
  with pytest.raises(SystemExit) as exit_info:
    manifest.main(["validate", "m.csv", "--nope=1"])
  assert exit_info.value.code == 2
  assert "Unknown command line flag 'nope'" in capsys.readouterr().err
  assert manifest.main(["frobnicate"]) == 2
