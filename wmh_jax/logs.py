"""Training logs: metrics JSONL, timing JSONL, TensorBoard events, progress bar.

``metrics.jsonl`` holds only deterministic values (losses, validation
scores), so two runs with one seed write identical files; wall-clock figures
go to ``timing.jsonl``. TensorBoard event files are written with tensorboardX,
without TensorFlow. Only process 0 writes. :func:`validation_records` reads
the validation records back (learning curves).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from wmh_jax import fileio


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
  metrics (:func:`wmh_jax.train.validation_metrics`). A missing file gives
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
  """Writes per-step and per-epoch metrics for one run directory."""

  def __init__(self, workdir: Path, *, start_step: int, total_steps: int, batch_size: int):
    self.enabled = jax.process_index() == 0
    self.batch_size = batch_size
    self.step_times: list[float] = []
    self.data_waits: list[float] = []
    if not self.enabled:
      return
    self.metrics_path = workdir / "metrics.jsonl"
    self.timing_path = workdir / "timing.jsonl"
    for path in (self.metrics_path, self.timing_path):
      _truncate_after(path, start_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.tb = SummaryWriter(str(workdir / "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=start_step, desc=workdir.name,
                    dynamic_ncols=True, mininterval=1.0)

  def _append(self, path: Path, record: dict) -> None:
    with path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def log_step(self, step: int, metrics: dict[str, float], *, data_wait_s: float,
               step_time_s: float) -> None:
    """Records one training step's metrics and its time split."""
    self.step_times.append(step_time_s)
    self.data_waits.append(data_wait_s)
    if not self.enabled:
      return
    self._append(self.metrics_path, {"step": step, **metrics})
    self._append(self.timing_path, {"step": step, "step_time_s": step_time_s,
                                    "data_wait_s": data_wait_s})
    for key, value in metrics.items():
      self.tb.add_scalar(f"train/{key}", value, step)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4g}",
                         vol_s=f"{self.batch_size / max(step_time_s, 1e-9):.2f}")
    self.bar.update(1)

  def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
    """Records one validation pass."""
    if not self.enabled:
      return
    self._append(self.metrics_path, {"step": step, "epoch": epoch, **metrics})
    for key, value in metrics.items():
      self.tb.add_scalar(f"val/{key}", value, step)
    self.bar.write(f"epoch {epoch} step {step}: " +
                   ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

  def timing_summary(self) -> dict[str, float]:
    """Median step time (s) and data-wait share of this session's steps (first excluded)."""
    times, waits = np.array(self.step_times[1:]), np.array(self.data_waits[1:])
    if times.size == 0:
      return {}
    return {"median_step_time_s": float(np.median(times)),
            "data_wait_share": float(waits.sum() / times.sum())}

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.bar.close()
