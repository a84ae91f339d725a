"""Batched, data-parallel forward passes shared by validation, analysis and predict.

Nothing here knows about training: it takes a model, its params and
preprocessed arrays, and returns per-scan outputs in physical units.
"""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from wmh_jax.runtime import sharding

ForwardFn = Callable[[dict, jax.Array], dict[str, jax.Array]]


def make_forward(model: nn.Module, mesh: Mesh) -> ForwardFn:
  """Compiles ``variables, images (B,x,y,z,1) -> outputs`` split over the data axis.

  ``variables`` are the Flax variables (``params``, and ``batch_stats`` for
  models with running statistics). Segmentation logits leave as
  probabilities: ``seg_logits`` becomes ``seg_prob = sigmoid(seg_logits)``.
  The compiled function is cached by JAX per input shape, so scans of one
  shape reuse one executable.
  """

  def per_device(variables, images):
    outputs = dict(model.apply(variables, images))
    if "seg_logits" in outputs:
      outputs["seg_prob"] = jax.nn.sigmoid(outputs.pop("seg_logits"))
    return outputs

  return sharding.data_parallel(per_device, mesh, in_specs=(P(), P(sharding.DATA_AXIS)),
                                out_specs=P(sharding.DATA_AXIS))


def physical_outputs(outputs: dict[str, np.ndarray], *, volume_scale_ml: float,
                     voxel_ml: float) -> dict[str, np.ndarray]:
  """Converts raw model outputs to per-scan quantities in physical units.

  Args:
    outputs: host arrays from the model: ``volume`` (B,) in target units
      (volume_ml / volume_scale_ml), ``attention`` (B,x,y,z), ``seg_prob``
      (B,x,y,z) in [0,1], ``severity_logits`` (B,C); any subset.
    volume_scale_ml: the regression target scale stored in the config.
    voxel_ml: volume of one model-grid voxel in mL.

  Returns:
    ``volume_ml`` (B,) the model's primary volume estimate (regression head for
    weak/joint, thresholded count for strong); ``seg_volume_ml`` and
    ``soft_volume_ml`` for models with a segmentation head; ``severity`` (B,)
    int for severity models; ``pooled`` (B, C), a volume head's features
    (for `evaluation.ood`), and maps are passed through unchanged.
  """
  result: dict[str, np.ndarray] = {}
  if "seg_prob" in outputs:
    prob = outputs["seg_prob"]
    result["seg_volume_ml"] = (prob > 0.5).sum(axis=(1, 2, 3)) * voxel_ml
    result["soft_volume_ml"] = prob.sum(axis=(1, 2, 3)) * voxel_ml
    result["volume_ml"] = result["seg_volume_ml"]
    result["seg_prob"] = prob
  if "volume" in outputs:
    result["volume_ml"] = outputs["volume"] * volume_scale_ml
  if "attention" in outputs:  # absent when run_batches(keep_maps=False) dropped it
    result["attention"] = outputs["attention"]
  if "severity_logits" in outputs:
    result["severity"] = outputs["severity_logits"].argmax(axis=-1)
  if "pooled" in outputs:
    result["pooled"] = outputs["pooled"]
  return result


def run_batches(forward: ForwardFn, variables: dict, batches: Iterable[dict[str, np.ndarray]],
                mesh: Mesh, *, keep_maps: bool) -> dict[str, np.ndarray]:
  """Runs ``forward`` over padded global batches and concatenates valid rows.

  Args:
    batches: dicts with ``image`` (B,x,y,z,1) and ``valid`` (B,) for the whole
      global batch (every process iterates the same batches; each feeds only
      its own slice).
    keep_maps: keep voxel maps (attention, seg_prob) in the result.

  Returns:
    Every output concatenated over valid rows, in input order.
  """
  pieces: dict[str, list[np.ndarray]] = {}
  index, count = jax.process_index(), jax.process_count()
  for batch in batches:
    rows = len(batch["valid"]) // count
    local = {"image": batch["image"][index * rows:(index + 1) * rows]}
    outputs = forward(variables, sharding.global_batch(local, mesh)["image"])
    valid = np.asarray(batch["valid"]) > 0
    for key, value in outputs.items():
      if value.ndim > 2 and not keep_maps:
        continue
      pieces.setdefault(key, []).append(sharding.to_host(value)[valid])
  return {k: np.concatenate(v) for k, v in pieces.items()}
