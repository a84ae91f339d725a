"""Training throughput in units that compare across hardware.

A train step of a global batch of ``B`` scans of ``V`` voxels that takes
``t`` seconds and does ``F`` floating-point operations (all devices) runs at
``B / t`` scans/s, ``B V / t`` voxels/s, ``F / t / D`` FLOP/s per device
(``D`` devices) and a model-FLOP utilisation (MFU) of ``F / t / P``, where
``P`` is the peak of all ``D`` devices at the arithmetic the step runs in.

``F`` is XLA's cost analysis of the compiled step: the FLOPs of one device's
program (a data-parallel ``shard_map``: every device runs the same one),
times ``D``. ``P`` is the chip's dense spec-sheet peak (:data:`PEAK_TFLOPS`)
for the compute dtype: bfloat16 for ``model.dtype="bfloat16"``; for float32,
TF32 on NVIDIA GPUs (XLA's default precision for float32 convolutions and
matmuls there) and bfloat16 on TPUs (their default float32 matmul precision
is one bfloat16 pass). A CPU has no spec-sheet entry: its peak is the
measured float32 matmul rate of the whole host (all cores, whatever the JAX
device count), :func:`measured_matmul_peak_tflops`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) peak TFLOP/s per chip by device_kind substring, first match
# wins: (bf16, tf32, fp32); None where the chip has no such figure. Sources:
# NVIDIA H100 Tensor Core GPU datasheet (SXM and PCIe columns; the datasheet's
# tensor figures are "with sparsity", halved here); NVIDIA H200 datasheet (same
# compute as the H100 SXM); NVIDIA A100 datasheet; NVIDIA L4 datasheet; Google
# Cloud TPU system-architecture pages (v4: 275, v5e: 197, v5p: 459, v6e: 918
# bf16 TFLOP/s per chip).
PEAK_TFLOPS: tuple[tuple[str, tuple[float | None, float | None, float | None]], ...] = (
    ("h100 pcie", (756.0, 378.0, 51.0)),
    ("h100", (989.4, 494.7, 66.9)),       # SXM
    ("h200", (989.4, 494.7, 66.9)),
    ("gh200", (989.4, 494.7, 66.9)),
    ("a100", (312.0, 156.0, 19.5)),
    ("l4", (121.0, 60.0, 30.3)),
    ("tpu v6 lite", (918.0, None, None)),
    ("tpu v5 lite", (197.0, None, None)),
    ("tpu v5", (459.0, None, None)),      # v5p
    ("tpu v4", (275.0, None, None)),
)
PEAK_NAMES = ("bf16", "tf32", "fp32")


def peak_tflops(device_kind: str) -> dict[str, float] | None:
  """Dense peak TFLOP/s of a chip ({'bf16': .., 'tf32': .., 'fp32': ..}), None if unknown."""
  kind = device_kind.lower()
  for key, peaks in PEAK_TFLOPS:
    if key in kind:
      return {name: value for name, value in zip(PEAK_NAMES, peaks) if value is not None}
  return None


@functools.cache
def measured_matmul_peak_tflops(n: int = 1024, repeats: int = 5) -> float:
  """Float32 matmul throughput of the default JAX device (all its cores), TFLOP/s.

  The compute ceiling where no published peak applies (CPUs): the median of
  ``repeats`` timed ``(n, n) @ (n, n)`` products (``2 n^3`` FLOPs) after one
  warm-up. Cached per process.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / float(np.median(times)) / 1e12


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one device's program from ``compiled.cost_analysis()``; None if XLA gives none."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def step_peak(device: jax.Device, dtype: str, num_devices: int) -> tuple[str, float | None]:
  """(name, TFLOP/s) of the peak that ``num_devices`` devices like ``device`` reach at ``dtype``.

  ``dtype`` is ``model.dtype`` ("float32" or "bfloat16"). The name says which
  figure it is ("H100 bf16 peak", "measured CPU fp32 matmul"); the value is
  None for an accelerator missing from :data:`PEAK_TFLOPS`.
  """
  if device.platform == "cpu":
    return "measured CPU fp32 matmul", measured_matmul_peak_tflops()
  peaks = peak_tflops(device.device_kind) or {}
  if dtype == "bfloat16" or device.platform == "tpu":
    name = "bf16"
  else:
    name = "tf32" if "tf32" in peaks else "fp32"
  value = peaks.get(name)
  return f"{device.device_kind} {name} peak", (value * num_devices if value else None)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What one train step does, to turn its time into rates.

  Attributes:
    batch_size: scans per global step.
    voxels_per_scan: model-grid voxels of one scan.
    num_devices: devices the step runs on.
    flops: FLOPs of one global step (all devices), None if unknown.
    peak_name: which peak the MFU is relative to (:func:`step_peak`).
    peak_tflops: that peak, all devices together, None if unknown.
  """
  batch_size: int
  voxels_per_scan: int
  num_devices: int
  flops: float | None = None
  peak_name: str = ""
  peak_tflops: float | None = None

  def rates(self, step_time_s: float) -> dict[str, float]:
    """``scans_per_s``, ``voxels_per_s`` and, where known, ``tflops_per_device`` and ``mfu``."""
    rates = {"scans_per_s": self.batch_size / step_time_s,
             "voxels_per_s": self.batch_size * self.voxels_per_scan / step_time_s}
    if self.flops:
      rates["tflops_per_device"] = self.flops / step_time_s / self.num_devices / 1e12
      if self.peak_tflops:
        rates["mfu"] = self.flops / step_time_s / 1e12 / self.peak_tflops
    return rates


def step_cost(compiled: Any, *, batch_size: int, voxels_per_scan: int, num_devices: int,
              dtype: str) -> StepCost:
  """The :class:`StepCost` of a compiled data-parallel train step on the default devices."""
  per_device = compiled_flops(compiled)
  name, peak = step_peak(jax.devices()[0], dtype, num_devices)
  return StepCost(batch_size=batch_size, voxels_per_scan=voxels_per_scan,
                  num_devices=num_devices,
                  flops=per_device * num_devices if per_device else None,
                  peak_name=name, peak_tflops=peak)
