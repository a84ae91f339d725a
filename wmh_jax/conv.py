"""3D convolution whose formulation is chosen per backend.

XLA:CPU runs `lax.conv_general_dilated` in 3D several times slower than the
same arithmetic written as 2D convolutions over the (x, y) plane, so on CPU a
3x3x3 convolution is computed as 2D convolutions over depth-shifted copies of
the input, with the depth (z) axis folded into the batch. On GPU/TPU the
native 3D convolution is used. Every formulation computes the same function
of the same parameters: the module's parameter pytree is exactly that of
``nn.Conv(features, kernel_size, padding='SAME')`` (``kernel`` of shape
``(kx, ky, kz, in_features, features)``, ``bias`` of shape ``(features,)``,
same initialisers), so checkpoints do not depend on the backend.

Formulations (``impl``):
  * ``native``: one `lax.conv_general_dilated` over (x, y, z).
  * ``depth2d``: ``sum_kz conv2d(shift_z(x, kz), kernel[:, :, kz])``; the
    three 2D convolutions share one zero-padded, depth-major copy of x.
  * ``depth2d_concat``: the ``kz`` depth-shifted copies of x are concatenated
    along channels and convolved once with the kernel reshaped to
    ``(kx, ky, kz * in_features, features)``; fewer, larger 2D convolutions,
    which is faster when ``in_features`` is small.
  * ``auto``: ``native`` on GPU/TPU, ``depth2d_concat`` on CPU.

Measured on XLA:CPU (2 cores, fwd+bwd, jit): one 8->8 layer at
(4, 56, 64, 16) is ~8-11x faster with ``depth2d_concat`` than ``native``
(~6-8x with ``depth2d``); one 32->32 layer at (4, 112, 128, 32) ~1.8x; a full
GP-Unet training step (f=8, 56x64x16) ~4.4x (``depth2d`` ~3.6x). The two 2D
formulations tie for wide inputs, ``depth2d_concat`` wins for narrow ones.
Autodiff of the 2D formulations yields 2D convolutions in the backward pass as
well (a custom VJP computing the kernel gradient with matmuls was no faster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "depth2d", "depth2d_concat")

_DN_3D = ("NDHWC", "DHWIO", "NDHWC")
_DN_2D = ("NHWC", "HWIO", "NHWC")


def _same_pads(size: int) -> tuple[int, int]:
  """XLA 'SAME' padding (low, high) for a stride-1 window of `size` voxels."""
  return (size - 1) // 2, size - 1 - (size - 1) // 2


def conv3d_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' 3D cross-correlation, (b, x, y, z, ci) * (kx, ky, kz, ci, co) -> (b, x, y, z, co)."""
  return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                  dimension_numbers=_DN_3D)


def _depth_shifted(x: jax.Array, kz: int) -> tuple[jax.Array, int]:
  """Depth-major, z-padded copy of x: (b, z + kz - 1, x, y, c), and the depth z."""
  depth = x.shape[3]
  xt = jnp.transpose(x, (0, 3, 1, 2, 4))
  return jnp.pad(xt, ((0, 0), _same_pads(kz), (0, 0), (0, 0), (0, 0))), depth


def _from_depth_major(y: jax.Array, batch: int, depth: int) -> jax.Array:
  """(b * z, x, y, c) -> (b, x, y, z, c)."""
  y = y.reshape(batch, depth, *y.shape[1:])
  return jnp.transpose(y, (0, 2, 3, 1, 4))


def conv3d_depth2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Same as `conv3d_native`, as a sum of `kz` 2D convolutions over (x, y)."""
  b, nx, ny, _, ci = x.shape
  kz = kernel.shape[2]
  xp, depth = _depth_shifted(x, kz)
  out = None
  for dz in range(kz):
    plane = xp[:, dz:dz + depth].reshape(b * depth, nx, ny, ci)
    y = lax.conv_general_dilated(plane, kernel[:, :, dz], (1, 1), "SAME",
                                 dimension_numbers=_DN_2D)
    out = y if out is None else out + y
  return _from_depth_major(out, b, depth)


def conv3d_depth2d_concat(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Same as `conv3d_native`, as one 2D convolution of `kz * ci` channels."""
  b, nx, ny, _, ci = x.shape
  kx, ky, kz, _, co = kernel.shape
  xp, depth = _depth_shifted(x, kz)
  stacked = jnp.concatenate([xp[:, dz:dz + depth] for dz in range(kz)], axis=-1)
  y = lax.conv_general_dilated(stacked.reshape(b * depth, nx, ny, kz * ci),
                               kernel.reshape(kx, ky, kz * ci, co), (1, 1),
                               "SAME", dimension_numbers=_DN_2D)
  return _from_depth_major(y, b, depth)


_CONV_FNS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "native": conv3d_native,
    "depth2d": conv3d_depth2d,
    "depth2d_concat": conv3d_depth2d_concat,
}


def check_impl(impl: str) -> None:
  """Raises ValueError unless `impl` is one of `IMPLS`."""
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; expected one of {IMPLS}")


def resolve_impl(impl: str) -> str:
  """The concrete formulation for `impl` on the current default backend."""
  check_impl(impl)
  if impl != "auto":
    return impl
  return "depth2d_concat" if jax.default_backend() == "cpu" else "native"


class Conv3D(nn.Module):
  """'SAME', stride-1 3D convolution with bias; parameters identical to nn.Conv.

  Attributes:
    features: output channels.
    kernel_size: window (kx, ky, kz) in voxels.
    impl: one of `IMPLS`; resolved at trace time by `resolve_impl`.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  impl: str = "auto"
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, x, y, z, in_features) float32 -> (b, x, y, z, features)."""
    if x.ndim != 5 or len(self.kernel_size) != 3:
      raise ValueError(f"Conv3D expects (b, x, y, z, c) input and a 3D kernel, "
                       f"got input {x.shape} and kernel_size {self.kernel_size}")
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, in_features, self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    conv = _CONV_FNS[resolve_impl(self.impl)]
    return conv(x, kernel) + bias
