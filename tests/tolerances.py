"""Comparison tolerances derived from the floating-point arithmetic, not from one machine.

The rule
--------
A sum of ``n`` floating-point terms, evaluated in *any* order (sequential,
pairwise, vectorised with several accumulators, split over devices and then
all-reduced), is within ``gamma_{n-1} * sum|x_i|`` of the exact sum, where
``gamma_k = k u / (1 - k u)`` and ``u = eps / 2`` is the unit roundoff
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.2).
Every further rounded operation (a product, a quotient, a cast, the difference
of two sums) adds at most ``u`` relative; an elementary function of XLA or
NumPy (exp, log, log1p, sigmoid, softplus, sqrt) is accurate to a few ulps and
counts here as 4 operations. For a result built from reductions of at most
``n_terms`` terms and ``ops`` other operations we allow

    rtol = (n_terms + ops) * eps

that is twice the first-order worst case ``(n_terms - 1 + ops) * u``. The bound
holds for every summation order, so it holds across CPUs, XLA versions, fast
math settings and device counts. It is relative to ``sum|x_i|``: that is the
result itself when the terms share a sign (probabilities, squares, counts,
per-voxel losses); with mixed signs use :func:`assert_close_to_abs_sum` with a
separately computed sum of magnitudes (the same computation on ``|x|``).

When *both* sides are float32 computations of the same quantity (1 vs 4
devices, two convolution formulations), both errors count: pass ``sides=2``.

Why not ``sqrt(n) * eps``? That estimate assumes independent rounding errors,
and structured test data breaks it: summing 4096 float32 copies of 0.1 one
after the other is off by 323 eps (0.08 n eps, 5 sqrt(n) eps). The original
failure of this kind: ``test_loss_fn_terms_and_metrics`` asserted rtol 1e-6
(8 eps) on sums over 2 x 2048 voxels and was off by 1.6e-6 on another machine.

A tolerance from this rule stays far below the effect of a real bug in the
tested code (a wrong weight, smoothing term, kernel flip or missing scale
changes results by 1e-3 to 1 relative; see the individual tests).

Exact comparisons (``==``, ``assert_array_equal``) remain where the result is
exact by construction (small integers, dyadic fractions, a zero weight, a
copy) or where the same program runs twice on the same machine with the same
device count (determinism, resume == uninterrupted).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2**-52 ~ 2.22e-16
EPS_BF16 = 2.0 ** -7                     # bfloat16: 8-bit significand (7 stored bits)


def float32_rtol(n_terms: int, ops: int = 0, sides: int = 1) -> float:
  """``sides * (n_terms + ops) * eps32``: the rule of the module docstring.

  Args:
    n_terms: terms of the longest reduction on the way to the result (the
      sum of them when reductions are chained, e.g. voxels then scans).
    ops: other rounded operations (an elementary function counts 4).
    sides: 2 when both compared values are float32 computations.
  """
  return sides * (n_terms + ops) * EPS32


def bfloat16_rtol(layers: int, ops: int = 0) -> float:
  """Relative tolerance of a bfloat16-compute result against its float32 twin.

  Mixed precision (``model.dtype="bfloat16"``) keeps reductions in float32
  (a convolution accumulates in float32 and rounds its output once), so the
  sums do not grow the error with their length as in :func:`float32_rtol`.
  Each layer instead rounds three things to bfloat16: its input, its kernel
  and its output, ``3 u`` relative each time (u = eps / 2); ``layers`` layers
  in a chain add up, plus ``ops`` other bfloat16 roundings. As in the module
  rule, the tolerance is twice that first-order bound: ``(3 layers + ops) eps``.
  For a gradient, count the layers of the forward and of the backward pass.
  The float32 side's own error is ~2**16 times smaller and is ignored.
  """
  return (3 * layers + ops) * EPS_BF16


def device_resample_atol(matrix: np.ndarray, shape, value_range: float = 1.0) -> float:
  """Absolute tolerance of the device resample (float32 coordinates) against the host's.

  Both interpolate 8 float32 terms with ~6 rounded weight operations each
  (:func:`float32_rtol`, both sides); the device also computes the coordinates
  ``a x + b y + c`` in float32 from a float32-rounded matrix (3 operations),
  an error that moves the result by at most its size times the largest step
  between neighbouring voxels, bounded by ``value_range``.
  """
  magnitude = np.abs(matrix[:3, :3]) @ (np.asarray(shape) - 1) + np.abs(matrix[:3, 3])
  return value_range * (float32_rtol(8, ops=6, sides=2) + float32_rtol(3, ops=3) * magnitude.max())


def float64_rtol(n_terms: int, ops: int = 0, sides: int = 1) -> float:
  """:func:`float32_rtol` for float64 arithmetic."""
  return sides * (n_terms + ops) * EPS64


def assert_close_to_abs_sum(actual, expected, abs_sum, rtol: float, err_msg: str = "") -> None:
  """``|actual - expected| <= rtol * abs_sum`` elementwise.

  For sums of mixed-sign terms, whose error is bounded relative to the sum of
  the magnitudes ``abs_sum`` (broadcastable to ``expected``), not to the result.
  """
  actual, expected, abs_sum = (np.asarray(a, np.float64) for a in (actual, expected, abs_sum))
  error = np.abs(actual - expected)
  bound = rtol * np.broadcast_to(abs_sum, error.shape)
  worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.ndim else ()
  assert np.all(error <= bound), (
      f"{err_msg} |actual - expected| = {error[worst]:.3g} > {bound[worst]:.3g} "
      f"= rtol {rtol:.3g} x sum|terms| {np.broadcast_to(abs_sum, error.shape)[worst]:.3g}")


def network_terms(params, voxels: int) -> int:
  """Terms of the reductions along one path through a network, for the rule.

  Every kernel (rank >= 2) sums ``prod(shape[:-1])`` products per output (a
  3x3x3 convolution over c channels: 27 c; a dense layer: its fan-in), plus one
  global average pool over ``voxels``. An upper bound for the conv/pool U-Nets
  of wmh_jax: each layer's rounding error is carried through the later layers
  at the scale of the outputs.
  """
  import jax  # pylint: disable=import-outside-toplevel
  kernels = [leaf for leaf in jax.tree.leaves(params) if np.ndim(leaf) >= 2]
  return int(sum(np.prod(np.shape(k)[:-1]) for k in kernels)) + voxels
