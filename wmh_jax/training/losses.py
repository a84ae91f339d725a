"""Training losses (paper §2.2): MSE, soft Dice (+ BCE), severity CE, summed per model kind.

Every loss is a global quantity of the whole (global) batch: sums over the
local rows are completed with ``lax.psum`` over ``axis_name`` when the loss
runs inside the data-parallel step, and ratios are taken only after that.
So a loss, and its gradient summed over devices, does not depend on how many
devices the batch is split over, even when the per-scan weights (``has_mask``)
differ between devices. With ``axis_name=None`` (tests, one device) the sums
are plain sums.

The training step must therefore ``psum`` (not ``pmean``) the per-device
gradients: each device holds the derivative through its own rows' terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from wmh_jax.models import kinds

SEG_LOSSES = ("dice", "dice_bce")
DICE_REDUCTIONS = ("scan", "batch")


def global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """``x`` summed over the mapped ``axis_name`` (identity when None)."""
  return x if axis_name is None else lax.psum(x, axis_name)


def _scan_sums(x: jax.Array) -> jax.Array:
  """(b, ...) -> (b,): sum over every axis but the first."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def mse(pred: jax.Array, target: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Mean squared error over all elements of same-shaped `pred` and `target` (global batch)."""
  total = global_sum(jnp.sum(jnp.square(pred - target)), axis_name)
  return total / global_sum(jnp.asarray(pred.size, jnp.float32), axis_name)


def soft_dice_loss(prob: jax.Array, mask: jax.Array, eps: float = 1.0,
                   weights: jax.Array | None = None, reduction: str = "scan",
                   axis_name: str | None = None) -> jax.Array:
  """1 - soft Dice, per scan then averaged (paper) or over the whole batch.

  dice = (2 sum(p m) + eps) / (sum(p) + sum(m) + eps), the sums over voxels
  of one scan (``reduction="scan"``; the loss is the weighted mean of the
  per-scan losses) or over all voxels of all weighted scans of the global
  batch (``"batch"``). The smoothing ``eps`` (voxels) makes an empty
  prediction of an empty mask score 1. With per-scan sums and eps = 1, an
  all-empty prediction scores 1/(M+1) on a scan of M lesion voxels, which is
  why predicting nothing attracts small-lesion scans (BUILD_NOTES).

  Args:
    prob: predicted foreground probability (b, x, y, z) in [0, 1].
    mask: reference mask (b, x, y, z) in {0, 1}.
    eps: smoothing, voxels.
    weights: optional (b,) per-scan weights in {0, 1} (``has_mask``); 0 when
      all weights of the global batch are 0.
    reduction: "scan" or "batch".
    axis_name: mapped data axis (None outside a mapped step).

  Returns:
    scalar loss in [0, 1].
  """
  weights = jnp.ones(prob.shape[:1], prob.dtype) if weights is None else weights
  intersection, pred_sum, mask_sum = (_scan_sums(prob * mask), _scan_sums(prob),
                                      _scan_sums(mask))
  if reduction == "scan":
    dice = (2.0 * intersection + eps) / (pred_sum + mask_sum + eps)
    total = global_sum(jnp.sum(weights * (1.0 - dice)), axis_name)
    return total / jnp.maximum(global_sum(jnp.sum(weights), axis_name), 1.0)
  if reduction == "batch":
    sums = global_sum(jnp.stack([jnp.sum(weights * s) for s in
                                 (intersection, pred_sum, mask_sum)]), axis_name)
    return 1.0 - (2.0 * sums[0] + eps) / (sums[1] + sums[2] + eps)
  raise ValueError(f"unknown Dice reduction {reduction!r}; expected one of {DICE_REDUCTIONS}")


def weighted_bce(logits: jax.Array, mask: jax.Array, pos_weight: float = 1.0,
                 weights: jax.Array | None = None, axis_name: str | None = None) -> jax.Array:
  """Binary cross-entropy on logits, mean over the voxels of weighted scans.

  Per voxel: ``pos_weight * m * softplus(-z) + (1 - m) * softplus(z)``
  (= ``-pos_weight m log σ(z) - (1-m) log(1-σ(z))``, stable for any z).

  Args:
    logits: (b, x, y, z) voxel logits.
    mask: (b, x, y, z) reference in {0, 1}.
    pos_weight: weight of lesion voxels (1 = plain BCE).
    weights: optional (b,) per-scan weights in {0, 1}.
    axis_name: mapped data axis.

  Returns:
    scalar, nats per voxel; 0 when no scan is weighted.
  """
  weights = jnp.ones(logits.shape[:1], logits.dtype) if weights is None else weights
  per_voxel = pos_weight * mask * jax.nn.softplus(-logits) + (1.0 - mask) * jax.nn.softplus(logits)
  voxels = logits[0].size
  total = global_sum(jnp.sum(weights * _scan_sums(per_voxel)), axis_name)
  return total / jnp.maximum(global_sum(jnp.sum(weights), axis_name) * voxels, 1.0)


