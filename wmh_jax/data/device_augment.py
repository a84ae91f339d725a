"""The geometric augmentation of `augment.apply_affine`, as a jitted JAX function on the device.

With ``augment.on_device=True`` the host still draws every augmentation
(`augment.sample_affine`, the same random stream) but only ships its 4x4 pull
matrix with the untransformed scan, as ``batch["affine"]`` (b, 4, 4) float32;
the train step then resamples image and mask here, inside the compiled step.
That moves the one costly host operation (a trilinear resample of two
arrays, ~80 pairs/s per core at the paper grid) onto the accelerator, for
hosts whose cores cannot feed it (issue 20, ``bench.loader``).

The arithmetic is `augment.apply_affine`'s: linear interpolation along z,
then a bilinear gather in-plane (zero outside the volume), one set of
coordinates and weights shared by image and mask; the mask keeps the
``round(total)`` voxels of largest covered fraction, ties by C-order voxel
index (`nifti.top_k_mask`); a masked scan's label becomes its transformed
mask's volume. Coordinates are float32 here (float64 on the host), so the
two paths agree to interpolation rounding: ~1e-6 of the intensity range, and
a mask voxel can swap with a near-tied neighbour (tests/test_augment.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wmh_jax.data import augment


def resample_pair(image: jax.Array, mask: jax.Array, matrix: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """One scan: image and mask (x, y, z) resampled with the pull ``matrix`` (4, 4).

  The matrix must be block diagonal (in-plane affine, separate z), as every
  `augment.sample_affine` draw is. Returns (image float32, mask float32 in
  {0, 1}), both (x, y, z).
  """
  nx, ny, nz = image.shape
  (z0, z1, wz0, wz1), corners = augment.resample_taps(matrix, image.shape, jnp)

  def resample(array: jax.Array) -> jax.Array:
    along_z = (jnp.take(array, z0, axis=2) * wz0 + jnp.take(array, z1, axis=2) * wz1)
    along_z = along_z.reshape(nx * ny, nz)
    out = jnp.zeros((nx * ny, nz), jnp.float32)
    for index, weight in corners:
      out = out + jnp.take(along_z, index, axis=0) * weight[:, None]
    return out.reshape(nx, ny, nz)

  return resample(image.astype(jnp.float32)), top_k_mask(resample(mask.astype(jnp.float32)))


def top_k_mask(fractions: jax.Array) -> jax.Array:
  """`nifti.top_k_mask` in JAX: the ``round(sum)`` largest positive fractions, ties by index.

  float32 {0, 1}, the shape of ``fractions``.
  """
  flat = fractions.ravel()
  k = jnp.round(flat.sum())
  rank = jnp.empty(flat.shape, jnp.int32).at[jnp.argsort(-flat, stable=True)].set(
      jnp.arange(flat.size, dtype=jnp.int32))
  return ((rank < k) & (flat > 0)).astype(jnp.float32).reshape(fractions.shape)


def augment_batch(batch: dict[str, jax.Array], voxel_ml: float) -> dict[str, jax.Array]:
  """The batch with ``image`` and ``mask`` (b, x, y, z, 1) resampled by ``affine`` (b, 4, 4).

  Rows with ``has_mask`` get ``volume_ml`` from their transformed mask
  (``voxel_ml`` mL per voxel); the others keep their label (their brain stays
  in the field of view by the draw). ``affine`` is dropped.
  """
  image, mask = jax.vmap(resample_pair)(batch["image"][..., 0], batch["mask"][..., 0],
                                        batch["affine"])
  masked_volume = mask.sum(axis=(1, 2, 3)) * voxel_ml
  rest = {k: v for k, v in batch.items() if k != "affine"}
  return {**rest, "image": image[..., None], "mask": mask[..., None],
          "volume_ml": jnp.where(batch["has_mask"] > 0, masked_volume, batch["volume_ml"])}
