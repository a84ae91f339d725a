"""Tests for wmh_jax.models.conv: every formulation is the same function of the same params."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tolerances import assert_close_to_abs_sum, float32_rtol
from wmh_jax.models import conv

CONCRETE = ("native", "depth2d", "depth2d_concat")


def _inputs(shape: tuple[int, ...], features: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(shape[:-1] + (features,)),
                          jnp.float32)
  return x, cotangent


def _params(kernel_size, in_features: int, features: int, seed: int = 1):
  """Random Conv3D/nn.Conv variables (non-zero bias), without an XLA RNG."""
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal((*kernel_size, in_features, features)) * 0.3
  bias = rng.standard_normal(features)
  return {"params": {"kernel": jnp.asarray(kernel, jnp.float32),
                     "bias": jnp.asarray(bias, jnp.float32)}}


@functools.partial(jax.jit, static_argnames=("impl", "kernel_size"))
def _value_and_grads(params, x: jax.Array, cotangent: jax.Array, impl: str,
                     kernel_size: tuple[int, int, int]):
  module = conv.Conv3D(cotangent.shape[-1], kernel_size, impl=impl)

  def objective(p, inp):
    return jnp.sum(module.apply(p, inp) * cotangent)

  return module.apply(params, x), jax.grad(objective, argnums=(0, 1))(params, x)


def _abs(tree):
  return jax.tree_util.tree_map(jnp.abs, tree)


def _assert_close(actual, expected, abs_sum, n_terms: int) -> None:
  """Two float32 evaluations of sums of ``n_terms`` mixed-sign products, in
  different orders: within float32_rtol(n_terms, sides=2) of ``abs_sum``, the
  same computation on the magnitudes of every input (tests/tolerances.py)."""
  assert_close_to_abs_sum(actual, expected, abs_sum, float32_rtol(n_terms, ops=1, sides=2))


@pytest.mark.parametrize("kernel_size", [(3, 3, 3), (1, 3, 5)])
@pytest.mark.parametrize("impl", ["depth2d", "depth2d_concat"])
def test_impl_matches_native_values_and_grads(impl, kernel_size):
  x, cotangent = _inputs((2, 6, 8, 4, 3), 5)
  params = _params(kernel_size, 3, 5)
  ref_out, (ref_gp, ref_gx) = _value_and_grads(params, x, cotangent, "native",
                                               kernel_size)
  out, (gp, gx) = _value_and_grads(params, x, cotangent, impl, kernel_size)
  abs_out, (abs_gp, abs_gx) = _value_and_grads(_abs(params), _abs(x), _abs(cotangent),
                                               "native", kernel_size)
  assert out.shape == (2, 6, 8, 4, 5)
  taps, voxels = int(np.prod(kernel_size)), 2 * 6 * 8 * 4
  _assert_close(out, ref_out, abs_out, taps * 3 + 1)  # taps x 3 channels + bias
  _assert_close(gx, ref_gx, abs_gx, taps * 5)
  _assert_close(gp["params"]["kernel"], ref_gp["params"]["kernel"],
                abs_gp["params"]["kernel"], voxels)
  _assert_close(gp["params"]["bias"], ref_gp["params"]["bias"], abs_gp["params"]["bias"],
                voxels)


def test_upsample_2x_is_nearest():
  x, _ = _inputs((1, 2, 3, 2, 2), 1)
  expected = jnp.repeat(jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), 2, 3)
  np.testing.assert_array_equal(conv.upsample_2x(x), expected)


@functools.partial(jax.jit, static_argnames="impl")
def _up_value_and_grads(params, coarse, skip, cotangent, impl: str):
  module = conv.UpConcatConv3D(cotangent.shape[-1], impl=impl)

  def objective(p, c, s):
    return jnp.sum(module.apply(p, c, s) * cotangent)

  return (module.apply(params, coarse, skip),
          jax.grad(objective, argnums=(0, 1, 2))(params, coarse, skip))


@pytest.mark.parametrize("impl", CONCRETE)
def test_up_concat_conv_matches_conv_of_concatenation(impl):
  coarse, _ = _inputs((2, 3, 4, 2, 3), 1, seed=2)
  skip, cotangent = _inputs((2, 6, 8, 4, 2), 4, seed=3)
  params = _params((3, 3, 3), 5, 4)

  def reference(p, c, s):
    x = jnp.concatenate([conv.upsample_2x(c), s], axis=-1)
    return conv.Conv3D(4, impl="native").apply(p, x)

  ref_out = jax.jit(reference)(params, coarse, skip)
  ref_grads = jax.jit(jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent),
                               argnums=(0, 1, 2)))(params, coarse, skip)
  out, grads = _up_value_and_grads(params, coarse, skip, cotangent, impl)
  abs_out, abs_grads = _up_value_and_grads(_abs(params), _abs(coarse), _abs(skip),
                                           _abs(cotangent), "native")
  # Longest reductions: 27 taps x 5 channels (+ bias) for the output, the 384
  # fine voxels for the parameters, 8 fine voxels x 27 taps x 4 channels for coarse.
  _assert_close(out, ref_out, abs_out, 27 * 5 + 1)
  n_terms = 8 * 27 * 4
  for got, want, abs_sum in zip(jax.tree_util.tree_leaves(grads),
                                jax.tree_util.tree_leaves(ref_grads),
                                jax.tree_util.tree_leaves(abs_grads)):
    _assert_close(got, want, abs_sum, n_terms)
  shapes = jax.eval_shape(conv.UpConcatConv3D(4, impl=impl).init,
                          jax.random.key(0), coarse, skip)
  assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == {
      "params": {"kernel": (3, 3, 3, 5, 4), "bias": (4,)}}


def test_native_matches_flax_conv():
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  params = _params((3, 3, 3), 2, 3)
  ours = jax.jit(conv.Conv3D(3, impl="native").apply)(params, x)
  theirs = jax.jit(nn.Conv(3, (3, 3, 3), padding="SAME").apply)(params, x)
  abs_sum = jax.jit(nn.Conv(3, (3, 3, 3), padding="SAME").apply)(_abs(params), _abs(x))
  _assert_close(ours, theirs, abs_sum, 27 * 2 + 1)


def test_params_identical_to_nn_conv():
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  key = jax.random.key(7, impl="rbg")  # cheaper to compile than threefry
  theirs = jax.jit(nn.Conv(3, (3, 3, 3), padding="SAME").init)(key, x)
  assert theirs["params"]["kernel"].shape == (3, 3, 3, 2, 3)
  assert theirs["params"]["bias"].shape == (3,)
  for impl in CONCRETE + ("auto",):
    init = conv.Conv3D(3, impl=impl).init
    shapes = jax.eval_shape(init, key, x)
    assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes)
            == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), theirs))
  # Parameter creation does not depend on impl: one value check suffices.
  ours = jax.jit(conv.Conv3D(3, impl="auto").init)(key, x)
  for a, b in zip(jax.tree_util.tree_leaves(ours),
                  jax.tree_util.tree_leaves(theirs)):
    np.testing.assert_array_equal(a, b)


def test_auto_resolves_per_backend(monkeypatch):
  assert conv.resolve_impl("auto") == "depth2d_concat"  # tests run on CPU
  assert conv.resolve_impl("depth2d") == "depth2d"
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert conv.resolve_impl("auto") == "native"
    assert conv.resolve_impl("depth2d") == "depth2d"


def test_bad_impl_and_rank_raise():
  x, _ = _inputs((1, 4, 4, 4, 2), 3)
  with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
    jax.eval_shape(conv.Conv3D(3, impl="fft").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\(b, x, y, z, c\)"):
    jax.eval_shape(conv.Conv3D(3).init, jax.random.key(0), x[0])