def severity_ce(logits: jax.Array, labels: jax.Array, axis_name: str | None = None) -> jax.Array:
  """Mean softmax cross-entropy of logits (b, k) against int labels (b,) in [0, k)."""
  log_probs = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  count = global_sum(jnp.asarray(labels.shape[0], jnp.float32), axis_name)
  return -global_sum(jnp.sum(picked), axis_name) / count


def segmentation_loss(logits: jax.Array, mask: jax.Array, weights: jax.Array,
                      loss_config: ml_collections.ConfigDict,
                      axis_name: str | None = None) -> dict[str, jax.Array]:
  """The configured segmentation loss terms: ``dice_loss``, ``bce`` and their sum ``seg_loss``.

  ``loss_config.seg``: "dice" (paper: soft Dice of sigmoid(logits)) or
  "dice_bce" (nnU-Net: soft Dice + ``bce_weight`` x BCE on logits).
  """
  if loss_config.seg not in SEG_LOSSES:
    raise ValueError(f"unknown loss.seg {loss_config.seg!r}; expected one of {SEG_LOSSES}")
  terms = {"dice_loss": soft_dice_loss(jax.nn.sigmoid(logits), mask, loss_config.dice_eps,
                                       weights, loss_config.dice_reduction, axis_name)}
  terms["seg_loss"] = terms["dice_loss"]
  if loss_config.seg == "dice_bce":
    terms["bce"] = weighted_bce(logits, mask, loss_config.bce_pos_weight, weights, axis_name)
    terms["seg_loss"] = terms["seg_loss"] + loss_config.bce_weight * terms["bce"]
  return terms


def volume_mse_term(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                    config: ml_collections.ConfigDict, axis_name: str | None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MSE of ``outputs["volume"]`` against ``volume_ml / config.data.volume_scale_ml``."""
  target = batch["volume_ml"] / config.data.volume_scale_ml
  value = mse(outputs["volume"], target, axis_name)
  return value, {"mse": value}


def segmentation_term(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                      config: ml_collections.ConfigDict, axis_name: str | None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`segmentation_loss` of ``outputs["seg_logits"]``; records without a mask do not count."""
  metrics = segmentation_loss(outputs["seg_logits"], batch["mask"][..., 0], batch["has_mask"],
                              config.loss, axis_name)
  return metrics.pop("seg_loss"), metrics


def severity_term(outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
                  config: ml_collections.ConfigDict, axis_name: str | None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of ``outputs["severity_logits"]`` (and the batch accuracy as a metric)."""
  del config
  logits = outputs["severity_logits"]
  ce = severity_ce(logits, batch["severity"], axis_name)
  correct = (jnp.argmax(logits, axis=-1) == batch["severity"]).astype(jnp.float32)
  accuracy = (global_sum(jnp.sum(correct), axis_name)
              / global_sum(jnp.asarray(correct.size, jnp.float32), axis_name))
  return ce, {"ce": ce, "accuracy": accuracy}


# The loss terms a kind names (`wmh_jax.models.kinds.Kind.loss_terms`).
TERMS = {"volume_mse": volume_mse_term, "segmentation": segmentation_term,
         "severity_ce": severity_term}


def loss_fn(kind: str, outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
            config: ml_collections.ConfigDict, axis_name: str | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar training loss and scalar metrics of the global batch.

  The loss is the weighted sum, in order, of the kind's terms
  (`wmh_jax.models.kinds.Kind.loss_terms`): weak MSE on the volume; strong the
  segmentation loss; joint MSE + `config.train.joint_dice_weight` x the
  segmentation loss; severity CE.

  Args:
    kind: a registered model kind (`wmh_jax.models.kinds`).
    outputs: the model's output dict (see `wmh_jax.models.architectures`).
    batch: `image (b, x, y, z, 1)`, `mask (b, x, y, z, 1)`, `volume_ml (b,)`,
      `severity (b,)` int32, `has_mask (b,)` float; the regression target is
      `volume_ml / config.data.volume_scale_ml`. Segmentation terms only count
      records with `has_mask`.
    config: the full experiment config (`config.loss`, `config.train`).
    axis_name: mapped data axis (None outside a mapped step).

  Returns:
    (loss, metrics) where metrics holds 'loss' and the relevant terms among
    'mse', 'dice_loss', 'bce', 'ce' and 'accuracy'; all are global-batch values.

  Raises:
    ValueError: an unknown kind.
  """
  metrics = {}
  loss = None
  for term, weight in kinds.get(kind).loss_terms:
    value, term_metrics = TERMS[term](outputs, batch, config, axis_name)
    metrics.update(term_metrics)
    if weight is not None:
      value = _field(config, weight) * value
    loss = value if loss is None else loss + value
  metrics["loss"] = loss
  return loss, metrics


def _field(config: ml_collections.ConfigDict, dotted: str):
  """``config`` field at the dotted path ``dotted`` (e.g. "train.joint_dice_weight")."""
  for part in dotted.split("."):
    config = config[part]
  return config
