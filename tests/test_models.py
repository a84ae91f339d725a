"""Tests for wmh_jax.models.architectures: shapes, attention identity, param layout, errors.

XLA:CPU compiles random initialisers slowly, so most tests take the parameter
shapes from `jax.eval_shape(model.init, ...)` and fill them from NumPy
(`_random_params`); `test_volume_bias_init` exercises a real `init`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tolerances import assert_close_to_abs_sum, float32_rtol
from wmh_jax import configs
from wmh_jax.models import architectures, kinds
from wmh_jax.study import probe

SHAPE = (2, 16, 16, 8, 1)
KEY = jax.random.key(0)
VOXELS = 16 * 16 * 8
# Terms of the reductions along one path through the depth-1, f=2 U-Net of
# `_model_config` (tests/tolerances.py): six 3x3x3 convolutions over 1, 2, 3, 4,
# 10 and 2 input channels, the global average pool over the voxels and the
# 12-channel dense head. Two float32 evaluations of it in different orders
# (impls, batch shapes) differ by at most float32_rtol(UNET_TERMS, sides=2)
# relative to the magnitude of the outputs.
UNET_TERMS = 27 * (1 + 2 + 3 + 4 + 10 + 2) + VOXELS + 12


def _model_config(kind: str, **overrides):
  cfg = configs.get_config().model
  cfg.kind = kind
  cfg.base_filters = 2
  cfg.depth = 1
  for name, value in overrides.items():
    cfg[name] = value
  return cfg


def _image(shape=SHAPE, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


def _random_params(model: nn.Module, x: jax.Array, seed: int = 0):
  """Variables shaped as `model.init` makes them, N(0, 1/fan_in) from NumPy."""
  shapes = jax.eval_shape(model.init, KEY, x)
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in),
                       leaf.dtype)
  return jax.tree_util.tree_map(fill, shapes)


# Channels of the last feature map of the `_model_config` U-Net (f = 2): the
# upsampled coarse map, the skip (input + down block) and the up block. Depth 1:
# coarse = skip + 4 = 7. Depth 2: down_1 = 3 + 4 = 7, bottom = 7 + 8 = 15,
# up_1 = 15 + 7 + 4 = 26 is the coarse map of up_0.
CHANNELS = {1: 7 + 3 + 2, 2: 26 + 3 + 2}


@pytest.mark.parametrize("kind,expected", [
    ("weak", {"volume": (2,), "attention": (2, 16, 16, 8), "pooled": (2, "C")}),
    ("strong", {"seg_logits": (2, 16, 16, 8)}),
    ("joint", {"volume": (2,), "attention": (2, 16, 16, 8), "pooled": (2, "C"),
               "seg_logits": (2, 16, 16, 8)}),
    ("severity", {"severity_logits": (2, 5)}),
])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("head", ["gap", "count"])
def test_output_keys_and_shapes(kind, expected, depth, head):
  model = kinds.build_model(_model_config(kind, depth=depth, volume_head=head),
                             voxel_target=1e-3)
  x = _image()
  params = jax.eval_shape(model.init, KEY, x)
  out = jax.eval_shape(lambda p: model.apply(p, x, train=True), params)
  pooled = CHANNELS[depth] if head == "gap" else configs.get_config().model.count_hidden
  assert {k: v.shape for k, v in out.items()} == {
      k: tuple(pooled if n == "C" else n for n in v) for k, v in expected.items()}
  assert all(v.dtype == jnp.float32 for v in out.values())


def test_joint_outputs_and_attention_identity():
  model = kinds.build_model(_model_config("joint", pool_scale=50.0, pooled_norm="none"))
  x = _image()
  params = _random_params(model, x)
  out = jax.jit(model.apply)(params, x)
  bias = params["params"]["volume_head"]["dense"]["bias"][0]
  # The same affine map averaged over the voxels before (volume) or after
  # (attention) the 12-channel dot product: mixed signs, so bounded relative
  # to the mean magnitude of the attention map plus the bias (both sides float32).
  assert_close_to_abs_sum(out["attention"].mean(axis=(1, 2, 3)) + bias, out["volume"],
                          jnp.abs(out["attention"]).mean(axis=(1, 2, 3)) + abs(bias),
                          float32_rtol(VOXELS + 12, ops=4, sides=2))
  # attention is pool_scale * F . W: not a trivial 0 == 0 identity.
  assert float(jnp.abs(out["attention"]).mean()) > 1e-2
  assert abs(float(out["volume"][0] - out["volume"][1])) > 1e-4
  assert float(out["seg_logits"].std()) > 1e-3


def test_feature_stack_mean_and_projection_match_the_materialised_map():
  keys = jax.random.split(jax.random.key(5), 4)
  coarse = jax.random.normal(keys[0], (2, 2, 3, 2, 5))
  skip = jax.random.normal(keys[1], (2, 4, 6, 4, 3))
  block = jax.random.normal(keys[2], (2, 4, 6, 4, 2))
  stack = architectures.FeatureStack(((coarse, 2), (skip, 1), (block, 1)))
  full = stack.materialize()
  assert full.shape == (2, 4, 6, 4, 10) and stack.channels == 10
  # Channel order and nearest upsampling: exact copies.
  np.testing.assert_array_equal(full[:, 1::2, ::2, 1::2, :5], coarse)
  np.testing.assert_array_equal(full[..., 5:8], skip)
  weights = jax.random.normal(keys[3], (10,))
  # A 10-term dot product per voxel, both sides float32.
  assert_close_to_abs_sum(stack.project(weights), full @ weights, jnp.abs(full) @ jnp.abs(weights),
                          float32_rtol(10, ops=1, sides=2))
  # A mean over 96 voxels (the coarse part: over 12, then exact copies), both sides float32.
  assert_close_to_abs_sum(stack.mean(), full.mean(axis=(1, 2, 3)),
                          jnp.abs(full).mean(axis=(1, 2, 3)), float32_rtol(96, ops=1, sides=2))
  one = architectures.FeatureStack.of(skip)
  assert one.parts == ((skip, 1),) and architectures.FeatureStack.of(stack) is stack
  with pytest.raises(ValueError, match="factor 1 or 2"):
    architectures.FeatureStack(((skip, 4),)).project(weights[:3])


class _DenseSegHead(nn.Module):
  """The segmentation head as it was before `VoxelDense`: nn.Dense(1) on the full map."""

  @nn.compact
  def __call__(self, features):
    dense = nn.Dense(1, bias_init=nn.initializers.constant(-1.0), name="dense")
    return dense(features)[..., 0]


def test_seg_head_has_nn_dense_parameters_and_outputs():
  features = _image((2, 2, 2, 2, 5))
  key = jax.random.key(4)
  head = architectures.SegHead(bias_init=-1.0)
  params = head.init(key, features)
  reference = _DenseSegHead().init(key, features)
  # Same names, shapes and initial values: checkpoints of either load in the other.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_array_equal(got, want)
  kernel = params["params"]["dense"]["kernel"][:, 0]
  # A 5-term dot product plus the bias per voxel, both sides float32.
  assert_close_to_abs_sum(head.apply(params, features), _DenseSegHead().apply(params, features),
                          jnp.abs(features) @ jnp.abs(kernel) + 1.0,
                          float32_rtol(5, ops=2, sides=2))


def test_volume_bias_init():
  head = architectures.VolumeHead(pool_scale=2.0, volume_bias_init=0.3)
  features = _image((2, 2, 2, 2, 3))
  params = jax.jit(head.init)(jax.random.key(1, impl="rbg"), features)
  assert jax.tree_util.tree_map(jnp.shape, params) == {
      "params": {"dense": {"kernel": (3, 1), "bias": (1,)}},
      "readout": {"dense": {"kernel": (3,), "bias": (), "fitted": ()}}}
  assert float(params["readout"]["dense"]["fitted"]) == 0.0
  np.testing.assert_array_equal(params["params"]["dense"]["bias"], np.float32([0.3]))
  out = head.apply(params, features)
  weights = params["params"]["dense"]["kernel"][:, 0]
  # Dot products of 3 mixed-sign terms (after a mean over 8 voxels for the
  # volume), both sides float32: bounded relative to the same sums of magnitudes.
  abs_weights = jnp.abs(weights)
  assert_close_to_abs_sum(out["attention"], 2.0 * features @ weights,
                          2.0 * jnp.abs(features) @ abs_weights,
                          float32_rtol(3, ops=2, sides=2))
  assert_close_to_abs_sum(
      out["volume"], 2.0 * features.mean(axis=(1, 2, 3)) @ weights + 0.3,
      2.0 * jnp.abs(features).mean(axis=(1, 2, 3)) @ abs_weights + 0.3,
      float32_rtol(8 + 3, ops=3, sides=2))
  zero = architectures.VolumeHead(volume_bias_init=0.3, zero_init_kernel=True)
  out = zero.apply(jax.jit(zero.init)(jax.random.key(1, impl="rbg"), features),
                   features)
  # Exact: a zero kernel makes every product and sum 0.0, plus the bias 0.3f.
  np.testing.assert_array_equal(out["volume"], np.float32([0.3, 0.3]))
  np.testing.assert_array_equal(out["attention"], 0.0)


def test_a_fitted_readout_replaces_the_dense_layer_at_inference_only():
  head = architectures.VolumeHead(pool_scale=2.0, volume_bias_init=0.3)
  features = _image((2, 2, 2, 2, 3))
  variables = jax.jit(head.init)(jax.random.key(1, impl="rbg"), features)
  trained = head.apply(variables, features)
  fit = {"kernel": jnp.float32([1.0, -2.0, 0.5]), "bias": jnp.float32(4.0),
         "fitted": jnp.float32(1.0)}
  refitted = {**variables, "readout": {"dense": fit}}
  out = head.apply(refitted, features)
  pooled = 2.0 * features.mean(axis=(1, 2, 3))
  # The readout's dot product of 3 terms, both sides float32 (as test_volume_bias_init).
  assert_close_to_abs_sum(out["volume"], pooled @ fit["kernel"] + 4.0,
                          jnp.abs(pooled) @ jnp.abs(fit["kernel"]) + 4.0,
                          float32_rtol(8 + 3, ops=3, sides=2))
  assert_close_to_abs_sum(out["attention"], 2.0 * features @ fit["kernel"],
                          2.0 * jnp.abs(features) @ jnp.abs(fit["kernel"]),
                          float32_rtol(3, ops=2, sides=2))
  # Training and an unfitted readout use the trained Dense layer: the same program, exact.
  np.testing.assert_array_equal(head.apply(refitted, features, train=True)["volume"],
                                head.apply(variables, features, train=True)["volume"])
  unfitted = {**variables, "readout": {"dense": {**fit, "fitted": jnp.float32(0.0)}}}
  np.testing.assert_array_equal(head.apply(unfitted, features)["volume"], trained["volume"])
  # A checkpoint from before the readout existed (no collection) infers with the Dense layer.
  np.testing.assert_array_equal(head.apply({"params": variables["params"]}, features)["volume"],
                                trained["volume"])


def test_params_and_outputs_identical_across_conv_impls():
  x = _image()
  impls = ("native", "depth2d", "depth2d_concat", "auto")
  built = {i: kinds.build_model(_model_config("joint", conv_impl=i))
           for i in impls}
  shapes = {i: jax.eval_shape(m.init, KEY, x) for i, m in built.items()}
  for impl in impls:
    assert shapes[impl] == shapes["native"], impl
  # Layer-level equality of every impl is in test_conv; here native vs auto.
  params = _random_params(built["native"], x)
  ref = jax.jit(built["native"].apply)(params, x)
  out = jax.jit(built["auto"].apply)(params, x)
  for key in ref:
    np.testing.assert_allclose(out[key], ref[key], rtol=0,
                               atol=float32_rtol(UNET_TERMS, sides=2) * float(
                                   jnp.abs(ref[key]).max()), err_msg=key)


def test_count_params_matches_hand_count():
  # depth 1, f=2: down_0 1->2->2 (3 ch out), bottom 3->4->4 (7 ch),
  # up_0 concat(7, 3)=10 -> 2 -> 2 (12 ch), Dense 12->1.
  def conv(ci, co):
    return 27 * ci * co + co
  expected = (conv(1, 2) + conv(2, 2) + conv(3, 4) + conv(4, 4) + conv(10, 2)
              + conv(2, 2) + 12 + 1)
  model = kinds.build_model(_model_config("weak"))
  variables = jax.eval_shape(model.init, KEY, _image((1, 4, 4, 2, 1)))
  assert architectures.count_params(variables["params"]) == expected == 1595
  # Running statistics of the 12 pooled channels (mean, mean square, step count).
  assert architectures.count_params(variables["batch_stats"]) == 12 + 12 + 1


def test_max_pool_matches_flax():
  x = _image((1, 4, 6, 2, 3), seed=1)
  np.testing.assert_array_equal(
      architectures.max_pool_2x(x), nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2)))


def test_non_divisible_shape_raises():
  model = kinds.build_model(_model_config("weak", depth=2))
  with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 4"):
    jax.eval_shape(model.init, KEY, _image((1, 16, 16, 6, 1)))


def test_bad_config_raises():
  with pytest.raises(ValueError, match="unknown model kind 'cnn'"):
    kinds.build_model(_model_config("cnn"))
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    kinds.build_model(_model_config("weak", conv_impl="fft"))
  with pytest.raises(ValueError, match="depth must be >= 0"):
    kinds.build_model(_model_config("weak", depth=-1))
  with pytest.raises(ValueError, match="model.norm='batch'"):
    kinds.build_model(_model_config("weak", norm="batch"))
  with pytest.raises(ValueError, match="model.pooled_norm='layer'"):
    kinds.build_model(_model_config("weak", pooled_norm="layer"))


def test_running_standardize_first_update_sets_batch_moments():
  module = architectures.RunningStandardize(momentum=0.9, eps=0.0)
  x = jnp.asarray([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
  variables = module.init(KEY, x)
  # Never updated: the identity.
  np.testing.assert_array_equal(module.apply(variables, x)[0], x)
  (y, mean, inv_std), updated = module.apply(variables, x, update=True, mutable=["batch_stats"])
  # Means of 3 positive terms and the momentum/debias arithmetic (~6 ops).
  rtol = float32_rtol(3, ops=6)
  np.testing.assert_allclose(mean, [3.0, 12.0], rtol=rtol)
  # variance = E[x^2] - mean^2 cancels: E[x^2] / variance = 152 / 8 = 19 for the
  # second channel; rsqrt halves the relative error and adds 4 ops.
  std_rtol = 19 * rtol / 2 + float32_rtol(0, ops=4)
  np.testing.assert_allclose(inv_std, 1.0 / np.sqrt([8.0 / 3.0, 8.0]), rtol=std_rtol)
  # Exactly 0 in exact arithmetic: the mean's error (relative to |x| <= 16) times
  # inv_std, plus the standardisation's own roundings.
  np.testing.assert_allclose(y.mean(axis=0), 0.0,
                             atol=float(np.max(rtol * np.abs(x).max(axis=0) * inv_std)))
  np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=std_rtol + float32_rtol(3, ops=4))
  # The same function at inference (no update): identical outputs.
  np.testing.assert_array_equal(module.apply({**variables, **updated}, x)[0], y)
  # A second batch moves the statistics by (1 - momentum) of the way, debiased.
  x2 = x + 10.0
  (_, mean2, _), _ = module.apply({**variables, **updated}, x2, update=True,
                                  mutable=["batch_stats"])
  expected = (0.9 * 0.1 * np.array([3.0, 12.0]) + 0.1 * np.array([13.0, 22.0])) / (1 - 0.81)
  # The debias 1 - 0.9**2 = 0.19 cancels 0.81 / 0.19 ~ 4.3x the roundings of 0.9f.
  np.testing.assert_allclose(mean2, expected, rtol=5 * float32_rtol(3, ops=8))


def test_running_pooled_norm_keeps_attention_identity_and_spreads_predictions():
  model = kinds.build_model(_model_config("weak", pooled_norm="running",
                                           zero_init_volume_head=False))
  x = _image((4, 16, 16, 8, 1))
  variables = _random_params(model, x)
  variables["batch_stats"] = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  trained = {**variables, **updated}
  out = jax.jit(model.apply)(trained, x)
  bias = variables["params"]["volume_head"]["dense"]["bias"][0]
  # As in test_joint_outputs_and_attention_identity (standardisation folded into
  # the voxel-wise map: a few more roundings per voxel).
  assert_close_to_abs_sum(out["attention"].mean(axis=(1, 2, 3)) + bias, out["volume"],
                          jnp.abs(out["attention"]).mean(axis=(1, 2, 3)) + abs(bias),
                          float32_rtol(VOXELS + 12, ops=8, sides=2))
  # Standardised pooled features: the volume's spread over the batch is that
  # of W . z with z of unit variance per channel, not a tiny fraction of it.
  weights = variables["params"]["volume_head"]["dense"]["kernel"][:, 0]
  assert float(out["volume"].std()) > 0.1 * float(jnp.linalg.norm(weights)), out["volume"]


def _count_model_outputs(voxel_target: float, x: jax.Array) -> tuple[dict, dict]:
  """A weak count-head model with random params and trained running statistics, and its outputs."""
  model = kinds.build_model(_model_config("weak", volume_head="count", count_hidden=6),
                             voxel_target=voxel_target)
  variables = _random_params(model, x)
  variables["batch_stats"] = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  trained = {**variables, **updated}
  return trained, jax.jit(model.apply)(trained, x)


def test_count_head_attention_is_the_volume_spread_over_the_brain():
  x = np.array(_image((4, 16, 16, 8, 1)))
  x[:, :5] = 0.0  # outside the brain
  x[1, :, :, :4] = 0.0  # a smaller brain
  variables, out = _count_model_outputs(2e-3, jnp.asarray(x))
  brain = x[..., 0] > 0
  assert np.all(np.asarray(out["attention"])[~brain] == 0.0)
  # attention sums to the volume: u * h . (inv_std W) summed over the brain, plus
  # the constant spread over the brain voxels (mixed signs: relative to the magnitudes).
  bias = variables["params"]["volume_head"]["dense"]["bias"][0]
  assert_close_to_abs_sum(out["attention"].sum(axis=(1, 2, 3)), out["volume"],
                          jnp.abs(out["attention"]).sum(axis=(1, 2, 3)) + abs(bias),
                          float32_rtol(VOXELS + 6, ops=12, sides=2))
  assert float(out["volume"].std()) > 1e-3, out["volume"]
  assert out["pooled"].shape == (4, 6)


def test_count_head_sums_volumes_not_fractions():
  """The pooled sums are in volume units: a larger voxel gives proportionally larger sums."""
  model = kinds.build_model(_model_config("weak", volume_head="count", count_hidden=6),
                             voxel_target=1e-3)
  x = _image()
  variables = _random_params(model, x)
  variables["batch_stats"] = jax.tree.map(jnp.zeros_like, variables["batch_stats"])  # identity
  sums = {}
  for u in (1e-3, 3e-3):
    model = kinds.build_model(_model_config("weak", volume_head="count", count_hidden=6),
                               voxel_target=u)
    sums[u] = jax.jit(model.apply)(variables, x)["pooled"]  # untrained statistics: identity
  assert float(jnp.min(sums[1e-3])) >= 0.0 and float(jnp.max(sums[1e-3])) > 0.0
  # Sums of non-negative terms: the bound is relative to the result itself.
  np.testing.assert_allclose(sums[3e-3], 3 * sums[1e-3],
                             rtol=float32_rtol(VOXELS, ops=4, sides=2))


def test_count_head_needs_the_voxel_volume():
  with pytest.raises(ValueError, match="voxel_target"):
    kinds.build_model(_model_config("weak", volume_head="count"))
  with pytest.raises(ValueError, match="count_hidden"):
    kinds.build_model(_model_config("weak", volume_head="count", count_hidden=0),
                       voxel_target=1e-3)
  with pytest.raises(ValueError, match="volume_head"):
    kinds.build_model(_model_config("weak", volume_head="max"), voxel_target=1e-3)


def test_counts_readout_is_the_probes_random_relu_brain_sum_and_replaces_the_head_once_fitted():
  x = np.array(_image((4, 16, 16, 8, 1)))
  x[:, :5] = 0.0  # outside the brain
  x[1, :, :, :4] = 0.0  # a smaller brain
  x = jnp.asarray(x)
  u = 2e-3
  model = kinds.build_model(_model_config("weak", readout="counts", readout_hidden=5),
                            voxel_target=u)
  plain = kinds.build_model(_model_config("weak"), voxel_target=u)
  variables = _random_params(model, x)
  assert set(variables["readout"]["count_readout"]) == {"kernel", "bias", "fitted"}
  unfitted = jax.jit(model.apply)(variables, x)
  head_only = {k: v for k, v in variables.items() if k != "readout"}
  head = jax.jit(plain.apply)({**head_only, "readout": {"volume_head": variables["readout"][
      "volume_head"]}}, x)
  # Unfitted, the volume head answers: the same program on the same weights, exact.
  np.testing.assert_array_equal(unfitted["volume"], head["volume"])
  # counts are the probe's "random relu brain sum" (seed 0), in target units instead of mL.
  body = architectures.UNetBody(**architectures.body_fields(_model_config("weak")))
  channels = jax.eval_shape(body.apply, {"params": variables["params"]["body"]}, x).channels
  pool = probe.make_pooling(body, 5, 0, channels, voxel_ml=u)
  np.testing.assert_allclose(unfitted["counts"],
                             pool(variables["params"]["body"], x)["random relu brain sum"],
                             rtol=float32_rtol(VOXELS, ops=8))
  fit = {"kernel": jnp.float32([1.0, -2.0, 0.5, 0.0, 3.0]), "bias": jnp.float32(0.7),
         "fitted": jnp.float32(1.0)}
  fitted_vars = {**variables, "readout": {**variables["readout"], "count_readout": fit}}
  out = jax.jit(model.apply)(fitted_vars, x)
  expected = unfitted["counts"] @ fit["kernel"] + fit["bias"]
  magnitude = jnp.abs(unfitted["counts"]) @ jnp.abs(fit["kernel"]) + fit["bias"]
  assert_close_to_abs_sum(out["volume"], expected, magnitude, float32_rtol(5, ops=3, sides=2))
  # The attention map is a density: zero outside the brain, summing to the volume.
  brain = np.asarray(x[..., 0] > 0)
  assert np.all(np.asarray(out["attention"])[~brain] == 0.0)
  assert_close_to_abs_sum(out["attention"].sum(axis=(1, 2, 3)), out["volume"],
                          jnp.abs(out["attention"]).sum(axis=(1, 2, 3)) + fit["bias"],
                          float32_rtol(VOXELS + 5, ops=12, sides=2))
  # Training never uses the fit.
  np.testing.assert_array_equal(model.apply(fitted_vars, x, train=True)["volume"],
                                model.apply(variables, x, train=True)["volume"])
  with pytest.raises(ValueError, match="readout"):
    kinds.build_model(_model_config("weak", readout="mean"), voxel_target=u)


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_body_norm_normalises_each_scan(norm):
  model = kinds.build_model(_model_config("strong", norm=norm))
  x = _image()
  variables = _random_params(model, x)
  names = jax.tree_util.keystr(variables["params"]["body"]["down_0"])
  assert "norm_0" in names and "norm_1" in names
  # Per-scan normalisation: a scan's output does not depend on its batch mates.
  alone = model.apply(variables, x[:1])["seg_logits"]
  together = model.apply(variables, x)["seg_logits"][:1]
  # The same per-scan arithmetic in two batch shapes (XLA may order the sums
  # differently): the U-Net's reductions plus one per-voxel mean and mean square
  # per normalised layer (4 at full resolution, 2 at 1/8 of the voxels).
  norm_terms = 2 * (4 * VOXELS + 2 * VOXELS // 8)
  np.testing.assert_allclose(alone, together, rtol=0,
                             atol=float32_rtol(UNET_TERMS + norm_terms, sides=2)
                             * float(jnp.abs(alone).max()))
  # ... and is invariant to the scan's intensity scale after the first conv
  # up to its bias: doubling the image changes the output far less than 2x.
  doubled = model.apply(variables, 2.0 * x[:1])["seg_logits"]
  assert float(jnp.abs(doubled - alone).mean()) < float(jnp.abs(alone).mean())
