"""Built-in synthetic multi-site WMH cohort: the toolkit's embedded default dataset.

Five domains mimic the paper's data (§2.1; :mod:`wmh_jax.data.synthetic.sites`),
each scan made by :mod:`wmh_jax.data.synthetic` (anatomy from the MNI template,
subjects, rendering). This module writes them to disk and keeps them current.

Every scan is a FLAIR-like NIfTI file plus a uint8 label NIfTI (0 background,
1 WMH, 2 other pathology) listed in a per-domain manifest, so the cohort goes
through exactly the same loading/preprocessing code as real data. The
manifest's ``wmh_volume_ml`` equals ``nifti.volume_ml`` of the written mask;
the confounder volumes (``ventricle_ml``: lateral ventricles,
``white_matter_ml``: normal-appearing white matter, ``csf_ml``: all CSF
including the ventricles) are counted from the same tissue label map. Severity
is the volume quintile (0-4) within the domain; ``local`` gets a seeded
60/20/20 split by subject, the external domains ``split=test``. Generation
parameters and ``CODE_VERSION`` are stored per domain (``generation.json``),
and a domain is regenerated only when they change.

Command line::

  python -m wmh_jax.data.cohort --out=DIR --n_local=240 --seed=0 \\
      [--domains=local,wmhseg] [--png=overview.png] [--workers=2]
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from absl import flags

from wmh_jax.data import manifest, nifti
from wmh_jax.data.synthetic import anatomy, render, sites, subjects, summary
from wmh_jax.runtime import cli, fileio


CODE_VERSION = 5  # bump whenever generated files change
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "generation.json"


# ---------------------------------------------------------------------------
# Writing a domain


@dataclasses.dataclass(frozen=True)
class _Task:
  """Everything a worker process needs to write one scan."""
  domain: sites.Domain
  index: int
  seed: int
  resolution_scale: float
  folder: str
  template_cache: str


def _stored(scan: render.SyntheticScan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image, labels, affine) in the site's stored voxel order and image type."""
  image = scan.image
  if scan.site.dtype == "uint8":
    image = np.clip(image, 0, 255).astype(np.uint8)
  if scan.site.orientation == "RAS":
    return image, scan.labels, scan.affine
  affine = scan.affine.copy()
  affine[:3, 3] += affine[:3, 0] * (image.shape[0] - 1)
  affine[:3, 0] *= -1
  return image[::-1], scan.labels[::-1], affine


def _file_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size (mm) as a loader reads it back: column norms of the float32 affine."""
  stored = np.asarray(affine, np.float32).astype(np.float64)
  return tuple(float(s) for s in np.linalg.norm(stored[:3, :3], axis=0))


def _scan_ids(domain: sites.Domain, index: int) -> tuple[str, str, int | None]:
  """(subject_id, scan_id, time point or None)."""
  subject, time_point, _ = subjects.subject_layout(domain)[index]
  if domain.longitudinal:
    sid = f"{domain.name}-s{subject:03d}"
    return sid, f"{sid}-t{time_point}", time_point
  sid = f"{domain.name}-{index:04d}"
  return sid, sid, None


def _write_scan(task: _Task) -> dict[str, Any]:
  """Generates, writes (image + label NIfTI) and describes one scan (manifest row)."""
  domain = task.domain
  scan = render.generate_scan(domain, task.index, task.seed, task.resolution_scale,
                       anatomy.load_template(task.template_cache))
  image, labels, affine = _stored(scan)
  subject_id, scan_id, time_point = _scan_ids(domain, task.index)
  folder = Path(task.folder)
  image_path = folder / "images" / f"{scan_id}_flair.nii.gz"
  mask_path = folder / "masks" / f"{scan_id}_wmh.nii.gz"
  nifti.save_nifti(image_path, image, affine)
  nifti.save_nifti(mask_path, labels, affine)
  spacing = _file_spacing(affine)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  counts = np.bincount(scan.tissue.ravel(), minlength=len(anatomy.TISSUE_NAMES))
  row: dict[str, Any] = {
      "subject_id": subject_id, "scan_id": scan_id, "image": str(image_path),
      "mask": str(mask_path), "wmh_volume_ml": nifti.volume_ml(labels == 1, spacing),
      "severity": None, "dataset": domain.name, "site": scan.site.name, "split": None,
      "ventricle_ml": float(counts[anatomy.VENTRICLE]) * voxel_ml,
      "white_matter_ml": float(counts[anatomy.WM]) * voxel_ml,
      "csf_ml": float(counts[anatomy.CSF] + counts[anatomy.VENTRICLE]) * voxel_ml,
      "lesion_type": domain.lesion_type, "field_strength_t": scan.site.field_strength_t,
      "spacing_mm": "x".join(f"{s:g}" for s in scan.site.spacing_mm),
  }
  if time_point is not None:
    row["timepoint"] = time_point
  return row


def _severity(volumes_ml: Sequence[float]) -> list[int]:
  """Grades 0-4 from the domain's volume quintiles (ties go to the lower grade)."""
  edges = np.quantile(np.asarray(volumes_ml, np.float64), [0.2, 0.4, 0.6, 0.8])
  return [int(np.searchsorted(edges, v, side="left")) for v in volumes_ml]


