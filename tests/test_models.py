"""Tests for wmh_jax.models: shapes, attention identity, param layout, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmh_jax import configs, models

SHAPE = (2, 16, 16, 8, 1)


def _model_config(kind: str, **overrides):
  cfg = configs.get_config().model
  cfg.kind = kind
  cfg.base_filters = 2
  for name, value in overrides.items():
    cfg[name] = value
  return cfg


def _image(shape=SHAPE, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


@pytest.mark.parametrize("kind,expected", [
    ("weak", {"volume": (2,), "attention": (2, 16, 16, 8)}),
    ("strong", {"seg_prob": (2, 16, 16, 8)}),
    ("joint", {"volume": (2,), "attention": (2, 16, 16, 8),
               "seg_prob": (2, 16, 16, 8)}),
    ("severity", {"severity_logits": (2, 5)}),
])
def test_output_keys_and_shapes(kind, expected):
  model = models.build_model(_model_config(kind))
  x = _image()
  params = jax.jit(model.init)(jax.random.key(0), x)
  out = jax.jit(model.apply, static_argnames="train")(params, x, train=True)
  assert {k: v.shape for k, v in out.items()} == expected
  if "seg_prob" in out:
    assert float(out["seg_prob"].min()) > 0.0
    assert float(out["seg_prob"].max()) < 1.0


@pytest.mark.parametrize("kind", ["weak", "joint"])
def test_attention_mean_plus_bias_is_volume(kind):
  model = models.build_model(_model_config(kind, pool_scale=50.0),
                             volume_bias_init=0.3)
  x = _image()
  params = jax.jit(model.init)(jax.random.key(3), x)
  bias = params["params"]["volume_head"]["dense"]["bias"]
  np.testing.assert_allclose(bias, [0.3])
  out = jax.jit(model.apply)(params, x)
  np.testing.assert_allclose(out["attention"].mean(axis=(1, 2, 3)) + bias[0],
                             out["volume"], atol=1e-5, rtol=1e-5)
  # The two scans differ, so the volumes do as well (the identity is not 0 == 0).
  assert abs(float(out["volume"][0] - out["volume"][1])) > 1e-4


def test_params_and_outputs_identical_across_conv_impls():
  x = _image()
  results = {}
  for impl in ("native", "depth2d", "depth2d_concat", "auto"):
    model = models.build_model(_model_config("joint", conv_impl=impl))
    params = jax.jit(model.init)(jax.random.key(5), x)
    results[impl] = (params, jax.jit(model.apply)(params, x))
  ref_params, ref_out = results["native"]
  for impl, (params, out) in results.items():
    assert (jax.tree_util.tree_structure(params)
            == jax.tree_util.tree_structure(ref_params)), impl
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(ref_params)):
      np.testing.assert_array_equal(a, b)
    for key in ref_out:
      np.testing.assert_allclose(out[key], ref_out[key], atol=1e-5, rtol=1e-5)


def test_count_params_matches_hand_count():
  # depth 1, f=2: down_0 1->2->2 (3 ch out), bottom 3->4->4 (7 ch),
  # up_0 concat(7, 3)=10 -> 2 -> 2 (12 ch), Dense 12->1.
  def conv(ci, co):
    return 27 * ci * co + co
  expected = (conv(1, 2) + conv(2, 2) + conv(3, 4) + conv(4, 4) + conv(10, 2)
              + conv(2, 2) + 12 + 1)
  model = models.build_model(_model_config("weak", depth=1))
  params = jax.eval_shape(model.init, jax.random.key(0), _image((1, 4, 4, 2, 1)))
  assert models.count_params(params) == expected == 1595


def test_pool_and_upsample_match_references():
  x = _image((1, 4, 6, 2, 3), seed=1)
  np.testing.assert_array_equal(
      models.max_pool_2x(x), nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2)))
  up = models.upsample_2x(x)
  expected = jnp.repeat(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), 2, 3)
  np.testing.assert_array_equal(up, expected)


def test_non_divisible_shape_raises():
  model = models.build_model(_model_config("weak"))
  with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 4"):
    jax.eval_shape(model.init, jax.random.key(0), _image((1, 16, 16, 6, 1)))


def test_bad_config_raises():
  with pytest.raises(ValueError, match="unknown model kind 'cnn'"):
    models.build_model(_model_config("cnn"))
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    models.build_model(_model_config("weak", conv_impl="fft"))
  with pytest.raises(ValueError, match="depth must be >= 0"):
    models.build_model(_model_config("weak", depth=-1))
