"""Host throughput of the training augmentation with and without domain randomisation.

Usage::

  WMH_JAX_CACHE=$HOME/wmh_cache python -m bench.domain_throughput [--grids=cpu,paper]
      [--samples=24] [--repeats=5] [--out=FILE.md]

Times what a Grain worker does per sample after reading the record
(``pipeline.AugmentRecord.map_with_index``: domain randomisation when on, then
the fused geometric augmentation with each grid's own ``config.augment``), one
thread (numpy/scipy on one core, so samples/s are per core), at the ``:cpu``
grid (56x64x16, 2.8x2.8x8.4 mm; its augmentation is the flip only) and the paper
grid (112x128x32, 1.4x1.4x4.2 mm; shift, rotation, flip). Domain
randomisation is timed with its default ranges and ``probability=1`` (every
step on: the worst case) and with the default ``probability``. Inputs are
local-domain scans of the built-in cohort under ``$WMH_JAX_CACHE/cohort``,
preprocessed to each grid here (half of them treated as weak-only, so the
keep-in-view constraint runs); without a cohort, ``bench.host.phantom``.

Reports the median CPU ms per sample (the time the process held a core: the
per-core figure even on a shared machine), pairs/s per core, CPU ms per batch
of 4, at the ``:cpu`` grid that batch time as a share of the CPU demo's
training step (``--step_s``, 0.55 s for a batch of 4; BUILD_NOTES; the paper
grid's CPU step is ~120 s, bench/results_paper.md), and the wall ms per sample.
This is not a test and is never run by CI.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_name, "1")  # per core; before numpy is imported

# pylint: disable=wrong-import-position
import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from wmh_jax import configs
from wmh_jax.data import domain, manifest, nifti, pipeline, records
from wmh_jax.runtime import fileio

GRIDS = {"cpu": "cpu", "paper": ""}  # name -> config argument
BATCH = 4


def _elements(config, count: int) -> tuple[list[dict], str]:
  """``count`` loaded-record dicts on the config's grid, and where they came from."""
  spec = records.preprocess_spec(config)
  path = fileio.default_cache_root() / "cohort" / "local" / "manifest.csv"
  elements = []
  if path.exists():
    rows = manifest.read_manifest(path)[:count]
    for i, row in enumerate(rows):
      scan = nifti.load_image(row["image"])
      labels = nifti.load_labels(row["mask"], scan) if row.get("mask") else None
      pre = nifti.preprocess(scan, labels, spec)
      mask = pre.mask if pre.mask is not None else np.zeros(spec.shape, np.float32)
      elements.append(_element(pre.image, mask, pre.brain, spec.spacing_mm, i))
    source = f"{len(rows)} local cohort scans ({path})"
  else:
    from bench import host  # pylint: disable=import-outside-toplevel
    for i in range(count):
      image, mask = host.phantom(spec.shape, spec.spacing_mm, seed=i)
      elements.append(_element(image, mask, image > 0, spec.spacing_mm, i))
    source = f"{count} phantoms (no cohort at {path})"
  return elements, source


def _element(image, mask, brain, spacing_mm, index: int) -> dict:
  has_mask = index % 2 == 0
  return {"image": np.asarray(image, np.float32)[..., None],
          "mask": (np.asarray(mask, np.float32) if has_mask
                   else np.zeros(image.shape, np.float32))[..., None],
          "brain": np.asarray(brain, bool), "spacing_mm": np.asarray(spacing_mm, np.float64),
          "volume_ml": np.float32(1.0), "severity": np.int32(0),
          "has_mask": np.float32(has_mask), "record_index": index}


def _ms_per_sample(transform, elements: list[dict], samples: int, repeats: int
                   ) -> tuple[float, float]:
  """Medians over ``repeats`` rounds of ``samples`` calls (after one warm-up round).

  Returns:
    (CPU ms per sample, wall ms per sample). The process's CPU time is the
    time it held a core, so on a shared, oversubscribed machine it is the
    per-core figure; the wall time includes waiting for a core.
  """
  def one_round(offset: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for k in range(samples):
      transform(offset + k, elements[k % len(elements)])
    return (time.process_time() - cpu) / samples, (time.perf_counter() - wall) / samples

  one_round(0)
  rounds = [one_round((r + 1) * samples) for r in range(repeats)]
  return (1e3 * statistics.median(c for c, _ in rounds),
          1e3 * statistics.median(w for _, w in rounds))


def _domain_only(config_domain, elements):
  def run(index: int, element: dict) -> np.ndarray:
    return domain.randomise(domain.domain_rng(0, element["record_index"], index),
                            element["image"][..., 0], element["brain"], element["spacing_mm"],
                            config_domain)
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--grids", default="cpu,paper")
  parser.add_argument("--samples", type=int, default=24, help="samples per timed round")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--scans", type=int, default=8, help="distinct input scans")
  parser.add_argument("--step_s", type=float, default=0.55,
                      help="training step (batch 4) to compare with")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  lines = [f"load average before: {os.getloadavg()[0]:.2f} (2-core machine)", "",
           "| grid | augmentation | CPU ms/sample | pairs/s/core | CPU ms/batch of 4 | of the "
           f":cpu step ({args.step_s} s) | wall ms/sample |", "|---|---|---|---|---|---|---|"]
  sources = []
  for name in args.grids.split(","):
    config = configs.get_config(GRIDS[name])
    elements, source = _elements(config, args.scans)
    sources.append(f"{name}: {source}")
    shape = "x".join(str(n) for n in config.data.shape)
    variants = []
    for label, enabled, probability in (("geometric only (default)", False, None),
                                        ("+ domain, default p", True, None),
                                        ("+ domain, every step (p=1)", True, 1.0)):
      augment = config.augment.copy_and_resolve_references()
      augment.domain.enabled = enabled
      if probability is not None:
        augment.domain.probability = probability
      transform = pipeline.AugmentRecord(0, len(elements), augment)
      variants.append((label, transform.map_with_index))
    every = config.augment.domain.copy_and_resolve_references()
    every.probability = 1.0
    variants.append(("domain alone (p=1)", _domain_only(every, elements)))
    for label, transform in variants:
      ms, wall_ms = _ms_per_sample(transform, elements, args.samples, args.repeats)
      batch_ms = BATCH * ms
      share = f"{100 * batch_ms / (1e3 * args.step_s):.1f} %" if name == "cpu" else "—"
      lines.append(f"| {shape} | {label} | {ms:.2f} | {1e3 / ms:.0f} | {batch_ms:.1f} | "
                   f"{share} | {wall_ms:.2f} |")
      print(lines[-1], flush=True)
  lines += ["", f"load average after: {os.getloadavg()[0]:.2f}", "inputs: " + "; ".join(sources)]
  text = "\n".join(lines)
  print(text)
  if args.out:
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
