"""Training-step timings: the project's JAX step and the PyTorch reference.

Both sides train the same net (``wmh_jax.models.architectures`` GP-Unet for 'weak', U-Net
for 'strong') on the same synthetic batch: forward + backward + Adadelta,
batch 4. The JAX step is ``wmh_jax.training.train.make_train_step`` (jit of
shard_map, state donated) on a one-device mesh, so the figures are per chip
(on a CPU host split into several devices by ``wmh_jax.runtime.host_devices``, also
data-parallel over all of them); it is compiled ahead of time, which also
yields XLA's FLOP count and memory estimate. PyTorch (``bench.torch_reference``, imported only when asked for)
runs eagerly, by default with ``torch.set_num_threads(os.cpu_count())``, on
CUDA when available.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import report
from wmh_jax import configs
from wmh_jax.models import architectures, conv, kinds
from wmh_jax.runtime import sharding
from wmh_jax.training import throughput, train

BATCH = 4
# Named grids: "cpu" is the CPU-demo variant (56x64x16, 8 base filters),
# "paper" the paper's (112x128x32, 32 base filters); see wmh_jax.configs.
SHAPES = {"cpu": "cpu", "paper": None}
TORCH_FORMATS = ("channels_last_3d", "contiguous")



def bench_config(kind: str, shape_name: str) -> ml_collections.ConfigDict:
  """The paper-recipe experiment config of ``kind`` at a named grid of `SHAPES`.

  The paper recipe (Adadelta, soft Dice, no normalisation) is what the
  PyTorch reference implements, so both frameworks time the same arithmetic.
  """
  if shape_name not in SHAPES:
    raise ValueError(f"unknown shape {shape_name!r}; expected one of {tuple(SHAPES)}")
  config = configs.get_config(",".join(f for f in (SHAPES[shape_name], "paper") if f))
  config.model.kind = kind
  config.train.batch_size = BATCH
  return config


def grid(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """``config.data.shape`` as ints (x, y, z)."""
  return tuple(int(s) for s in config.data.shape)


def synthetic_batch(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch of `BATCH` random scans in the pipeline's layout.

  Returns:
    ``image`` float32 (b, x, y, z, 1) in [0, 1), ``mask`` float32 {0, 1}
    (2% foreground), ``volume_ml`` float32 (b,), ``severity`` int32 (b,),
    ``has_mask`` float32 (b,) ones.
  """
  rng = np.random.default_rng(seed)
  size = (BATCH, *shape, 1)
  return {"image": rng.random(size, dtype=np.float32),
          "mask": (rng.random(size) < 0.02).astype(np.float32),
          "volume_ml": rng.uniform(1.0, 30.0, BATCH).astype(np.float32),
          "severity": np.zeros(BATCH, np.int32),
          "has_mask": np.ones(BATCH, np.float32)}


@dataclasses.dataclass
class StepResult:
  """Timing of one framework's training step at one grid.

  Attributes:
    framework: 'JAX' or 'PyTorch (<memory format>)'.
    kind: 'weak' or 'strong'.
    shape: grid (x, y, z).
    base_filters: filters of the full-resolution blocks.
    params: number of scalar parameters.
    output_shapes: model output name -> shape (batch `BATCH`).
    warmup_s: the first (untimed-for-the-median) step, seconds.
    times_s: the timed steps, seconds.
    compile_s: JAX ahead-of-time compilation, seconds.
    flops: FLOPs of one step: XLA's ``cost_analysis`` (JAX), PyTorch's
      ``FlopCounterMode`` (convolutions and matmuls only).
    temp_bytes: XLA's temporary buffer estimate (JAX only).
  """
  framework: str
  kind: str
  shape: tuple[int, int, int]
  base_filters: int
  params: int
  output_shapes: dict[str, tuple[int, ...]]
  warmup_s: float
  times_s: list[float]
  compile_s: float | None = None
  flops: float | None = None
  temp_bytes: int | None = None

  @property
  def median_s(self) -> float:
    """Median step time, seconds."""
    return float(np.median(self.times_s))

  @property
  def volumes_per_s(self) -> float:
    """Training throughput, scans per second."""
    return BATCH / self.median_s


# Length of the learning-rate schedule of a timed step (it only has to exceed the steps timed).
BENCH_SCHEDULE_STEPS = 1000


