"""Training logs: metrics JSONL, timing JSONL, TensorBoard events, progress bar.

``metrics.jsonl`` holds only deterministic values (losses, validation
scores), so two runs with one seed write identical files; wall-clock figures
go to ``timing.jsonl``: per logging interval ``step_time_s``, ``data_wait_s``
and the rates of `wmh_jax.training.throughput` (``scans_per_s``, ``voxels_per_s``,
``tflops_per_device``, ``mfu``), then at the end of a session one record with
``compile_s`` and the medians (``"summary": true``). TensorBoard event files are written with tensorboardX,
without TensorFlow. Only process 0 writes. :func:`validation_records` reads
the validation records back (learning curves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from wmh_jax.runtime import fileio
from wmh_jax.training import throughput


def _step_of(line: str) -> int | None:
  """The ``step`` of one JSONL record; None for a torn line (a kill mid-write)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def _truncate_after(path: Path, step: int) -> None:
  """Drops records past ``step`` (left by a run killed after its last checkpoint).

  Torn lines are dropped too. The file is replaced atomically (temp file, then
  rename), so a kill during the rewrite keeps the old log.
  """
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if (record_step := _step_of(line)) is not None and record_step <= step]
  fileio.atomic_write_text(path, "".join(line + "\n" for line in kept))


def validation_records(path: Path) -> list[dict]:
  """The validation records of a ``metrics.jsonl`` (those with ``val_score``), in order.

  Each holds ``step``, ``epoch``, ``val_score`` and the kind's ``val_*``
  metrics (:func:`wmh_jax.training.train.validation_metrics`). A missing file gives
  none; torn lines are skipped.
  """
  if not path.exists():
    return []
  evals = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and "val_score" in record:
      evals.append(record)
  return evals


