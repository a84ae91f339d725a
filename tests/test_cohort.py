"""Tests for the built-in synthetic cohort (tiny sizes, coarse voxels)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from wmh_jax.data import cohort, manifest, nifti
from wmh_jax.data.synthetic import anatomy, render, sites, subjects, summary

COARSE = 2.5  # voxel-size multiplier: ~8x fewer voxels than the real sites
SIZES = {"wmhseg": 3, "longmsles": 5, "msseg": 2, "msles": 2}
N_LOCAL = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
  """Manifests of a tiny five-domain cohort (18 scans), generated in-process."""
  return cohort.ensure_cohort(tmp_path_factory.mktemp("cohort"), N_LOCAL, seed=0, sizes=SIZES,
                              resolution_scale=COARSE, workers=1, progress=False)


def _domain(name: str, n: int | None = None) -> sites.Domain:
  d = sites.DOMAINS[name]
  return dataclasses.replace(d, n_scans=n or d.n_scans)


def test_manifests_load_and_volumes_are_exact(tiny):
  manifests = tiny
  assert list(manifests) == ["local", "wmhseg", "longmsles", "msseg", "msles"]
  for name, path in manifests.items():
    rows = manifest.read_manifest(path)
    assert len(rows) == (N_LOCAL if name == "local" else SIZES[name])
    for row in rows:
      scan = nifti.load_image(row["image"])
      labels = nifti.load_labels(row["mask"], scan)
      assert set(np.unique(labels)) <= {0, 1, 2}
      assert row["wmh_volume_ml"] == nifti.volume_ml(labels == 1, scan.spacing_mm)
      assert 0 <= row["severity"] <= 4 and row["dataset"] == name
      assert row["ventricle_ml"] > 0 and row["white_matter_ml"] > row["ventricle_ml"]
      assert row["csf_ml"] > row["ventricle_ml"]
      if row["wmh_volume_ml"] > 0:
        assert scan.data[labels == 1].mean() > np.median(scan.data[scan.data > 0])
    splits = {r["split"] for r in rows}
    assert splits == ({"train", "val", "test"} if name == "local" else {"test"})
    volumes = [r["wmh_volume_ml"] for r in rows]
    assert [r["severity"] for r in rows] == cohort._severity(volumes)


def test_severity_grades_are_volume_quintiles():
  volumes = [0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 50.0]  # quintile edges 0.8 2.6 4.4 6.2
  assert cohort._severity(volumes) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_other_pathology_is_label_2_and_not_wmh():
  t = anatomy.load_template()
  wmhseg = _domain("wmhseg")
  index = next(i for i in range(20) if any(
      les.kind == "other" for les in subjects.make_subject(wmhseg, i, 0, t).lesions))
  scan = render.generate_scan(wmhseg, index, seed=0, resolution_scale=2.0)
  assert (scan.labels == 2).sum() == (scan.tissue == anatomy.OTHER).sum() > 0
  assert ((scan.labels == 1) == (scan.tissue == anatomy.WMH)).all()
  local = _domain("local")
  assert not any(les.kind == "other" for i in range(20)
                 for les in subjects.make_subject(local, i, 0, t).lesions)


def test_stored_orientation_and_type(tiny):
  manifests = tiny
  import nibabel as nib
  local = manifest.read_manifest(manifests["local"])[0]
  wmhseg = manifest.read_manifest(manifests["wmhseg"])[0]
  assert nib.load(local["image"]).get_data_dtype() == np.uint8
  assert nib.load(wmhseg["image"]).get_data_dtype() == np.float32
  assert nib.load(wmhseg["image"]).affine[0, 0] < 0   # LAS on disk
  assert nifti.load_image(wmhseg["image"]).affine[0, 0] > 0  # RAS after loading


def test_scan_depends_only_on_seed_domain_index(tiny):
  manifests = tiny
  domain = _domain("local", N_LOCAL)
  a = render.generate_scan(domain, 3, seed=0, resolution_scale=COARSE)
  b = render.generate_scan(domain, 3, seed=0, resolution_scale=COARSE)
  c = render.generate_scan(domain, 3, seed=1, resolution_scale=COARSE)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.image, c.image)
  row = manifest.read_manifest(manifests["local"])[3]
  stored = nifti.load_image(row["image"]).data
  np.testing.assert_array_equal(stored, np.clip(a.image, 0, 255).astype(np.float32))


def test_worker_processes_write_identical_files(tiny, tmp_path):
  manifests = tiny
  parallel = cohort.ensure_cohort(tmp_path, N_LOCAL, seed=0, domains=["local"],
                                  resolution_scale=COARSE, workers=2, progress=False)
  one = manifest.read_manifest(manifests["local"])
  two = manifest.read_manifest(parallel["local"])
  for r1, r2 in zip(one, two, strict=True):
    for column in ("wmh_volume_ml", "ventricle_ml", "white_matter_ml", "csf_ml", "split"):
      assert r1[column] == r2[column]
    assert Path(r1["image"]).read_bytes() == Path(r2["image"]).read_bytes()


def test_cache_reuses_current_domains_and_regenerates_changed(tmp_path):
  kwargs = dict(resolution_scale=COARSE, workers=1, progress=False)
  first = cohort.ensure_cohort(tmp_path, 2, 0, ["local", "msles"], sizes={"msles": 1}, **kwargs)
  mtimes = {n: p.stat().st_mtime_ns for n, p in first.items()}
  image = manifest.read_manifest(first["msles"])[0]["image"]
  image_mtime = os.stat(image).st_mtime_ns
  again = cohort.ensure_cohort(tmp_path, 2, 0, ["local", "msles"], sizes={"msles": 1}, **kwargs)
  assert again == first
  assert {n: p.stat().st_mtime_ns for n, p in again.items()} == mtimes
  assert os.stat(image).st_mtime_ns == image_mtime
  cohort.ensure_cohort(tmp_path, 3, 0, ["local", "msles"], sizes={"msles": 1}, **kwargs)
  assert len(manifest.read_manifest(first["local"])) == 3
  assert first["msles"].stat().st_mtime_ns == mtimes["msles"]
  assert not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".*.old"))


def test_flair_contrast_ordering():
  scan = render.generate_scan(_domain("local"), 0, seed=0, resolution_scale=2.0)
  means = {k: scan.image[scan.tissue == k].mean() for k in (anatomy.CSF, anatomy.VENTRICLE,
                                                             anatomy.WM, anatomy.GM, anatomy.WMH)}
  assert means[anatomy.VENTRICLE] < means[anatomy.WM] < means[anatomy.GM] < means[anatomy.WMH]
  assert means[anatomy.CSF] < 0.6 * means[anatomy.WM]
  assert means[anatomy.WMH] > 1.2 * means[anatomy.WM]


def test_longitudinal_domain_repeats_subjects_with_growing_load(tiny):
  manifests = tiny
  rows = manifest.read_manifest(manifests["longmsles"])
  assert len({r["subject_id"] for r in rows}) == 1
  assert [int(r["timepoint"]) for r in rows] == [0, 1, 2, 3, 4]
  assert rows[-1]["wmh_volume_ml"] > rows[0]["wmh_volume_ml"]
  layout = subjects.subject_layout(_domain("longmsles"))
  assert [sum(1 for s, _, _ in layout if s == k) for k in range(5)] == [5, 4, 4, 4, 4]


def test_confounder_correlations_and_summary(tiny):
  manifests = tiny
  rows = [{"wmh_volume_ml": w, "ventricle_ml": v, "white_matter_ml": m, "csf_ml": c}
          for w, v, m, c in [(1, 20, 500, 300), (2, 25, 480, 310), (8, 30, 430, 350),
                             (3, 21, 470, 290)]]
  r = summary.confounder_correlations(rows)
  w = np.array([1, 2, 8, 3.0])
  assert r["ventricle_ml"] == pytest.approx(np.corrcoef(w, [20, 25, 30, 21])[0, 1], abs=1e-12)
  assert r["white_matter_ml"] == pytest.approx(np.corrcoef(w, [500, 480, 430, 470])[0, 1],
                                               abs=1e-12)
  assert np.isnan(summary.confounder_correlations(rows[:2])["csf_ml"])
  text = summary.summarize(manifests)
  local = manifest.read_manifest(manifests["local"])
  r = summary.confounder_correlations(local)
  line = next(s for s in text.splitlines() if s.startswith("local "))
  vols = [x["wmh_volume_ml"] for x in local]
  assert f"{np.median(vols):.2f}" in line and f"{r['ventricle_ml']:.2f}" in line
  assert f"{r['white_matter_ml']:.2f}" in line and "2.50x2.50x7.50" in line


def _juxtacortical_share(scans: list[render.SyntheticScan]) -> float:
  """Share of lesion voxels within 3 mm of cortical grey matter."""
  near, total = 0, 0
  for s in scans:
    outer = ndi.distance_transform_edt(s.tissue != anatomy.CSF, sampling=s.spacing_mm) < 4
    cortex = (s.tissue == anatomy.GM) & outer
    dist = ndi.distance_transform_edt(~cortex, sampling=s.spacing_mm)
    lesion = s.tissue == anatomy.WMH
    near += int((dist[lesion] < 3).sum())
    total += int(lesion.sum())
  return near / total


def test_ms_lesions_are_more_juxtacortical_than_vascular():
  ms = [render.generate_scan(_domain("longmsles"), i, 0, 1.5) for i in range(2)]
  vascular = [render.generate_scan(_domain("local"), i, 0, 1.5) for i in range(2)]
  ms_share, vascular_share = _juxtacortical_share(ms), _juxtacortical_share(vascular)
  assert ms_share > 0.08 and ms_share > 3 * vascular_share


def test_overview_png_and_cli(tiny, tmp_path, capsys):
  manifests = tiny
  png = tmp_path / "overview.png"
  summary.render_overview_png(manifests, png)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert cohort.main([f"--out={tmp_path / 'cli'}", "--n_local=1", "--domains=local",
                      "--workers=1"]) == 0
  out = capsys.readouterr().out
  assert "local" in out and "1.00x1.00x3.00" in out and "MB on disk" in out
  assert cohort.main([f"--out={tmp_path}", "--domains=nope"]) == 1


def test_unknown_domain_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="unknown cohort domain"):
    cohort.ensure_cohort(tmp_path, 2, 0, ["local", "rotterdam"])
