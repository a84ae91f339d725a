"""Host input pipeline throughput: the real Grain training loader, by worker count.

Usage::

  python -m bench.loader [--scans=16] [--batches=30] [--workers=1,2,all]
      [--out=bench/results_loader.md]

Times ``wmh_jax.data.pipeline.make_train_iterator`` (read the cached record,
draw and apply the paper's augmentation: rotation ±54°, translation ±20 %,
left-right flip; batch 4) at the paper grid 112x128x32, with 1, 2 and all
of the host's cores as Grain worker processes. A loader that yields ``p``
image+mask pairs per second keeps up with a train step of batch ``B`` as long
as the step takes at least ``B / p`` seconds: the table gives that step time.
The scans are `bench.host.phantom` volumes written as NIfTI and preprocessed
into the project's cache, so the loader reads exactly what training reads.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags

from bench import host, report
from wmh_jax import configs
from wmh_jax.data import cache, pipeline, records

BATCH = 4


@dataclasses.dataclass(frozen=True)
class LoaderResult:
  """Steady-state throughput of the training loader with ``workers`` worker processes.

  Attributes:
    workers: Grain worker processes (0: in the main process).
    pairs_per_s: augmented image+mask pairs per second.
    batches: batches timed.
  """
  workers: int
  pairs_per_s: float
  batches: int

  def bottleneck_step_s(self, batch_size: int = BATCH) -> float:
    """The step time below which this loader, not the device, limits training."""
    return batch_size / self.pairs_per_s


def phantom_records(directory: Path, count: int, config: ml_collections.ConfigDict
                    ) -> list[dict]:
  """``count`` `bench.host.phantom` scans on ``config``'s grid, cached as training records."""
  shape = tuple(int(s) for s in config.data.shape)
  spacing = tuple(float(s) for s in config.data.spacing_mm)
  affine = np.diag([*spacing, 1.0])
  rows = []
  for index in range(count):
    image, mask = host.phantom(shape, spacing, seed=index)
    paths = directory / f"p{index:03d}_flair.nii.gz", directory / f"p{index:03d}_wmh.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), paths[1])
    rows.append({"subject_id": f"p{index:03d}", "scan_id": f"p{index:03d}",
                 "image": str(paths[0]), "mask": str(paths[1])})
  cached, failures = cache.preprocessed_records(rows, records.preprocess_spec(config),
                                                directory / "cache")
  if failures:
    raise RuntimeError(f"phantom preprocessing failed: {failures}")
  return cached


def loader_throughput(train_records: Sequence[dict], config: ml_collections.ConfigDict,
                      workers: int, batches: int) -> LoaderResult:
  """Pairs/s of the training iterator with ``workers`` processes, in steady state.

  One batch per worker is drawn first (worker start-up), then ``batches``
  more; the rate counts only those after the first ``workers x
  worker_buffer_size`` of them, which the workers may have buffered already.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.loader.worker_count = workers
  iterator = pipeline.make_train_iterator(train_records, config, seed=0,
                                          batch_size_per_process=BATCH)
  try:
    for _ in range(max(workers, 1)):
      next(iterator)
    buffered = workers * int(config.loader.worker_buffer_size)
    if batches <= buffered + 1:
      raise ValueError(f"--batches={batches} must exceed the {buffered} buffered batches + 1")
    stamps = []
    for _ in range(batches):
      next(iterator)
      stamps.append(time.perf_counter())
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
  timed = batches - 1 - buffered
  return LoaderResult(workers, timed * BATCH / (stamps[-1] - stamps[buffered]), timed)


def worker_counts(spec: str) -> list[int]:
  """``"1,2,all"`` -> [1, 2, cores] (deduplicated, in order); 'all' = the usable cores."""
  counts: list[int] = []
  for item in spec.split(","):
    count = pipeline.available_cores() if item.strip() == "all" else int(item)
    if count < 0:
      raise ValueError(f"worker counts must be >= 0, got {count}")
    if count not in counts:
      counts.append(count)
  return counts


def section(results: Sequence[LoaderResult], grid: Sequence[int]) -> report.Section:
  """The loader table: pairs/s, and the step time below which the loader is the bottleneck."""
  rows = [[r.workers, report.fmt(r.pairs_per_s), report.fmt(r.pairs_per_s / max(r.workers, 1)),
           report.fmt(1e3 * r.bottleneck_step_s()), r.batches] for r in results]
  return report.Section(
      f"Training loader at {'x'.join(map(str, grid))} (real Grain pipeline, batch {BATCH})",
      report.markdown_table(("worker processes", "pairs/s", "pairs/s per worker",
                             f"loader-bound below (ms/step at batch {BATCH})", "batches timed"),
                            rows),
      [f"{pipeline.available_cores()} usable cores; paper augmentation (rotation ±54°, "
       "translation ±20 %, left-right flip); read + augment + batch, steady state",
       "a train step faster than the last column waits for data at that worker count"])


def define_flags() -> None:
  """The CLI's absl flags (defined only when run as a program, never on import)."""
  flags.DEFINE_integer("scans", 16, "phantom scans in the loader's dataset")
  flags.DEFINE_integer("batches", 30, "batches drawn per worker count")
  flags.DEFINE_string("workers", "1,2,all", "worker counts to time ('all' = cores)")
  flags.DEFINE_string("out", "bench/results_loader.md", "Markdown report path")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  config = configs.get_config()
  command = " ".join(["python -m bench.loader", *sys.argv[1:]])
  out = report.Report("wmh-jax training loader", [f"command: `{command}`"])
  with tempfile.TemporaryDirectory(prefix="wmh_bench_loader_") as directory:
    train_records = phantom_records(Path(directory), args.scans, config)
    results = []
    for workers in worker_counts(args.workers):
      results.append(loader_throughput(train_records, config, workers, args.batches))
      print(f"[loader] {workers} workers: {results[-1].pairs_per_s:.1f} pairs/s", flush=True)
  out.sections.append(section(results, config.data.shape))
  out.write(Path(args.out))
  print(f"wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
