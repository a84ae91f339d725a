"""One prepared accelerator benchmark, start to end in under 8 minutes on one GPU.

Usage (on the device machine, after ``bench/device.sh install``)::

  python -m bench.device [--out=bench/results_gpu.md] [--scans=160] [--train_seconds=120]
  python -m bench.device --smoke      # the same code path on CPU at a tiny grid (CI)

In order, rewriting the report after every measurement (an interrupted run
keeps what it measured):

1. builds a small built-in synthetic cohort (``--scans`` local scans) on the
   host's cores and preprocesses it to the paper grid (112x128x32);
2. times the weak (GP-Unet) and strong (U-Net) training steps of
   ``experiments/<kind>.py`` at the paper grid (32 filters), in float32 and
   bfloat16 compute, at batch 4 and at the largest batch that fits (estimated
   from XLA's memory analysis of batch 4 and the device's memory, halved on
   failure): s/step, scans/s, voxels/s, TFLOP/s per device and MFU
   (`wmh_jax.training.throughput`), compile time;
3. times the real Grain loader on the cohort (`bench.loader`) with 1, 2 and
   all cores, and the step time below which it is the bottleneck;
4. trains weak and strong (``--train_dtype``) for about ``--train_seconds``
   each with ``python -m wmh_jax.main``'s loop (`wmh_jax.training.train.run`): the
   validation curve, the run's scans/s, MFU and data-wait share.

``--smoke`` shrinks everything (12 scans, 16x16x8 grid, 2 filters, the step
of weak in float32 only, one training run of weak for one epoch) so that the
whole path runs on a CPU in about a minute, in CI; its figures mean nothing.
(The strong kind trains in bfloat16 in tests/test_predict.py's fixture.)
"""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags

from bench import loader, report, training
from wmh_jax import configs
from wmh_jax.data import pipeline, records
from wmh_jax.runtime import cli
from wmh_jax.training import logs, throughput, train

KINDS = ("weak", "strong")
DTYPES = ("float32", "bfloat16")
# --smoke times one setting, not four: each step size costs two XLA compilations on CI's
# CPU. Its training runs cover the other kind and bfloat16.
SMOKE_SETTINGS = (("weak", "float32"),)
MAX_BATCH = 256
# Share of the device memory that the largest batch's XLA temporaries may use.
MEMORY_SHARE = 0.8

def experiment_config(kind: str, smoke: bool, root: Path, scans: int) -> ml_collections.ConfigDict:
  """``experiments/<kind>.py`` at the paper grid (smoke: 16x16x8, 2 filters) on ``root``'s cohort."""
  config = configs.load_config_file(str(Path(__file__).resolve().parents[1] / "experiments" /
                                     f"{kind}.py"))
  config.data.cohort_dir = str(root / "cohort")
  config.data.cache_dir = str(root / "cache")
  config.data.cohort_n_local = scans
  config.loader.worker_count = -1
  if smoke:
    config.data.shape = (16, 16, 8)
    config.data.spacing_mm = (11.2, 11.2, 16.8)
    config.model.base_filters = 2
  return config


