"""Benchmark suite entry point: one run, one Markdown table per measurement.

Usage::

  python -m bench.run [--quick] [--out=bench/results.md] [--shapes=cpu,paper]
      [--repeats=3] [--train_workdir=runs/weak] [--kinds=weak,strong]
      [--torch_formats=channels_last_3d,contiguous] [--torch_threads=2,1]

Times, side by side in one process:

1. the training step (forward + backward + Adadelta, jit, batch 4) of the
   project's GP-Unet (weak) and U-Net (strong) at the CPU-demo grid
   (56x64x16, 8 filters) and the paper grid (112x128x32, 32 filters), and the
   same nets in PyTorch (``bench.torch_reference``, ``pip install -e
   '.[bench]'``), checked for equal parameter counts and output shapes; the
   JAX/PyTorch time ratio; XLA's FLOPs per step, achieved FLOP/s and, on a
   known accelerator, the fraction of its peak;
2. host augmentation throughput (image+mask pairs/s per core at 112x128x32):
   the fused ``augment.apply_affine`` against three sequential scipy
   resamples (and TorchIO / MONAI when installed);
3. the data-wait share of a real training run, from its ``timing.jsonl``;
4. inference seconds per scan through ``wmh_jax.inference.predict`` at the CPU grid.

Medians over ``--repeats`` after one warm-up. ``--quick``: CPU grid only, 2
repeats. The report is rewritten after every measurement, so an interrupted
run keeps what it measured. The paper grid runs last; on CPU it needs many
GB and minutes per step, and is skipped when XLA's memory estimate exceeds
the available memory.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax

from bench import host, report, training
from wmh_jax import configs
from wmh_jax.runtime import host_devices
from wmh_jax.training import throughput

DEFAULT_OUT = Path("bench/results.md")
TRAIN_HEADERS = ("grid, filters", "model", "framework", "params", "s/step (median)",
                 "volumes/s", "first step s", "JAX / this", "GFLOP/step",
                 "achieved TFLOP/s", "of peak")
TRAIN_HINT = ("python -m wmh_jax.main --config=experiments/weak.py:cpu --workdir=runs/weak, "
              "then --train_workdir=runs/weak")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line options; ``--quick`` forces ``--shapes=cpu --repeats=2``."""
  parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="CPU grid only, 2 repeats")
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
  parser.add_argument("--shapes", default="cpu,paper",
                      help=f"grids to train at, from {','.join(training.SHAPES)}")
  parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
  parser.add_argument("--kinds", default="weak,strong", help="models: weak,strong")
  parser.add_argument("--torch_formats", default=",".join(training.TORCH_FORMATS),
                      help="PyTorch memory formats to time (ratios use each)")
  parser.add_argument("--torch_threads", default=str(os.cpu_count() or 1),
                      help="torch.set_num_threads values to time (default: os.cpu_count())")
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="also time the JAX step data-parallel over this many CPU devices "
                           "(the host split by wmh_jax.runtime.host_devices; CPU only)")
  parser.add_argument("--train_workdir", type=Path, default=None,
                      help="a finished training run (or seed sweep) whose timing.jsonl to read")
  args = parser.parse_args(argv)
  if args.quick:
    args.shapes, args.repeats = "cpu", 2
  args.shapes = _choices(parser, "--shapes", args.shapes, tuple(training.SHAPES))
  args.kinds = _choices(parser, "--kinds", args.kinds, ("weak", "strong"))
  args.torch_formats = _choices(parser, "--torch_formats", args.torch_formats,
                                training.TORCH_FORMATS, allow_empty=True)
  try:
    args.torch_threads = [int(n) for n in args.torch_threads.split(",") if n]
  except ValueError:
    args.torch_threads = []
  if not args.torch_threads or min(args.torch_threads) < 1:
    parser.error("--torch_threads: expected comma-separated positive integers")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  return args


def _choices(parser: argparse.ArgumentParser, flag: str, value: str,
             allowed: Sequence[str], allow_empty: bool = False) -> list[str]:
  """Comma-separated ``value`` as a list of ``allowed`` items (exits on a bad one)."""
  items = [v for v in value.split(",") if v]
  bad = [v for v in items if v not in allowed]
  if bad or (not items and not allow_empty):
    parser.error(f"{flag}: expected a comma-separated subset of {','.join(allowed)}, got {value!r}")
  return items


