"""Tests for wmh_jax.conv: every formulation is the same function of the same params."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmh_jax import conv

CONCRETE = ("native", "depth2d", "depth2d_concat")


def _inputs(shape: tuple[int, ...], features: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(shape[:-1] + (features,)),
                          jnp.float32)
  return x, cotangent


def _value_and_grads(impl: str, params, x: jax.Array, cotangent: jax.Array,
                     features: int, kernel_size: tuple[int, int, int]):
  module = conv.Conv3D(features, kernel_size, impl=impl)

  def objective(p, inp):
    return jnp.sum(module.apply(p, inp) * cotangent)

  out = module.apply(params, x)
  grads = jax.grad(objective, argnums=(0, 1))(params, x)
  return out, grads


def _assert_close(actual, expected, rel: float = 1e-5) -> None:
  scale = float(jnp.max(jnp.abs(expected)))
  err = float(jnp.max(jnp.abs(actual - expected)))
  assert err <= rel * scale, (err, scale)


@pytest.mark.parametrize("kernel_size", [(3, 3, 3), (1, 3, 5)])
@pytest.mark.parametrize("impl", ["depth2d", "depth2d_concat", "auto"])
def test_impl_matches_native_values_and_grads(impl, kernel_size):
  features = 5
  x, cotangent = _inputs((2, 6, 8, 4, 3), features)
  params = conv.Conv3D(features, kernel_size).init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero bias
  ref_out, (ref_gp, ref_gx) = _value_and_grads("native", params, x, cotangent,
                                               features, kernel_size)
  out, (gp, gx) = _value_and_grads(impl, params, x, cotangent, features,
                                   kernel_size)
  assert out.shape == (2, 6, 8, 4, features)
  _assert_close(out, ref_out)
  _assert_close(gx, ref_gx)
  _assert_close(gp["params"]["kernel"], ref_gp["params"]["kernel"])
  _assert_close(gp["params"]["bias"], ref_gp["params"]["bias"])


def test_native_matches_flax_conv():
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  ours = conv.Conv3D(3, impl="native")
  theirs = nn.Conv(3, (3, 3, 3), padding="SAME")
  params = theirs.init(jax.random.key(0), x)
  _assert_close(ours.apply(params, x), theirs.apply(params, x))


@pytest.mark.parametrize("impl", CONCRETE + ("auto",))
def test_params_identical_to_nn_conv(impl):
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  key = jax.random.key(7)
  ours = conv.Conv3D(3, impl=impl).init(key, x)
  theirs = nn.Conv(3, (3, 3, 3), padding="SAME").init(key, x)
  assert (jax.tree_util.tree_structure(ours)
          == jax.tree_util.tree_structure(theirs))
  assert ours["params"]["kernel"].shape == (3, 3, 3, 2, 3)
  assert ours["params"]["bias"].shape == (3,)
  for a, b in zip(jax.tree_util.tree_leaves(ours),
                  jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_array_equal(a, b)


def test_auto_resolves_per_backend(monkeypatch):
  small = conv.CONCAT_MAX_IN_FEATURES
  assert conv.resolve_impl("auto", small) == "depth2d_concat"
  assert conv.resolve_impl("auto", small + 1) == "depth2d"
  assert conv.resolve_impl("native", 1) == "native"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert conv.resolve_impl("auto", 1) == "native"
  assert conv.resolve_impl("auto", 64) == "native"


def test_bad_impl_and_rank_raise():
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    conv.Conv3D(3, impl="fft").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\(b, x, y, z, c\)"):
    conv.Conv3D(3).init(jax.random.key(0), x[0])