def tiled_batch(shape: Sequence[int], batch_size: int) -> dict[str, np.ndarray]:
  """`training.synthetic_batch` repeated to ``batch_size`` rows (a multiple of its 4)."""
  base = training.synthetic_batch(tuple(shape))
  reps = -(-batch_size // training.BATCH)
  return {k: np.concatenate([v] * reps)[:batch_size] for k, v in base.items()}


def device_memory_bytes() -> int | None:
  """The default device's memory limit (``memory_stats()["bytes_limit"]``); None on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def largest_batch_guess(temp_bytes_at_4: int | None, memory: int | None) -> int:
  """A multiple of 4 whose temporaries (linear in the batch) fill `MEMORY_SHARE` of memory;
  8 where either figure is unknown (CPU)."""
  if not temp_bytes_at_4 or not memory:
    return 8
  per_scan = temp_bytes_at_4 / training.BATCH
  return int(min(MAX_BATCH, max(8, MEMORY_SHARE * memory // per_scan // 4 * 4)))


class DeviceBench:
  """The measurements and the report they fill in."""

  def __init__(self, root: Path, out: Path, smoke: bool):
    self.root, self.out, self.smoke = root, out, smoke
    device = jax.devices()[0]
    self.report = report.Report("wmh-jax on an accelerator", [
        f"command: `{' '.join(['python -m bench.device', *sys.argv[1:]])}`",
        f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"JAX {jax.__version__}, backend `{jax.default_backend()}`, {jax.device_count()} "
        f"device(s) of kind `{device.device_kind}` (steps timed on 1), "
        f"{pipeline.available_cores()} host cores",
    ])
    if smoke:
      self.report.preamble.append("SMOKE RUN: tiny grid and network; the figures mean nothing")
    self.step_rows: list[list[object]] = []
    self.step_times: dict[tuple[str, str], float] = {}

  def save(self) -> None:
    self.report.write(self.out)

  def cohort(self, scans: int) -> list[dict]:
    """Builds and preprocesses the cohort; returns the training records."""
    start = time.perf_counter()
    config = experiment_config("weak", self.smoke, self.root, scans)
    splits = records.split_records(records.load_records(records.training_manifest(config), config))
    seconds = time.perf_counter() - start
    self.report.preamble.append(
        f"cohort: {scans} local scans built and preprocessed to "
        f"{'x'.join(map(str, config.data.shape))} in {seconds:.0f} s "
        f"({len(splits['train'])} train, {len(splits['val'])} val)")
    self.save()
    return splits["train"]

  def steps(self, repeats: int) -> None:
    """Training-step table: kind x dtype x (batch 4, largest batch)."""
    headers = ("model", "compute", "batch", "s/step", "scans/s", "M voxels/s",
               "TFLOP/s per device", "MFU", "compile s", "XLA temporaries GiB")
    section = report.Section("Training step (forward + backward + Adam), one device",
                             report.markdown_table(headers, []),
                             ["median of the timed steps after 1 warm-up; MFU against the "
                              "device's dense peak at the compute dtype (`wmh_jax.training.throughput`)"])
    self.report.sections.append(section)
    memory = device_memory_bytes()
    for kind, dtype in SMOKE_SETTINGS if self.smoke else itertools.product(KINDS, DTYPES):
      config = experiment_config(kind, self.smoke, self.root, 0)
      config.model.dtype = dtype
      first = self._time_step(config, training.BATCH, repeats, section)
      if first is None:
        continue
      self.step_times[(kind, dtype)], temp_bytes = first
      batch = largest_batch_guess(temp_bytes, memory)
      while batch > training.BATCH and self._time_step(config, batch, repeats, section) is None:
        batch = batch // 2 // 4 * 4
      section.table = report.markdown_table(headers, self.step_rows)
      self.save()

  def _time_step(self, config: ml_collections.ConfigDict, batch_size: int, repeats: int,
                 section: report.Section) -> tuple[float, int | None] | None:
    """Times one setting and adds its row; (median s/step, XLA temporaries in bytes), or
    None if it failed."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = batch_size
    label = f"{config.model.kind} {config.model.dtype} batch {batch_size}"
    print(f"[step] {label}", flush=True)
    try:
      step = training.JaxStep(config, tiled_batch(config.data.shape, batch_size))
      warmup, times = report.measure(step.run, repeats)
    except Exception as err:  # pylint: disable=broad-except  (out of memory, mostly)
      section.notes.append(f"{label}: failed ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0][:160]})")
      gc.collect()
      return None
    del warmup
    median = statistics.median(times)
    voxels = int(np.prod(config.data.shape))
    name, peak = throughput.step_peak(jax.devices()[0], config.model.dtype, 1)
    cost = throughput.StepCost(batch_size=batch_size, voxels_per_scan=voxels, num_devices=1,
                               flops=step.flops, peak_name=name, peak_tflops=peak)
    rates = cost.rates(median)
    temp_bytes = step.temp_bytes
    self.step_rows.append([
        config.model.kind, config.model.dtype, batch_size, report.fmt(median),
        report.fmt(rates["scans_per_s"]), report.fmt(rates["voxels_per_s"] / 1e6),
        report.fmt(rates.get("tflops_per_device")),
        f"{100 * rates['mfu']:.1f}% of {name}" if "mfu" in rates else "—",
        report.fmt(step.compile_s),
        report.fmt(step.temp_bytes / 2**30) if step.temp_bytes else "—"])
    del step
    gc.collect()
    return median, temp_bytes

  def loader(self, train_records: list[dict]) -> None:
    """Loader throughput on the cohort with 1, 2 and all cores."""
    config = experiment_config("weak", self.smoke, self.root, 0)
    results = [loader.loader_throughput(train_records, config, workers, 12 if self.smoke else 40)
               for workers in loader.worker_counts("1,2,all")]
    section = loader.section(results, config.data.shape)
    fastest = min(self.step_times.values(), default=None)
    if fastest:
      section.notes.append(f"fastest batch-4 step above: {1e3 * fastest:.1f} ms")
    self.report.sections.append(section)
    self.save()

  def training(self, scans: int, seconds: float, dtype: str, n_train: int) -> None:
    """Trains weak and strong for about ``seconds`` each; validation curves and run rates."""
    headers = ("model", "compute", "epochs", "steps", "scans/s", "MFU", "data wait",
               "compile s", "validation (epoch: score)")
    rows = []
    section = report.Section(f"Training runs (`wmh_jax.training.train.run`, {dtype}, batch 4)",
                             report.markdown_table(headers, rows),
                             ["score: weak val ICC(2,1), strong val Dice; rates are the run's "
                              "median interval (timing.jsonl summary)"])
    self.report.sections.append(section)
    for kind in KINDS[:1] if self.smoke else KINDS:
      config = experiment_config(kind, self.smoke, self.root, scans)
      config.model.dtype = dtype
      steps_per_epoch = max(1, n_train // config.train.batch_size)
      step_s = self.step_times.get((kind, dtype), 1.0)
      config.train.num_epochs = (1 if self.smoke else
                                 int(min(200, max(2, seconds / step_s / steps_per_epoch))))
      workdir = self.root / "runs" / kind
      print(f"[train] {kind}: {config.train.num_epochs} epochs", flush=True)
      train.run(config, workdir)
      summary = _summary(workdir / "timing.jsonl")
      evals = logs.validation_records(workdir / "metrics.jsonl")
      curve = ", ".join(f"{e['epoch']}: {e['val_score']:.3f}" for e in evals)
      rows.append([kind, dtype, config.train.num_epochs, config.train.num_epochs * steps_per_epoch,
                   report.fmt(summary.get("scans_per_s")),
                   f"{100 * summary['mfu']:.1f}%" if "mfu" in summary else "—",
                   f"{100 * summary['data_wait_share']:.1f}%" if "data_wait_share" in summary
                   else "—", report.fmt(summary.get("compile_s")), curve])
      section.table = report.markdown_table(headers, rows)
      self.save()


def _summary(path: Path) -> dict:
  """The last summary record of a run's ``timing.jsonl`` ({} if none)."""
  lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  summaries = [line for line in lines if line.get("summary")]
  return summaries[-1] if summaries else {}


def define_flags() -> None:
  """The CLI's absl flags (defined only when run as a program, never on import)."""
  flags.DEFINE_string("out", "bench/results_gpu.md", "Markdown report path")
  flags.DEFINE_bool("smoke", False, "tiny grid on any backend: exercise the code path")
  flags.DEFINE_integer("scans", 160, "local scans of the built-in cohort")
  flags.DEFINE_integer("repeats", 10, "timed steps per setting (median)")
  flags.DEFINE_float("train_seconds", 120.0, "training time per kind, about")
  flags.DEFINE_enum("train_dtype", "bfloat16", DTYPES, "compute dtype of the training runs")
  flags.DEFINE_string("workdir", None, "cohort, cache and runs (default: a temp dir)")
  cli.define_runtime_flags()


def run(out: Path, *, smoke: bool, scans: int, repeats: int, train_seconds: float,
        train_dtype: str, workdir: Path | None = None) -> None:
  """Every measurement of the module docstring, into the Markdown report ``out``."""
  if smoke:
    scans, repeats = 12, 2
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="wmh_bench_device_") as temporary:
    bench = DeviceBench(Path(workdir or temporary), out, smoke)
    bench.save()
    phases = []
    clock = time.perf_counter()

    def done(name: str) -> None:
      nonlocal clock
      phases.append(f"{name} {time.perf_counter() - clock:.0f} s")
      clock = time.perf_counter()
      print(f"[device] {phases[-1]}", flush=True)

    train_records = bench.cohort(scans)
    done("cohort")
    bench.steps(repeats)
    done("steps")
    bench.loader(train_records)
    done("loader")
    bench.training(scans, train_seconds, train_dtype, len(train_records))
    done("training runs")
    bench.report.preamble.append(f"wall time {time.perf_counter() - start:.0f} s: "
                                 + ", ".join(phases))
    bench.save()


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  cli.start_from_flags()
  run(Path(args.out), smoke=args.smoke, scans=args.scans, repeats=args.repeats,
      train_seconds=args.train_seconds, train_dtype=args.train_dtype,
      workdir=Path(args.workdir) if args.workdir else None)
  print(f"wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