def _finish_rows(rows: list[dict[str, Any]], domain: sites.Domain, seed: int
                 ) -> list[dict[str, Any]]:
  """Adds severity and split (local: seeded 60/20/20 by subject; others: test)."""
  for row, grade in zip(rows, _severity([r["wmh_volume_ml"] for r in rows])):
    row["severity"] = grade
  if domain.name == "local":
    return manifest.assign_splits(rows, seed, (0.6, 0.2, 0.2))
  for row in rows:
    row["split"] = "test"
  return rows


def _generation_params(domain: sites.Domain, seed: int, resolution_scale: float) -> dict[str, Any]:
  """JSON-ready description of everything that determines a domain's files."""
  params = {"code_version": CODE_VERSION, "seed": seed, "resolution_scale": resolution_scale,
            "domain": dataclasses.asdict(domain)}
  return json.loads(json.dumps(params))


def _is_current(folder: Path, params: dict[str, Any]) -> bool:
  """True when ``folder`` holds a complete domain generated with ``params``."""
  try:
    stored = json.loads((folder / PARAMS_NAME).read_text())
    return stored == params and len(manifest.read_manifest(folder / MANIFEST_NAME)) > 0
  except (OSError, ValueError, manifest.ManifestError):
    return False


def _replace_dir(partial: Path, final: Path) -> None:
  """Moves the finished ``partial`` folder to ``final`` (replacing an old one)."""
  old = final.with_name(f".{final.name}.old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    final.rename(old)
  partial.rename(final)
  shutil.rmtree(old, ignore_errors=True)


def _generate_domain(domain: sites.Domain, seed: int, resolution_scale: float, out_dir: Path,
                     template_cache: Path, pool: Any, progress: bool) -> None:
  """Writes ``out_dir/<domain>/`` (images, masks, manifest, parameters) atomically."""
  from tqdm import tqdm  # noqa: PLC0415  (progress bar only)
  partial = out_dir / f".{domain.name}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  tasks = [_Task(domain, i, seed, resolution_scale, str(partial), str(template_cache))
           for i in range(domain.n_scans)]
  results = pool.imap(_write_scan, tasks, chunksize=2) if pool else map(_write_scan, tasks)
  rows = list(tqdm(results, total=len(tasks), desc=f"cohort {domain.name}", unit="scan",
                   disable=not progress))
  manifest.write_manifest(partial / MANIFEST_NAME, _finish_rows(rows, domain, seed))
  params = _generation_params(domain, seed, resolution_scale)
  fileio.atomic_write_with(partial / PARAMS_NAME,
                           lambda f: f.write(json.dumps(params, indent=1).encode()))
  _replace_dir(partial, out_dir / domain.name)