class JaxStep:
  """The project's compiled train step of one config, ready to time.

  Building it initialises the state and compiles the step; :meth:`time`
  then runs it. ``num_devices``: the mesh size (the first devices). ``temp_bytes`` is known before anything runs, so a caller
  can skip a step that would not fit in memory.
  """

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray],
               num_devices: int = 1):
    self.config = config
    self.framework = "JAX" if num_devices == 1 else f"JAX ({num_devices} devices)"
    self.mesh = jax.make_mesh((num_devices,), (sharding.DATA_AXIS,),
                              devices=jax.devices()[:num_devices])
    self.model = kinds.build_model(config.model, axis_name=sharding.DATA_AXIS)
    optimizer = train.make_optimizer(config.train, total_steps=BENCH_SCHEDULE_STEPS)
    self.state = train.make_init(self.model, optimizer, self.mesh, grid(config))(config.seed)
    self.params = architectures.count_params(self.state["params"])
    self.output_shapes = {
        name: tuple(out.shape) for name, out in jax.eval_shape(
            lambda v, x: self.model.apply(v, x), train.model_variables(self.state),
            jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32)).items()}
    self.batch = sharding.global_batch(batch, self.mesh)
    step = train.make_train_step(self.model, config, optimizer, self.mesh)
    start = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    flops = throughput.compiled_flops(self.compiled)  # of one device's shard of the step
    self.flops = flops * num_devices if flops else None
    memory = self.compiled.memory_analysis()
    self.temp_bytes = int(memory.temp_size_in_bytes) if memory is not None else None

  def run(self) -> None:
    """One step: the state advances; returns when its results are ready."""
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def timed(self, repeats: int) -> StepResult:
    """Warm-up step + ``repeats`` timed steps."""
    warmup, times = report.measure(self.run, repeats)
    return StepResult(framework=self.framework, kind=self.config.model.kind, shape=grid(self.config),
                      base_filters=int(self.config.model.base_filters), params=self.params,
                      output_shapes=self.output_shapes, warmup_s=warmup, times_s=times,
                      compile_s=self.compile_s, flops=self.flops, temp_bytes=self.temp_bytes)


def torch_device() -> str | None:
  """'cuda' when PyTorch sees a GPU; 'cpu' when JAX runs on CPU; else None.

  Comparing a CPU PyTorch with JAX on an accelerator would say nothing, so
  that case gets None (skip).
  """
  import torch  # pylint: disable=import-outside-toplevel
  if torch.cuda.is_available():
    return "cuda"
  return "cpu" if jax.default_backend() == "cpu" else None


def time_torch_step(config: ml_collections.ConfigDict, batch: dict[str, np.ndarray],
                    memory_format: str, repeats: int, device: str,
                    threads: int | None = None) -> StepResult:
  """Times the PyTorch reference of ``config.model`` on ``batch``.

  Args:
    config: from :func:`bench_config` (kind, base_filters, depth, volume scale).
    batch: from :func:`synthetic_batch`.
    memory_format: one of `TORCH_FORMATS`.
    repeats: timed steps after one warm-up step.
    device: 'cpu' or 'cuda' (see :func:`torch_device`).
    threads: ``torch.set_num_threads`` value; default ``os.cpu_count()``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from bench import torch_reference  # pylint: disable=import-outside-toplevel
  if memory_format not in TORCH_FORMATS:
    raise ValueError(f"unknown torch memory format {memory_format!r}; use {TORCH_FORMATS}")
  threads = threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  kind, filters, depth = config.model.kind, config.model.base_filters, config.model.depth
  layout = {"channels_last_3d": torch.channels_last_3d,
            "contiguous": torch.contiguous_format}[memory_format]
  model = torch_reference.build_model(kind, filters, depth).to(device, memory_format=layout)
  image = torch.from_numpy(np.moveaxis(batch["image"], -1, 1)).to(device)
  image = image.contiguous(memory_format=layout)
  if kind == "weak":
    target = torch.from_numpy(batch["volume_ml"] / config.data.volume_scale_ml).to(device)
  else:
    target = torch.from_numpy(batch["mask"][..., 0]).to(device)
  step = torch_reference.make_train_step(model, kind, image, target)
  warmup, times = report.measure(step, repeats)
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  with FlopCounterMode(display=False) as counter:  # one more step, untimed
    step()
  with torch.device("meta"):
    meta_outputs = torch_reference.build_model(kind, filters, depth)(
        torch.empty(image.shape))
  plural = "s" if threads > 1 else ""
  return StepResult(framework=f"PyTorch ({memory_format}, {threads} thread{plural})",
                    kind=kind, shape=grid(config),
                    base_filters=int(filters), params=torch_reference.count_params(model),
                    output_shapes={k: tuple(v.shape) for k, v in meta_outputs.items()},
                    warmup_s=warmup, times_s=times,
                    flops=float(counter.get_total_flops()) or None)


def check_same_net(jax_result: StepResult, torch_result: StepResult) -> None:
  """Raises AssertionError unless both nets have equal parameter counts and output shapes."""
  if jax_result.params != torch_result.params:
    raise AssertionError(f"{jax_result.kind} {jax_result.shape}: JAX has {jax_result.params} "
                         f"parameters, the PyTorch reference {torch_result.params}")
  # "pooled" (the GP head's pooled features, kept for OOD scores) has no PyTorch twin.
  jax_shapes = {k: v for k, v in jax_result.output_shapes.items() if k != "pooled"}
  if jax_shapes != torch_result.output_shapes:
    raise AssertionError(f"{jax_result.kind} {jax_result.shape}: output shapes differ: JAX "
                         f"{jax_result.output_shapes}, PyTorch {torch_result.output_shapes}")


def conv_formulation() -> str:
  """The `wmh_jax.models.conv` formulation 'auto' resolves to on this backend."""
  return conv.resolve_impl("auto")
