"""Training losses per model kind (paper §2.2): MSE, soft Dice, joint, severity CE.

These are per-device functions of the local batch (plain means); the sharded
training step averages the loss gradients and metrics across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

DICE_EPS = 1.0


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements of same-shaped `pred` and `target`."""
  return jnp.mean(jnp.square(pred - target))


def soft_dice_loss(prob: jax.Array, mask: jax.Array, eps: float = DICE_EPS,
                   weights: jax.Array | None = None) -> jax.Array:
  """1 - soft Dice, computed per scan and averaged over scans.

  Per scan, dice = (2 sum(p m) + eps) / (sum(p) + sum(m) + eps), the sums
  running over voxels. The smoothing `eps` (in voxels) keeps the ratio finite
  and makes an empty prediction of an empty mask score 1 (loss 0); with lesion
  loads of hundreds of voxels it barely changes the Dice of non-empty masks.

  Args:
    prob: predicted foreground probability (b, x, y, z) in [0, 1].
    mask: reference mask (b, x, y, z) in {0, 1}.
    eps: smoothing, voxels.
    weights: optional (b,) per-scan weights (e.g. `has_mask`); the loss is
      the weighted mean, and 0 when all weights are 0.

  Returns:
    scalar loss in [0, 1].
  """
  axes = tuple(range(1, prob.ndim))
  intersection = jnp.sum(prob * mask, axis=axes)
  dice = (2.0 * intersection + eps) / (
      jnp.sum(prob, axis=axes) + jnp.sum(mask, axis=axes) + eps)
  if weights is None:
    return jnp.mean(1.0 - dice)
  return jnp.sum(weights * (1.0 - dice)) / jnp.maximum(jnp.sum(weights), 1.0)


def severity_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits (b, k) against int labels (b,) in [0, k)."""
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def loss_fn(kind: str, outputs: dict[str, jax.Array], batch: dict[str, jax.Array],
            config: ml_collections.ConfigDict
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar training loss and scalar metrics for one local batch.

  Args:
    kind: 'weak' (MSE on volume), 'strong' (soft Dice), 'joint' (MSE +
      `config.train.joint_dice_weight` * soft Dice) or 'severity' (CE).
    outputs: the model's output dict (see `models`).
    batch: `image (b, x, y, z, 1)`, `mask (b, x, y, z, 1)`, `volume_ml (b,)`,
      `severity (b,)` int32, `has_mask (b,)` float; the regression target is
      `volume_ml / config.data.volume_scale_ml`. Dice terms only count
      records with `has_mask`.
    config: the full experiment config.

  Returns:
    (loss, metrics) where metrics holds 'loss' and the relevant terms among
    'mse', 'dice_loss', 'ce' and 'accuracy'.
  """
  metrics = {}
  if kind in ("weak", "joint"):
    target = batch["volume_ml"] / config.data.volume_scale_ml
    metrics["mse"] = mse(outputs["volume"], target)
  if kind in ("strong", "joint"):
    metrics["dice_loss"] = soft_dice_loss(outputs["seg_prob"],
                                          batch["mask"][..., 0],
                                          weights=batch["has_mask"])
  if kind == "weak":
    loss = metrics["mse"]
  elif kind == "strong":
    loss = metrics["dice_loss"]
  elif kind == "joint":
    loss = metrics["mse"] + config.train.joint_dice_weight * metrics["dice_loss"]
  elif kind == "severity":
    logits = outputs["severity_logits"]
    metrics["ce"] = severity_ce(logits, batch["severity"])
    metrics["accuracy"] = jnp.mean(
        (jnp.argmax(logits, axis=-1) == batch["severity"]).astype(jnp.float32))
    loss = metrics["ce"]
  else:
    raise ValueError(f"unknown model kind {kind!r}; expected one of "
                     "('weak', 'strong', 'joint', 'severity')")
  metrics["loss"] = loss
  return loss, metrics