def cohort_domains(n_local: int, domains: Sequence[str] | None = None,
                   sizes: Mapping[str, int] | None = None) -> list[sites.Domain]:
  """The requested domains with their sizes (``local``: ``n_local``; others: default
  or ``sizes[name]``)."""
  names = list(sites.DOMAINS) if domains is None else list(domains)
  unknown = [n for n in names if n not in sites.DOMAINS]
  if unknown:
    raise ValueError(f"unknown cohort domain(s) {unknown}; choose from {list(sites.DOMAINS)}")
  counts = {**{n: d.n_scans for n, d in sites.DOMAINS.items()}, **(sizes or {}), "local": n_local}
  return [dataclasses.replace(sites.DOMAINS[n], n_scans=int(counts[n])) for n in names]


def ensure_cohort(out_dir: str | os.PathLike, n_local: int, seed: int,
                  domains: Sequence[str] | None = None, *,
                  sizes: Mapping[str, int] | None = None, resolution_scale: float = 1.0,
                  workers: int = 2, progress: bool = True) -> dict[str, Path]:
  """Generates the synthetic cohort where missing or out of date; returns manifests.

  Each domain lives in ``out_dir/<name>/`` (``images/``, ``masks/``,
  ``manifest.csv``, ``generation.json``) and is regenerated only when its
  generation parameters (code version, seed, size, sites, resolution) change.
  Scan ``i`` depends only on (seed, domain, i), so the worker count does not
  change the files.

  Args:
    out_dir: cohort root folder.
    n_local: number of ``local`` (training-domain) scans.
    seed: cohort seed.
    domains: names to ensure (default: all five).
    sizes: scan counts overriding the external domains' defaults.
    resolution_scale: multiplies every voxel size (tests use ~2 for speed).
    workers: processes (spawned) for generation; <= 1 generates in-process.
    progress: show a tqdm progress bar per domain.

  Returns:
    Domain name → absolute manifest path, in ``domains`` order.
  """
  out_dir = Path(os.path.abspath(out_dir))
  todo = cohort_domains(n_local, domains, sizes)
  stale = [d for d in todo
           if not _is_current(out_dir / d.name, _generation_params(d, seed, resolution_scale))]
  if stale:
    template_cache = out_dir / f".template_v{CODE_VERSION}.npz"
    anatomy.load_template(template_cache)
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(min(workers, sum(d.n_scans for d in stale))) if workers > 1 else None
    try:
      for domain in stale:
        _generate_domain(domain, seed, resolution_scale, out_dir, template_cache, pool, progress)
    finally:
      if pool is not None:
        pool.close()
        pool.join()
  return {d.name: out_dir / d.name / MANIFEST_NAME for d in todo}


def define_flags(values: flags.FlagValues) -> None:
  """The command's flags (on its own ``FlagValues``: `runtime.cli.parse_command`)."""
  flags.DEFINE_string("out", None, "cohort folder", required=True, flag_values=values)
  flags.DEFINE_integer("n_local", 240, "local (training) scans", flag_values=values)
  flags.DEFINE_integer("seed", 0, "generation seed", flag_values=values)
  flags.DEFINE_string("domains", ",".join(sites.DOMAINS), "comma-separated names",
                      flag_values=values)
  flags.DEFINE_integer("workers", 2, "worker processes", flag_values=values)
  flags.DEFINE_string("png", None, "write an overview figure here", flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: ensure the cohort, print the summary table, optionally write the PNG."""
  args, _ = cli.parse_command("python -m wmh_jax.data.cohort",
                              "Generate the built-in synthetic WMH cohort.", define_flags, argv)
  names = [n for n in args.domains.split(",") if n]
  start = time.perf_counter()
  try:
    manifests = ensure_cohort(args.out, args.n_local, args.seed, names, workers=args.workers)
  except ValueError as e:
    print(e, file=sys.stderr)
    return 1
  seconds = time.perf_counter() - start
  n_scans = sum(len(manifest.read_manifest(p)) for p in manifests.values())
  print(summary.summarize(manifests))
  print(f"{n_scans} scans, {seconds:.1f} s ({seconds / max(n_scans, 1):.2f} s/scan incl. "
        f"cached), {summary.disk_mb([p.parent for p in manifests.values()]):.0f} MB on disk")
  if args.png:
    summary.render_overview_png(manifests, args.png)
    print(f"overview: {args.png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
