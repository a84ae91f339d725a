"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 by test_train.py.

One train step of each model kind on one global batch whose ``has_mask``
differs between devices, on a 1-device and a 4-device mesh: the updated
params and running statistics must agree (losses are global-batch values).
Prints ``ok <kind> <max abs difference>`` per kind.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from tolerances import float32_rtol
from wmh_jax import configs
from wmh_jax.models import kinds
from wmh_jax.runtime import sharding
from wmh_jax.training import train
from jax.sharding import Mesh


def one_step(config, batch: dict[str, np.ndarray], devices) -> dict:
  mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
  model = kinds.build_model(config.model, volume_bias_init=0.3, seg_bias_init=-3.0,
                             axis_name=sharding.DATA_AXIS)
  optimizer = train.make_optimizer(config.train, total_steps=10)
  state = train.make_init(model, optimizer, mesh, tuple(config.data.shape))(0)
  step = train.make_train_step(model, config, optimizer, mesh)
  state, metrics = step(state, sharding.global_batch(batch, mesh))
  return jax.tree.map(np.asarray, {"vars": train.model_variables(state), "metrics": metrics})


# Global-batch sums: 4 scans of 8 x 8 x 4 voxels, then the scans; ~8 more ops.
METRIC_RTOL = float32_rtol(4 * 8 * 8 * 4 + 4, ops=8, sides=2)


def main() -> None:
  assert jax.device_count() == 4, jax.devices()
  rng = np.random.default_rng(0)
  shape = (8, 8, 4)
  image = rng.random((4, *shape, 1)).astype(np.float32)
  mask = (image > 0.8).astype(np.float32)
  batch = {"image": image, "mask": mask, "volume_ml": mask.sum(axis=(1, 2, 3, 4)) / 1000,
           "severity": np.array([0, 1, 2, 4], np.int32),
           # Devices 1 and 3 hold no mask: a per-device weighted mean would differ.
           "has_mask": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}
  for kind, reduction in (("weak", "batch"), ("strong", "scan"), ("joint", "batch"),
                          ("severity", "batch")):
    if True:
      config = configs.get_config()
      config.model.kind = kind
      config.model.base_filters = 2
      config.model.depth = 1
      config.model.conv_impl = "native"
      config.data.shape = shape
      config.loss.dice_reduction = reduction
      one = one_step(config, batch, jax.devices()[:1])
      four = one_step(config, batch, jax.devices())
      worst = 0.0
      # Metrics (losses of the global batch) and the running statistics are sums
      # over the 4 x 256 voxels and the 4 scans, in another order on 4 devices:
      # the reduction rule of tests/tolerances.py, both sides float32.
      for a, b in zip(jax.tree.leaves(one["metrics"]), jax.tree.leaves(four["metrics"]),
                      strict=True):
        np.testing.assert_allclose(a, b, rtol=METRIC_RTOL, err_msg=f"{kind} {reduction}")
      # Parameters: one Adam step moves each by at most the learning rate, in the
      # direction m / (sqrt(v) + eps) that the reduction order perturbs by about
      # METRIC_RTOL relative (more only where a gradient component cancels to ~eps);
      # what is left is the rounding of p - update (a few ulps of |p|). A per-device
      # loss or a missing psum moves whole layers by O(learning rate), >= 5e-5 here.
      for a, b in zip(jax.tree.leaves(one["vars"]), jax.tree.leaves(four["vars"]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-5, err_msg=f"{kind} {reduction}")
      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True):
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
      print("ok", kind, reduction, worst)


if __name__ == "__main__":
  sys.exit(main())
