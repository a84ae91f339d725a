"""Tests for wmh_jax.training.losses: exact values, masking, and a few Adadelta steps per kind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tolerances import float32_rtol
from wmh_jax import configs
from wmh_jax.models import kinds
from wmh_jax.training import losses

# The 2-scan batches below: 16 x 16 x 8 voxels per scan.
VOXELS = 16 * 16 * 8


def _config(kind: str):
  config = configs.get_config("paper")
  config.model.kind = kind
  config.model.base_filters = 2
  config.model.depth = 1
  config.model.conv_impl = "native"  # fastest to compile; impls agree (test_conv)
  return config


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  """Two 16x16x8 scans with one bright box lesion each (40 and 150 voxels)."""
  rng = np.random.default_rng(seed)
  image = 0.3 + 0.05 * rng.standard_normal((2, 16, 16, 8, 1))
  mask = np.zeros((2, 16, 16, 8, 1))
  mask[0, 4:9, 4:8, 2:4] = 1.0
  mask[1, 3:13, 6:11, 3:6] = 1.0
  image = np.where(mask > 0, 0.9, image)
  return {
      "image": jnp.asarray(image, jnp.float32),
      "mask": jnp.asarray(mask, jnp.float32),
      "volume_ml": jnp.asarray([4.0, 15.0], jnp.float32),
      "severity": jnp.asarray([1, 3], jnp.int32),
      "has_mask": jnp.asarray([1.0, 1.0], jnp.float32),
  }


def test_mse():
  np.testing.assert_allclose(
      losses.mse(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 1.0])),
      (0.0 + 4.0 + 9.0) / 3, rtol=float32_rtol(3, ops=1))


# Soft Dice of 8-voxel scans: sums of 8 terms, then ~4 rounded operations.
DICE8_RTOL = float32_rtol(8, ops=4)


def test_soft_dice_per_scan_then_mean():
  prob = jnp.zeros((2, 2, 2, 2)).at[0, 0, 0, :].set(1.0).at[1].set(0.5)
  mask = jnp.zeros((2, 2, 2, 2)).at[0, 0, 0, 0].set(1.0).at[1, 0].set(1.0)
  # scan 0: inter 1, sum p 2, sum m 1; scan 1: inter 2, sum p 4, sum m 4.
  dice0 = (2 * 1 + 1) / (2 + 1 + 1)
  dice1 = (2 * 2 + 1) / (4 + 4 + 1)
  np.testing.assert_allclose(losses.soft_dice_loss(prob, mask),
                             ((1 - dice0) + (1 - dice1)) / 2, rtol=DICE8_RTOL)
  np.testing.assert_allclose(
      losses.soft_dice_loss(prob, mask, weights=jnp.array([0.0, 1.0])),
      1 - dice1, rtol=DICE8_RTOL)
  # Exact: a zero total weight gives 0 / max(0, 1); an empty scan 1 - 1 / 1.
  assert float(losses.soft_dice_loss(prob, mask, weights=jnp.zeros(2))) == 0.0
  empty = jnp.zeros((1, 2, 2, 2))
  assert float(losses.soft_dice_loss(empty, empty)) == 0.0


def test_soft_dice_batch_reduction_and_empty_prediction():
  prob = jnp.zeros((2, 2, 2, 2)).at[0, 0, 0, :].set(1.0).at[1].set(0.5)
  mask = jnp.zeros((2, 2, 2, 2)).at[0, 0, 0, 0].set(1.0).at[1, 0].set(1.0)
  # batch sums: inter 1 + 2, sum p 2 + 4, sum m 1 + 4.
  np.testing.assert_allclose(losses.soft_dice_loss(prob, mask, reduction="batch"),
                             1 - (2 * 3 + 1) / (6 + 5 + 1), rtol=DICE8_RTOL)
  np.testing.assert_allclose(
      losses.soft_dice_loss(prob, mask, weights=jnp.array([0.0, 1.0]), reduction="batch"),
      1 - (2 * 2 + 1) / (4 + 4 + 1), rtol=DICE8_RTOL)
  # The collapse: per scan with eps 1, predicting nothing on a 1-voxel lesion
  # scores Dice 1/2; over the batch it is 1/(M+1) of all M lesion voxels.
  empty = jnp.zeros_like(prob)
  np.testing.assert_allclose(losses.soft_dice_loss(empty, mask), 1 - (0.5 + 1 / 5) / 2,
                             rtol=DICE8_RTOL)
  np.testing.assert_allclose(losses.soft_dice_loss(empty, mask, reduction="batch"),
                             1 - 1 / 6, rtol=DICE8_RTOL)
  with pytest.raises(ValueError, match="unknown Dice reduction 'voxel'"):
    losses.soft_dice_loss(prob, mask, reduction="voxel")


def test_weighted_bce_matches_log_likelihood():
  logits = jnp.array([[[[3.0, -1.0]]], [[[0.5, -40.0]]]])
  mask = jnp.array([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
  sigmoid = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  nll = -(mask * np.log(sigmoid) + (1 - mask) * np.log1p(-sigmoid))
  # 4 voxels of positive terms; softplus (4 ops), weighting and the mean (4 ops).
  rtol = float32_rtol(4, ops=8)
  np.testing.assert_allclose(losses.weighted_bce(logits, mask), nll.mean(), rtol=rtol)
  weighted = np.where(mask > 0, 5.0 * nll, nll)
  np.testing.assert_allclose(losses.weighted_bce(logits, mask, pos_weight=5.0),
                             weighted.mean(), rtol=rtol)
  np.testing.assert_allclose(losses.weighted_bce(logits, mask, weights=jnp.array([0.0, 1.0])),
                             nll[1].mean(), rtol=rtol)
  # Exact: a zero total weight gives 0 / max(0, 1).
  assert float(losses.weighted_bce(logits, mask, weights=jnp.zeros(2))) == 0.0


def test_severity_ce():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 2])
  expected = (-(2.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0))) + np.log(3.0)) / 2
  # log_softmax of 3 classes (3 exp, a sum of 3, a log, 2 differences: ~12 ops) and a
  # mean of 2. The roundings act on terms up to 2.17 (logsumexp of row 0), 1.7x the
  # summed result 1.27: a factor 2 on the rule.
  np.testing.assert_allclose(losses.severity_ce(logits, labels), expected,
                             rtol=2 * float32_rtol(3 + 2, ops=12))


def test_loss_fn_terms_and_metrics():
  batch = _batch()
  batch["has_mask"] = jnp.array([1.0, 0.0])
  config = _config("joint")
  config.train.joint_dice_weight = 0.5
  config.loss.seg = "dice"
  config.loss.dice_reduction = "scan"
  seg_logits = batch["mask"][..., 0] * 4.0 - 2.0
  outputs = {"volume": jnp.array([0.5, 1.0]), "seg_logits": seg_logits,
             "attention": jnp.zeros((2, 16, 16, 8))}
  loss, metrics = losses.loss_fn("joint", outputs, batch, config)
  mse = ((0.5 - 0.4) ** 2 + (1.0 - 1.5) ** 2) / 2  # targets mL / 10
  # Float64 reference Dice of scan 0 (the only one with a mask): sigmoid(±2) voxels.
  prob0 = 1 / (1 + np.exp(-np.asarray(seg_logits[0], np.float64)))
  mask0 = np.asarray(batch["mask"][0, ..., 0], np.float64)
  dice = 1 - (2 * np.sum(prob0 * mask0) + 1) / (np.sum(prob0) + np.sum(mask0) + 1)
  assert set(metrics) == {"loss", "mse", "dice_loss"}
  # Sums of positive terms over one scan's voxels then over the 2 scans, in an order
  # XLA chooses: the worst case of any order (tests/tolerances.py), plus the sigmoid
  # (4 ops) and the ratios (rtol 2.5e-4). A wrong Dice smoothing (eps 0) moves dice_loss
  # by 3e-3.
  rtol = float32_rtol(VOXELS + 2, ops=8)
  np.testing.assert_allclose(metrics["mse"], mse, rtol=float32_rtol(2, ops=4))
  np.testing.assert_allclose(metrics["dice_loss"], dice, rtol=rtol)
  np.testing.assert_allclose(loss, mse + 0.5 * dice, rtol=rtol)
  assert metrics["loss"] is loss

  config.loss.seg = "dice_bce"
  config.loss.bce_weight = 2.0
  loss, metrics = losses.loss_fn("joint", outputs, batch, config)
  assert set(metrics) == {"loss", "mse", "dice_loss", "bce"}
  # Only scan 0 has a mask: BCE of logit ±2 is softplus(-2) on every voxel.
  np.testing.assert_allclose(metrics["bce"], np.log1p(np.exp(-2.0)), rtol=rtol)
  np.testing.assert_allclose(loss, mse + 0.5 * (dice + 2.0 * np.log1p(np.exp(-2.0))),
                             rtol=rtol)

  _, weak = losses.loss_fn("weak", outputs, batch, config)
  assert set(weak) == {"loss", "mse"}
  _, sev = losses.loss_fn(
      "severity", {"severity_logits": jnp.eye(5)[jnp.array([1, 0])] * 3.0},
      batch, config)
  assert set(sev) == {"loss", "ce", "accuracy"}
  np.testing.assert_array_equal(sev["accuracy"], 0.5)  # exact: 1 of 2
  with pytest.raises(ValueError, match="unknown model kind 'cnn'"):
    losses.loss_fn("cnn", outputs, batch, config)


def _initial_params(model, image: jax.Array, target_mean: float):
  """`model.init`-shaped variables, N(0, 1/fan_in) from NumPy (XLA:CPU compiles
  random initialisers slowly); the volume bias starts at the mean target."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), image)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if "volume_head" in jax.tree_util.keystr(path) and len(leaf.shape) == 1:
      return jnp.full(leaf.shape, target_mean, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _train(kind: str, steps: int = 10) -> list[float]:
  """Losses of `steps` full-batch Adadelta steps (Keras lr/rho/eps) on `_batch`."""
  config = _config(kind)
  batch = _batch()
  model = kinds.build_model(config.model)
  target_mean = float(batch["volume_ml"].mean()) / config.data.volume_scale_ml
  params = _initial_params(model, batch["image"], target_mean)
  optimizer = optax.adadelta(learning_rate=1.0, rho=0.95, eps=1e-7)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    def objective(p):
      return losses.loss_fn(kind, model.apply(p, batch["image"], train=True),
                            batch, config)[0]
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  history = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    history.append(float(loss))
  return history


@pytest.mark.parametrize("kind,min_drop", [
    ("weak", 0.2), ("strong", 0.001), ("joint", 0.1), ("severity", 0.2)])
def test_adadelta_lr1_decreases_loss(kind, min_drop):
  # Soft Dice moves slowly: Adadelta's first updates are ~sqrt(eps) in size.
  history = np.array(_train(kind))
  assert np.all(np.isfinite(history))
  assert np.all(np.diff(history) < 0), history
  assert history[-1] < (1.0 - min_drop) * history[0], history


def test_adadelta_default_learning_rate_climbs():
  # optax.adadelta(learning_rate=None) scales by nothing and flips no sign:
  # it ascends the loss, so every config must pass learning_rate=1.0.
  def f(x):
    return jnp.sum(x ** 2)
  for learning_rate, climbs in ((None, True), (1.0, False)):
    optimizer = optax.adadelta(learning_rate=learning_rate, rho=0.95, eps=1e-7)
    x = jnp.array([1.0, -2.0, 3.0])
    state = optimizer.init(x)
    for _ in range(5):
      updates, state = optimizer.update(jax.grad(f)(x), state, x)
      x = optax.apply_updates(x, updates)
    assert (float(f(x)) > 14.0) == climbs
