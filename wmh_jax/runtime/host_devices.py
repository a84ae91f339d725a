"""Splitting a CPU host into several XLA devices for data-parallel training.

XLA:CPU keeps about 1.2 of 2 cores busy during one training step: most of its
ops are small and run on one thread (``bench/profile_cpu.md``: 0.50 s of
thread-summed op time in a 0.42 s step). With the host split into D CPU
devices, the data-parallel step (nothing else changes) runs D shards of the
batch side by side. Measured on 2 cores, weak ``:cpu``, 2 epochs in the
training loop: 0.516 s/step with 1 device, 0.398 s/step with 2
(BUILD_NOTES.md, "Speed").

Off by default (1 device): with 2 CPU devices, a run on an oversubscribed
machine once aborted in XLA:CPU's all-reduce rendezvous (BUILD_NOTES.md,
"Portable tests"). A different device count changes the order of float
reductions, so runs agree to rounding, not bitwise
(``tests/test_train.py::test_four_devices_match_one``).
"""

from __future__ import annotations

import os
import re

_FORCED_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def use_cpu_devices(count: int | None) -> None:
  """Makes JAX create ``count`` CPU devices (None: leave the default).

  Must run before any JAX computation (JAX's ``jax_num_cpu_devices``).

  Raises:
    ValueError: ``count`` < 1, or ``XLA_FLAGS`` already forces another count.
  """
  if count is None:
    return
  if count < 1:
    raise ValueError(f"--cpu_devices must be >= 1, got {count}")
  forced = _FORCED_COUNT.search(os.environ.get("XLA_FLAGS", ""))
  if forced and int(forced.group(1)) != count:
    raise ValueError(f"--cpu_devices={count} contradicts XLA_FLAGS "
                     f"--xla_force_host_platform_device_count={forced.group(1)}")
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", count)
