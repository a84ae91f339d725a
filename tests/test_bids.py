"""BIDS in: the entity grammar, `import-bids` on a small tree with bad files beside good ones."""

from __future__ import annotations

import os

import numpy as np
import pytest

from wmh_jax.data import bids, manifest
from wmh_jax.errors import InputError, ManifestError


def test_parse_name_reads_entities_suffix_and_extension():
  name = bids.parse_name("x/sub-01_ses-baseline_acq-3D_run-2_FLAIR.nii.gz")
  assert name.entities == {"sub": "01", "ses": "baseline", "acq": "3D", "run": "2"}
  assert (name.suffix, name.extension) == ("FLAIR", ".nii.gz")
  assert (name.subject, name.session) == ("sub-01", "ses-baseline")
  assert name.folder().as_posix() == "sub-01/ses-baseline"
  derived = bids.parse_name("sub-01_ses-baseline_run-2_space-orig_desc-wmh_mask.nii")
  assert derived.source_entities() == {"sub": "01", "ses": "baseline", "run": "2"}
  assert derived.stem() == "sub-01_ses-baseline_run-2_space-orig_desc-wmh"
  assert bids.parse_name("sub-7_FLAIR.nii").session is None


@pytest.mark.parametrize("name, reason", [
    ("sub-01_FLAIR.mgz", "must end in .nii.gz or .nii"),
    ("sub-01_ses-1_FLAIR-x.nii.gz", "suffix 'FLAIR-x'"),
    ("sub-01_ses1_FLAIR.nii.gz", "'ses1' is not key-value"),
    ("sub-01_foo-1_FLAIR.nii.gz", "unknown entity 'foo'"),
    ("sub-01_ses-1_ses-2_FLAIR.nii.gz", "entity 'ses' appears twice"),
    ("sub-01_run-1_acq-a_FLAIR.nii.gz", "entity 'acq' is out of order"),
    ("sub-0_1_FLAIR.nii.gz", "'1' is not key-value"),
    ("sub-01_run-a_FLAIR.nii.gz", "run-'a' must be digits only"),
    ("sub-0.1_FLAIR.nii.gz", "sub-'0.1' must be letters and digits only"),
    ("ses-1_FLAIR.nii.gz", "must start with sub-<label>"),
])
def test_parse_name_rejects_each_grammar_error_with_its_reason(name, reason):
  with pytest.raises(InputError) as err:
    bids.parse_name(name)
  assert name in str(err.value) and reason in str(err.value)
  assert "\n" not in str(err.value)


@pytest.fixture
def bids_tree(tmp_path, write_nifti):
  """A BIDS dataset: two good scans (one with a session) with masks in a derivatives
  folder, a second session with no mask, and four bad files; participants.tsv."""
  image = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
  root = tmp_path / "ds"
  (root).mkdir()
  (root / "dataset_description.json").write_text('{"Name": "tiny ds", "BIDSVersion": "1.10.0"}')
  (root / "participants.tsv").write_text("participant_id\tage\tsex\n"
                                         "sub-01\t71\tF\nsub-02\tn/a\tM\n")
  good = [write_nifti("ds/sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz", image),
          write_nifti("ds/sub-01/ses-2/anat/sub-01_ses-2_FLAIR.nii.gz", image),
          write_nifti("ds/sub-02/anat/sub-02_FLAIR.nii.gz", image)]
  write_nifti("ds/sub-02/anat/sub-02_T1w.nii.gz", image)  # another suffix: not imported
  bad = {"ds/sub-03/anat/sub-03_acq-x_run-1_ce-y_FLAIR.nii.gz": "entity 'ce' is out of order",
         "ds/sub-04/anat/sub-05_FLAIR.nii.gz": "in the wrong folder for its name"}
  for relative in bad:
    write_nifti(relative, image)
  dangling = root / "sub-06" / "anat" / "sub-06_FLAIR.nii.gz"
  dangling.parent.mkdir(parents=True)
  os.symlink(root / ".git" / "annex" / "objects" / "absent", dangling)
  bad[str(dangling.relative_to(tmp_path))] = "a symbolic link to nothing"
  (root / "sub-07" / "anat").mkdir(parents=True)  # a subject without a FLAIR
  masks = [write_nifti(f"ds/derivatives/manual/{p.parent.relative_to(root)}/"
                       f"{p.name.replace('_FLAIR', '_space-orig_desc-wmh_mask')}",
                       (image > 0.9).astype(np.uint8))
           for p in (good[0], good[2])]
  write_nifti("ds/derivatives/manual/sub-02/anat/sub-02_space-orig_desc-brain_mask.nii.gz",
              (image > 0.1).astype(np.uint8))  # another desc: ignored
  return {"root": root, "good": good, "bad": bad, "masks": masks,
          "derivatives": root / "derivatives" / "manual"}


def test_from_bids_imports_the_good_scans_and_names_each_bad_file(bids_tree, tmp_path):
  rows, problems = bids.from_bids(bids_tree["root"], bids_tree["derivatives"])
  assert [r["scan_id"] for r in rows] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
  assert [r["subject_id"] for r in rows] == ["sub-01", "sub-01", "sub-02"]
  assert [r["session"] for r in rows] == ["ses-1", "ses-2", ""]
  assert [r["image"] for r in rows] == [str(p) for p in bids_tree["good"]]
  masks = bids_tree["masks"]
  assert [r["mask"] for r in rows] == [str(masks[0]), None, str(masks[1])]
  assert [(r["age"], r["sex"]) for r in rows] == [("71", "F"), ("71", "F"), ("", "M")]
  assert {r["dataset"] for r in rows} == {"tiny ds"}
  # One line per skipped file, naming it and the reason; the second session has no mask.
  assert all("\n" not in line for line in problems)
  for relative, reason in bids_tree["bad"].items():
    assert [line for line in problems if str(tmp_path / relative) in line and reason in line]
  assert [line for line in problems if "sub-07" in line and "no *_FLAIR" in line]
  assert [line for line in problems if str(bids_tree["good"][1]) in line and "no desc-wmh mask"
          in line]
  assert len(problems) == 5


def test_import_bids_cli_writes_a_manifest_that_validates(bids_tree, tmp_path, capsys):
  out = tmp_path / "manifest.csv"
  status = manifest.main(["import-bids", str(bids_tree["root"]),
                          f"--derivatives={bids_tree['derivatives']}", f"--out={out}"])
  assert status == 0
  captured = capsys.readouterr()
  assert "wrote 3 rows" in captured.out and "5 file(s) skipped or without a mask" in captured.out
  assert "entity 'ce' is out of order" in captured.err
  rows = manifest.read_manifest(out)
  assert [r["scan_id"] for r in rows] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
  assert len({r["split"] for r in rows if r["subject_id"] == "sub-01"}) == 1  # by subject
  assert rows[0]["age"] == "71" and rows[0]["mask"] == str(bids_tree["masks"][0])
  assert manifest.validate(out) == []


def test_from_bids_without_any_usable_scan_is_one_error(tmp_path, write_nifti):
  write_nifti("empty/sub-01/anat/sub-01_acq_FLAIR.nii.gz", np.zeros((4, 4, 4)))
  with pytest.raises(ManifestError) as err:
    bids.from_bids(tmp_path / "empty")
  assert "no usable" in str(err.value) and "'acq' is not key-value" in str(err.value)
  with pytest.raises(ManifestError, match="not a directory"):
    bids.from_bids(tmp_path / "absent")