class MetricLogger:
  """Per-step and per-epoch metrics of one run directory, fetched from the device in batches.

  :meth:`add_step` keeps a step's metrics on the device; :meth:`fetch_steps`
  brings every pending step to the host in one transfer (the only host-device
  sync of the loop outside validation), and :meth:`write_steps` writes them.
  Timing is per interval between writes: wall time over steps, and the time
  spent waiting for data; with ``cost`` (the step's `throughput.StepCost`, set
  once the step is compiled) also scans/s, voxels/s, TFLOP/s per device and MFU.
  """

  def __init__(self, workdir: Path, *, start_step: int, total_steps: int, batch_size: int):
    self.enabled = jax.process_index() == 0
    self.batch_size = batch_size
    self.compile_s: float | None = None
    self.cost: throughput.StepCost | None = None
    self.intervals: list[dict[str, float]] = []
    self._pending: list[tuple[int, dict]] = []
    self._wait_s = 0.0
    self._clock = time.perf_counter()
    self._clock_steps = 0
    if not self.enabled:
      return
    self.workdir = workdir
    self.metrics_path = workdir / "metrics.jsonl"
    self.timing_path = workdir / "timing.jsonl"
    for path in (self.metrics_path, self.timing_path):
      _truncate_after(path, start_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.tb = SummaryWriter(str(workdir / "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=start_step, desc=workdir.name,
                    dynamic_ncols=True, mininterval=1.0)

  def _append(self, path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
      f.writelines(json.dumps(record) + "\n" for record in records)

  def say(self, message: str) -> None:
    """One line for the user (process 0), printed above the progress bar."""
    if self.enabled:
      self.bar.write(message)

  def restart_clock(self) -> None:
    """Starts a new timing interval (after compilation, validation or a save)."""
    self._clock, self._clock_steps, self._wait_s = time.perf_counter(), 0, 0.0

  def add_data_wait(self, seconds: float) -> None:
    """Time the loop waited for the next batch."""
    self._wait_s += seconds

  def add_step(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Queues a step's metrics (still on the device) and advances the progress bar."""
    self._pending.append((step, metrics))
    self._clock_steps += 1
    if self.enabled:
      self.bar.update(1)

  def fetch_steps(self) -> list[dict[str, float]]:
    """The pending steps as ``{"step", **metrics}`` host records, in order; waits for them."""
    fetched = jax.device_get([metrics for _, metrics in self._pending])
    records = [{"step": step, **{k: float(v) for k, v in metrics.items()}}
               for (step, _), metrics in zip(self._pending, fetched)]
    self._pending = []
    return records

  def write_steps(self, records: list[dict[str, float]]) -> None:
    """Writes fetched step records and the timing of the interval they close."""
    if self._clock_steps:
      steps = self._clock_steps
      step_time_s = (time.perf_counter() - self._clock) / steps
      interval = {"step": records[-1]["step"] if records else 0, "steps": steps,
                  "step_time_s": step_time_s, "data_wait_s": self._wait_s / steps,
                  **(self.cost.rates(step_time_s) if self.cost else {})}
      self.intervals.append(interval)
      self._clock, self._clock_steps, self._wait_s = time.perf_counter(), 0, 0.0
      if self.enabled and records:
        self._append(self.timing_path, [interval])
    if not self.enabled or not records:
      return
    self._append(self.metrics_path, records)
    for record in records:
      for key, value in record.items():
        if key != "step":
          self.tb.add_scalar(f"train/{key}", value, record["step"])
    last = self.intervals[-1]["step_time_s"] if self.intervals else float("nan")
    self.bar.set_postfix(loss=f"{records[-1]['loss']:.4g}",
                         scans_s=f"{self.batch_size / max(last, 1e-9):.3g}")

  def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
    """Records one validation pass: one line for the user."""
    if not self.enabled:
      return
    self._append(self.metrics_path, [{"step": step, "epoch": epoch, **metrics}])
    for key, value in metrics.items():
      self.tb.add_scalar(f"val/{key}", value, step)
    self.bar.write(f"epoch {epoch} step {step}: " +
                   ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

  def timing_summary(self) -> dict[str, float]:
    """Median step time (s), data-wait share and the rates at the median step time
    (`throughput.StepCost.rates`), over this session's intervals (first excluded)."""
    intervals = self.intervals[1:]
    if not intervals:
      return {}
    times = np.array([i["step_time_s"] for i in intervals])
    weights = np.array([i["steps"] for i in intervals], np.float64)
    waits = np.array([i["data_wait_s"] for i in intervals])
    median = float(np.median(times))
    return {"median_step_time_s": median,
            "data_wait_share": float((waits * weights).sum() / (times * weights).sum()),
            **(self.cost.rates(median) if self.cost else {})}

  def close(self) -> None:
    """Closes the bar and prints one summary line: steps, time, data wait, compile."""
    if not self.enabled:
      return
    self.tb.close()
    self.bar.close()
    timing = self.timing_summary()
    parts = []
    if timing:
      parts.append(f"median {timing['median_step_time_s']:.3f} s/step, data wait "
                   f"{100 * timing['data_wait_share']:.1f}% of step time")
      parts.append(self._rates_text(timing))
    if self.compile_s is not None:
      parts.append(f"train step compiled (or loaded from the XLA cache) in {self.compile_s:.1f} s")
    elif self.intervals:
      parts.append("train step compilation reused")
    if timing or self.compile_s is not None:
      last_step = self.intervals[-1]["step"] if self.intervals else 0
      summary = {"step": last_step, "summary": True, **timing,
                 **({"compile_s": self.compile_s} if self.compile_s is not None else {}),
                 **({"peak": self.cost.peak_name, "peak_tflops": self.cost.peak_tflops,
                     "num_devices": self.cost.num_devices} if self.cost else {})}
      self._append(self.timing_path, [summary])
    if parts:
      print(f"{self.workdir.name}: " + "; ".join(parts), flush=True)

  def _rates_text(self, timing: dict[str, float]) -> str:
    """``"1.2 scans/s, 3.4 M voxels/s, 0.05 TFLOP/s per device, MFU 12.3% of <peak>"``."""
    text = f"{timing['scans_per_s']:.3g} scans/s, {timing['voxels_per_s'] / 1e6:.3g} M voxels/s"
    if "tflops_per_device" in timing:
      text += f", {timing['tflops_per_device']:.3g} TFLOP/s per device"
    if "mfu" in timing:
      text += f", MFU {100 * timing['mfu']:.1f}% of {self.cost.peak_name}"
    return text