def available_memory_bytes() -> int | None:
  """MemAvailable from /proc/meminfo; None where unknown."""
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def load_average() -> float | None:
  """1-minute load average (runnable processes); None where unknown."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _load_line(when: str, load: float | None) -> str:
  """Preamble line for a load average."""
  shown = "unknown" if load is None else f"{load:.1f}"
  return f"load average at {when}: {shown} on {os.cpu_count()} cores"


def environment(argv: Sequence[str] | None) -> list[str]:
  """Preamble lines: command, date, JAX/PyTorch versions, device, load."""
  device = jax.devices()[0]
  lines = [
      f"command: `python -m bench.run {' '.join(sys.argv[1:] if argv is None else argv)}`",
      f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
      f"JAX {jax.__version__}, backend `{jax.default_backend()}`, device_kind "
      f"`{device.device_kind}` (timed on 1 device), conv formulation 'auto' -> "
      f"`{training.conv_formulation()}`",
  ]
  if importlib.util.find_spec("torch") is None:
    lines.append("PyTorch: not installed (`pip install -e '.[bench]'`); reference skipped")
  else:
    import torch  # pylint: disable=import-outside-toplevel
    lines.append(f"PyTorch {torch.__version__}, eager; `torch.set_num_threads` as in each "
                 f"row ({os.cpu_count()} = `os.cpu_count()`)")
  return lines


def _peak_cell(result: training.StepResult, device_kind: str,
               cpu_peak_tflops: float | None) -> tuple[str, str]:
  """(achieved TFLOP/s, share of the device's peaks) cells of one row.

  The peaks are the chip's published ones, or on a CPU the measured float32
  matmul throughput (:func:`wmh_jax.training.throughput.measured_matmul_peak_tflops`).
  """
  if result.flops is None:
    return "—", "—"
  achieved = result.flops / result.median_s / 1e12
  peaks = throughput.peak_tflops(device_kind)
  if peaks is None and cpu_peak_tflops:
    peaks = {"measured fp32 matmul": cpu_peak_tflops}
  if peaks is None:
    return report.fmt(achieved), f"unknown (`{device_kind}`)"
  return report.fmt(achieved), " · ".join(
      f"{100 * achieved / peak:.1f}% of {name} {report.fmt(peak)}" for name, peak in peaks.items())


def _train_row(result: training.StepResult, jax_result: training.StepResult,
               device_kind: str, cpu_peak_tflops: float | None = None) -> list[str]:
  """One training-table row; the ratio column is (1-device) JAX time / this time."""
  is_jax = result.framework.startswith("JAX")
  first = report.fmt(result.warmup_s)
  if result.compile_s is not None:
    first += f" (+{report.fmt(result.compile_s)} compile)"
  achieved, peak = _peak_cell(result, device_kind, cpu_peak_tflops)
  return ["x".join(map(str, result.shape)) + f", f={result.base_filters}", result.kind,
          result.framework, f"{result.params:,}",
          f"{report.fmt(result.median_s)} (n={len(result.times_s)})",
          report.fmt(result.volumes_per_s), first,
          "—" if is_jax else report.fmt(jax_result.median_s / result.median_s),
          report.fmt(result.flops / 1e9) if result.flops else "—", achieved, peak]


def _train_note(label: str, results: list[training.StepResult]) -> str:
  """The note of one grid and kind: XLA memory, net equality, best JAX/PyTorch ratio."""
  jax_result = results[0]
  facts = [f"XLA temporaries {jax_result.temp_bytes / 2**30:.2f} GiB"
           if jax_result.temp_bytes is not None else "no XLA memory estimate"]
  jax_results = [r for r in results if r.framework.startswith("JAX")]
  torch_results = [r for r in results if not r.framework.startswith("JAX")]
  if torch_results:
    best = min(torch_results, key=lambda r: r.median_s)
    facts.append(f"{jax_result.params:,} parameters and output shapes "
                 f"{jax_result.output_shapes} equal in both frameworks; " + "; ".join(
                     f"{r.framework} / fastest PyTorch ({best.framework}) = "
                     f"{r.median_s / best.median_s:.2f}" for r in jax_results))
  return f"{label}: " + "; ".join(facts)


class Suite:
  """Runs the measurements and keeps the report up to date on disk."""

  def __init__(self, args: argparse.Namespace, argv: Sequence[str] | None):
    self.args = args
    self.out: Path = args.out
    self.report = report.Report("wmh-jax benchmark", environment(argv))
    self.cpu_peak_tflops = (throughput.measured_matmul_peak_tflops(n=2048)
                            if jax.default_backend() == "cpu" else None)
    if self.cpu_peak_tflops:
      self.report.preamble.append(
          f"roofline: measured float32 matmul peak {1e3 * self.cpu_peak_tflops:.0f} GFLOP/s "
          f"(2048^3 `jnp.dot`, all {os.cpu_count()} cores, median of 5)")
    self.device_kind = jax.devices()[0].device_kind
    self.train_rows: list[list[str]] = []
    self.train = report.Section(
        f"Training step: forward + backward + Adadelta, batch {training.BATCH}",
        report.markdown_table(TRAIN_HEADERS, []),
        [f"median of {args.repeats} timed step(s) after 1 warm-up step; volumes/s = "
         f"{training.BATCH} / median; 'JAX / this' = JAX s/step / this PyTorch s/step "
         "(< 1: JAX faster)",
         "GFLOP/step: JAX, `compiled.cost_analysis()` of the executed program (on CPU the "
         "2D conv formulations, so not the textbook 3D-conv count); PyTorch, "
         "`torch.utils.flop_counter.FlopCounterMode` (convolutions and matmuls only)",
         "achieved = GFLOP/step / median s/step; 'of peak' on a CPU is against the measured "
         "float32 matmul throughput of all cores (the preamble's roofline line)"])
    self.report.sections.append(self.train)
    self.torch_device = self._torch_device()

  def _torch_device(self) -> str | None:
    """Where the PyTorch reference runs, or None (with a note) when it cannot."""
    if not self.args.torch_formats:
      self.train.notes.append("PyTorch reference not requested (--torch_formats empty)")
      return None
    if importlib.util.find_spec("torch") is None:
      self.train.notes.append("PyTorch reference skipped: torch is not installed "
                              "(`pip install -e '.[bench]'`)")
      return None
    device = training.torch_device()
    if device is None:
      self.train.notes.append("PyTorch reference skipped: this torch build has no CUDA and "
                              "CPU PyTorch vs accelerator JAX would compare nothing")
    return device

  def save(self) -> None:
    """Rewrites the report file."""
    self.report.write(self.out)

  def training_grid(self, shape_name: str) -> None:
    """JAX and PyTorch training steps of every kind at one named grid."""
    cpu = jax.default_backend() == "cpu"
    if shape_name == "paper" and cpu:
      print("warning: the paper grid (112x128x32, 32 filters) on CPU: one training step "
            "needs many GB of memory and minutes; --shapes=cpu skips it", file=sys.stderr,
            flush=True)
    for kind in self.args.kinds:
      config = training.bench_config(kind, shape_name)
      label = f"{shape_name} grid {training.grid(config)}, {kind}"
      batch = training.synthetic_batch(training.grid(config), seed=config.seed)
      print(f"[train] {label}: compiling the JAX step", flush=True)
      step = training.JaxStep(config, batch)
      available = available_memory_bytes()
      if cpu and step.temp_bytes and available and step.temp_bytes > available:
        self.train.notes.append(
            f"{label}: skipped, XLA needs {step.temp_bytes / 2**30:.1f} GiB of temporaries, "
            f"{available / 2**30:.1f} GiB available")
        self.save()
        continue
      if step.temp_bytes:
        print(f"[train] {label}: XLA temporaries {step.temp_bytes / 2**30:.2f} GiB",
              flush=True)
      jax_result = step.timed(self.args.repeats)
      del step
      print(f"[train] {label}: JAX {jax_result.median_s:.3f} s/step", flush=True)
      results = [jax_result]
      if cpu and jax.device_count() > 1:
        split = training.JaxStep(config, batch, num_devices=jax.device_count())
        results.append(split.timed(self.args.repeats))
        del split
        print(f"[train] {label}: {results[-1].framework} {results[-1].median_s:.3f} s/step",
              flush=True)
      variants = [(f, n) for f in self.args.torch_formats for n in self.args.torch_threads]
      for memory_format, threads in variants if self.torch_device else ():
        torch_result = training.time_torch_step(config, batch, memory_format,
                                                self.args.repeats, self.torch_device, threads)
        training.check_same_net(jax_result, torch_result)
        print(f"[train] {label}: {torch_result.framework} {torch_result.median_s:.3f} s/step; "
              f"params JAX {jax_result.params:,} == PyTorch {torch_result.params:,}; "
              f"outputs {jax_result.output_shapes} match", flush=True)
        results.append(torch_result)
      self.train_rows += [_train_row(r, jax_result, self.device_kind, self.cpu_peak_tflops)
                          for r in results]
      self.train.table = report.markdown_table(TRAIN_HEADERS, self.train_rows)
      self.train.notes.append(_train_note(label, results))
      self.save()

  def augmentation(self) -> None:
    """Host augmentation pairs/s per core."""
    print("[augment] timing", flush=True)
    pairs = 5 if self.args.quick else 10
    results = host.time_augmentation(configs.get_config().augment, self.args.repeats, pairs)
    rows = [[r.method, report.fmt(r.pairs_per_s),
             report.fmt(1000 / r.pairs_per_s) if r.pairs_per_s else "—", r.note]
            for r in results]
    fused, sequential = results[0].pairs_per_s, results[1].pairs_per_s
    self.report.sections.append(report.Section(
        "Host augmentation at 112x128x32 (image + mask pairs, one core)",
        report.markdown_table(("method", "pairs/s per core", "ms/pair", "note"), rows),
        [f"rotation ±54° about z, translation ±20%, left-right flip p=0.5 (config.augment); "
         f"median of {self.args.repeats} rounds after 1 warm-up round",
         f"fused / sequential = {fused / sequential:.1f}x; target >= 40 pairs/s per core"]))
    self.save()

  def data_wait(self) -> None:
    """Data-wait share of a real training run, or a note that none was given."""
    headers = ("run", "steps", "median step s", "median data wait s", "data-wait share")
    workdir = self.args.train_workdir
    if workdir is None:
      rows = [["no --train_workdir given", "—", "—", "—", "—"]]
      notes = [f"to measure: {TRAIN_HINT}"]
    else:
      waits = [report.read_data_wait(path) for path in report.timing_files(workdir)]
      rows = [[str(w.path), w.steps, report.fmt(w.median_step_s), report.fmt(w.median_wait_s),
               f"{report.fmt(100 * w.wait_share)}%"] for w in waits]
      notes = []
    notes.append("share = sum(data_wait_s) / sum(step_time_s) over logged steps, first step "
                 "(compilation) excluded; target <= 5%")
    self.report.sections.append(report.Section(
        "Data wait in a training run (`timing.jsonl`)",
        report.markdown_table(headers, rows), notes))
    self.save()

  def inference(self) -> None:
    """Seconds per scan through ``wmh_jax.inference.predict`` at the CPU grid."""
    print("[predict] timing", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmh_bench_scans_") as scans:
      host.write_native_scans(Path(scans), self.args.repeats + 1)
      for kind in self.args.kinds:
        result = host.time_inference(training.bench_config(kind, "cpu"), Path(scans),
                                     self.args.repeats)
        rows.append([kind, "x".join(map(str, result.shape)), result.scans,
                     report.fmt(result.preprocess_s), report.fmt(result.model_s),
                     report.fmt(result.write_s), report.fmt(result.total_s)])
    native = "x".join(map(str, host.NATIVE_SHAPE))
    self.report.sections.append(report.Section(
        "Inference through `wmh_jax.inference.predict` (seconds per scan)",
        report.markdown_table(("model", "model grid", "scans", "preprocessing s", "model s",
                               "writing s", "total s/scan"), rows),
        [f"synthetic {native} FLAIR NIfTI scans "
         f"({'x'.join(map(str, host.NATIVE_SPACING_MM))} mm), untrained parameters, no TTA; "
         "medians per stage, the first scan (compilation) excluded"]))
    self.save()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the suite; returns the exit code."""
  args = parse_args(argv)
  host_devices.use_cpu_devices(args.cpu_devices)
  start_load = load_average()
  suite = Suite(args, argv)
  suite.report.preamble.append(_load_line("start", start_load))
  suite.save()
  deferred = [s for s in args.shapes if s == "paper"]
  for shape_name in [s for s in args.shapes if s != "paper"]:
    suite.training_grid(shape_name)
  suite.augmentation()
  suite.data_wait()
  suite.inference()
  for shape_name in deferred:
    suite.training_grid(shape_name)
  end_load = load_average()
  suite.report.preamble.append(_load_line("end", end_load))
  loads = [x for x in (start_load, end_load) if x is not None]
  if loads and max(loads) > (os.cpu_count() or 1):
    suite.report.preamble.append(
        "warning: the machine was oversubscribed (load above the core count): timings are "
        "noisy, and multi-threaded PyTorch (OpenMP threads wait by spinning) suffers most")
  suite.save()
  print(f"wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
