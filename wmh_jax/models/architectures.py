"""GP-Unet (weak labels), shallow U-Net (strong labels), joint and severity nets.

All models share `UNetBody` (paper §2.2, Fig. 1): a shallow 3D U-Net whose
blocks are two 3x3x3 convolutions with ReLU after which the block input is
concatenated to the block output ("after every two convolutions, the feature
maps before the convolutions are concatenated"). Down path: a block, then 2x2x2
max-pooling, `depth` times; a bottom block; up path: nearest-neighbour x2
upsampling, concatenation with the skip of that level, a block. A block at
level l has `base_filters * 2**l` filters.

Every model maps `image (b, x, y, z, 1)` float32 to a dict holding only its own
outputs: `volume (b,)` and `attention (b, x, y, z)` (weak, joint; scaled target
units, i.e. mL / `config.data.volume_scale_ml`), `seg_logits (b, x, y, z)`
(strong, joint; the voxel WMH probability is their sigmoid),
`severity_logits (b, num_severity_classes)` (severity).

Mixed precision (`model.dtype`, issue 20): with "bfloat16" the body's
convolutions, activations, poolings and concatenations run in bfloat16, while
parameters, running statistics, head outputs and every reduction (the pooled
means, the heads' channel dot products, hence volumes and logits) stay
float32: `FeatureStack.mean` and `.project` upcast each part before reducing.
The parameter pytree is the same under either dtype, so a checkpoint restores
under both.

Two recipe options that are not in the paper (each off in the paper recipe,
see `configs.py`):
  * `norm`: a group or instance normalisation after every convolution of the
    body, before its ReLU.
  * `pooled_norm="running"`: the globally pooled features of the GP head are
    standardised per channel with running statistics (collection
    `batch_stats`, kept in the checkpoint) before the Dense layer. The
    statistics are the same function at train and inference time; training
    only updates them. Without it the pooled features carry a large offset
    shared by every scan (the block concatenations pass the raw image on), so
    a Dense weight change moves every prediction together.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wmh_jax.models import conv

NORMS = ("none", "group", "instance")
POOLED_NORMS = ("none", "running")
VOLUME_HEADS = ("gap", "count")
READOUTS = ("head", "counts")
GROUP_NORM_GROUPS = 4


def max_pool_2x(x: jax.Array) -> jax.Array:
  """2x2x2 max-pooling, stride 2: (b, x, y, z, c) -> (b, x/2, y/2, z/2, c).

  Written as a reshape and a max (gradient shared among tied maxima), which
  XLA:CPU runs much faster than `reduce_window`'s select-and-scatter.
  """
  b, nx, ny, nz, c = x.shape
  x = x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c)
  return x.max(axis=(2, 4, 6))


class FeatureStack(NamedTuple):
  """A channel concatenation of feature maps, some on the 2x coarser grid, never materialised.

  The map it stands for is ``concat([upsample(part) for part in parts], -1)``,
  (b, x, y, z, C), where a part with ``factor`` 2 is (b, x/2, y/2, z/2, c_i)
  and is upsampled by `conv.upsample_2x`, and a part with ``factor`` 1 is at
  full resolution. The heads need only its voxel mean and its dot product
  with a weight vector; both are linear, and nearest upsampling commutes
  with them, so the coarse part is reduced on its own grid. The last U-Net
  block's output would otherwise be the largest array of the step: 115
  channels at 56x64x16 for the CPU variant, 451 at 112x128x32 for the paper's
  (3.3 GB at batch 4), written forward and again for its gradient.

  Attributes:
    parts: ((array, factor), ...) in channel order; factor 1 or 2.
  """
  parts: tuple[tuple[jax.Array, int], ...]

  @classmethod
  def of(cls, features: "jax.Array | FeatureStack") -> "FeatureStack":
    """``features`` itself, or a full-resolution array as a one-part stack."""
    return features if isinstance(features, FeatureStack) else cls(((features, 1),))

  @property
  def channels(self) -> int:
    """C, the number of channels of the stacked map."""
    return sum(part.shape[-1] for part, _ in self.parts)

  def mean(self) -> jax.Array:
    """The voxel mean of the stacked map, (b, C) float32; upsampling keeps a part's mean."""
    return jnp.concatenate([part.mean(axis=(1, 2, 3), dtype=jnp.float32)
                            for part, _ in self.parts], axis=-1)

  def project(self, weights: jax.Array) -> jax.Array:
    """The stacked map times ``weights``: (C,) -> (b, x, y, z); (C, K) -> (b, x, y, z, K).

    Float32 whatever the parts' dtype: each part is upcast before the channel sum.
    """
    total, start = None, 0
    for part, factor in self.parts:
      channels = part.shape[-1]
      projected = part.astype(jnp.float32) @ weights[start:start + channels].astype(jnp.float32)
      start += channels
      if factor == 2:
        projected = (conv.upsample_2x(projected[..., None])[..., 0] if weights.ndim == 1
                     else conv.upsample_2x(projected))
      elif factor != 1:
        raise ValueError(f"FeatureStack parts must have factor 1 or 2, got {factor}")
      total = projected if total is None else total + projected
    return total

  def materialize(self) -> jax.Array:
    """The stacked map itself, (b, x, y, z, C)."""
    return jnp.concatenate([conv.upsample_2x(part) if factor == 2 else part
                            for part, factor in self.parts], axis=-1)


def normalise(x: jax.Array, norm: str, name: str) -> jax.Array:
  """`norm` over each scan's voxels: none, group (4 groups) or instance.

  (b, x, y, z, c) -> same shape and dtype; the statistics are reduced in
  float32 and the scale and offset are float32 parameters. Per scan, so it
  does not depend on the batch or on the device count.
  """
  if norm == "none":
    return x
  channels = x.shape[-1]
  groups = channels if norm == "instance" else math.gcd(GROUP_NORM_GROUPS, channels)
  return nn.GroupNorm(num_groups=groups, dtype=x.dtype, param_dtype=jnp.float32,
                      force_float32_reductions=True, name=name)(x)


class Block(nn.Module):
  """Two Conv3D(+norm)+ReLU, then concat(input, output): c -> c + features channels."""
  features: int
  conv_impl: str = "auto"
  norm: str = "none"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, x, y, z, c) -> (b, x, y, z, c + features), in ``dtype``."""
    dtype = conv.compute_dtype(self.dtype)
    x = x.astype(dtype)
    h = x
    for i in range(2):
      h = conv.Conv3D(self.features, impl=self.conv_impl, dtype=dtype, name=f"conv_{i}")(h)
      h = nn.relu(normalise(h, self.norm, f"norm_{i}"))
    return jnp.concatenate([x, h], axis=-1)


class UpBlock(nn.Module):
  """`Block` applied to concat(upsample_2x(coarse), skip); same parameters.

  The first convolution is a `conv.UpConcatConv3D`, which (on CPU) convolves
  the upsampled part at the coarse resolution.
  """
  features: int
  conv_impl: str = "auto"
  norm: str = "none"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, coarse: jax.Array, skip: jax.Array) -> FeatureStack:
    """coarse (b, x/2, y/2, z/2, cu), skip (b, x, y, z, cs) -> the stack of
    (upsampled coarse, skip, block output): (b, x, y, z, cu + cs + features), in ``dtype``."""
    dtype = conv.compute_dtype(self.dtype)
    coarse, skip = coarse.astype(dtype), skip.astype(dtype)
    h = conv.UpConcatConv3D(self.features, impl=self.conv_impl, dtype=dtype,
                            name="conv_0")(coarse, skip)
    h = nn.relu(normalise(h, self.norm, "norm_0"))
    h = conv.Conv3D(self.features, impl=self.conv_impl, dtype=dtype, name="conv_1")(h)
    h = nn.relu(normalise(h, self.norm, "norm_1"))
    return FeatureStack(((coarse, 2), (skip, 1), (h, 1)))


class UNetBody(nn.Module):
  """Shallow U-Net body shared by every model (paper §2.2, Fig. 1).

  Attributes:
    base_filters: filters of the full-resolution blocks (doubled per level).
    depth: number of 2x poolings; each spatial dim must divide by 2**depth.
    conv_impl: `conv.Conv3D` formulation.
    norm: normalisation after each convolution (`NORMS`).
    dtype: compute dtype of every layer, a `conv.DTYPES` name.
  """
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"
  norm: str = "none"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> FeatureStack:
    """(b, x, y, z, c) -> last feature maps F (b, x, y, z, C) in ``dtype``, as a `FeatureStack`."""
    factor = 2 ** self.depth
    if x.ndim != 5 or any(n % factor for n in x.shape[1:4]):
      raise ValueError(f"input shape {tuple(x.shape)} must be (b, x, y, z, c) "
                       f"with x, y, z divisible by 2**depth = {factor}")
    skips = []
    for level in range(self.depth):
      x = Block(self.base_filters * 2**level, self.conv_impl, self.norm, self.dtype,
                name=f"down_{level}")(x)
      skips.append(x)
      x = max_pool_2x(x)
    x = Block(self.base_filters * 2**self.depth, self.conv_impl, self.norm, self.dtype,
              name="bottom")(x)
    features = FeatureStack.of(x)
    for level in reversed(range(self.depth)):
      coarse = features.materialize()
      features = UpBlock(self.base_filters * 2**level, self.conv_impl, self.norm, self.dtype,
                         name=f"up_{level}")(coarse, skips[level])
    return features


class RunningStandardize(nn.Module):
  """Per-channel standardisation of pooled features with running statistics.

  With m, v the running mean and variance (collection ``batch_stats``):
  ``y = (x - m) / sqrt(v + eps)``. The function is the same at train and
  inference time; with ``update=True`` (training) the statistics first take
  an exponential-moving-average step towards the batch's mean and variance
  (when the `batch_stats` collection is mutable),
  debiased like Adam's moments so that the first batch sets them exactly.
  With ``axis_name`` the batch moments are averaged over that mapped axis, so
  the statistics do not depend on the device count. ``m`` and ``v`` carry no
  gradient.

  Attributes:
    momentum: EMA decay per training step.
    eps: added to the variance (feature units squared).
    axis_name: mapped axis to average batch moments over (None: no mapping).
  """
  momentum: float = 0.9
  eps: float = 1e-4
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, update: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (b, c) -> (standardised (b, c), mean (c,), inv_std (c,))."""
    channels = x.shape[-1]
    ema_mean = self.variable("batch_stats", "ema_mean", jnp.zeros, (channels,), jnp.float32)
    ema_sq = self.variable("batch_stats", "ema_sq", jnp.zeros, (channels,), jnp.float32)
    steps = self.variable("batch_stats", "steps", jnp.zeros, (), jnp.float32)
    if update and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      batch_mean = jax.lax.stop_gradient(x.mean(axis=0))
      batch_sq = jax.lax.stop_gradient(jnp.square(x).mean(axis=0))
      if self.axis_name is not None:
        batch_mean, batch_sq = jax.lax.pmean((batch_mean, batch_sq), self.axis_name)
      ema_mean.value = self.momentum * ema_mean.value + (1 - self.momentum) * batch_mean
      ema_sq.value = self.momentum * ema_sq.value + (1 - self.momentum) * batch_sq
      steps.value = steps.value + 1
    debias = 1.0 - self.momentum ** jnp.maximum(steps.value, 1.0)
    mean = ema_mean.value / debias
    variance = jnp.maximum(ema_sq.value / debias - jnp.square(mean), 0.0)
    inv_std = jax.lax.rsqrt(variance + self.eps)
    # Before any update (init, or a never-trained model) the statistics are the identity.
    trained = steps.value > 0
    mean = jnp.where(trained, mean, 0.0)
    inv_std = jnp.where(trained, inv_std, 1.0)
    return (x - mean) * inv_std, mean, inv_std


class PooledFeatures(nn.Module):
  """Global average pool x pool_scale, then optionally `RunningStandardize`.

  The pooling is linear, so one per-channel affine map ``F * scale + offset``
  applied voxel-wise to the feature maps F averages to the pooled value; the
  module returns that map's ``scale`` and ``offset`` with the pooled vector.

  Attributes:
    pool_scale: average-pool multiplier (1.0 = paper).
    pooled_norm: "none" (paper) or "running".
    momentum: `RunningStandardize.momentum`.
    axis_name: `RunningStandardize.axis_name`.
  """
  pool_scale: float = 1.0
  pooled_norm: str = "none"
  momentum: float = 0.9
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features: jax.Array | FeatureStack, train: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """F (b, x, y, z, C) -> (pooled (b, C), scale (C,), offset (C,)).

    ``(F * scale + offset).mean(axis=(1, 2, 3)) == pooled`` up to float rounding.
    """
    features = FeatureStack.of(features)
    pooled = features.mean() * self.pool_scale
    scale = jnp.full((features.channels,), self.pool_scale, jnp.float32)
    if self.pooled_norm == "none":
      return pooled, scale, jnp.zeros_like(scale)
    pooled, mean, inv_std = RunningStandardize(self.momentum, axis_name=self.axis_name,
                                               name="standardize")(pooled, update=train)
    return pooled, scale * inv_std, -mean * inv_std


class RefittableDense(nn.Module):
  """The weights of a Dense(1) layer, replaced at inference by a closed-form readout once fitted.

  Parameters ``kernel`` (C, 1) and ``bias`` (1,) are nn.Dense's, trained by
  the optimiser. The collection ``readout`` holds ``kernel`` (C,), ``bias``
  () and ``fitted`` (): a ridge least-squares fit of the same layer on the
  training scans' pooled features (`wmh_jax.training.refit`, ``train.refit_head``),
  written by the training loop, never by a gradient. Training (``train=True``)
  always uses the trained parameters, so the fit never changes what the body
  learns; inference uses the readout when ``fitted`` is 1. A checkpoint
  written before the readout existed has no such collection and infers with
  the trained parameters.

  Attributes:
    kernel_init, bias_init: nn.Dense's initialisers.
  """
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self, channels: int, train: bool) -> tuple[jax.Array, jax.Array]:
    """-> (weights (C,), bias ()): ``volume = pooled . weights + bias``."""
    kernel = self.param("kernel", self.kernel_init, (channels, 1), jnp.float32)[:, 0]
    bias = self.param("bias", self.bias_init, (1,), jnp.float32)[0]
    if not (self.is_initializing() or self.has_variable("readout", "kernel")):
      return kernel, bias
    readout_kernel = self.variable("readout", "kernel", jnp.zeros, (channels,), jnp.float32)
    readout_bias = self.variable("readout", "bias", jnp.zeros, (), jnp.float32)
    fitted = self.variable("readout", "fitted", jnp.zeros, (), jnp.float32)
    if train:
      return kernel, bias
    use = fitted.value > 0
    return (jnp.where(use, readout_kernel.value, kernel),
            jnp.where(use, readout_bias.value, bias))


class VolumeHead(nn.Module):
  """GP head: pooled features -> Dense(1), and its attention map (paper §2.2).

  With G = F * scale + offset the voxel-wise feature map of `PooledFeatures`
  (b, x, y, z, C), whose voxel mean is the pooled vector g, and W (C,), bias
  the Dense parameters:
    volume    = g . W + bias                           (b,)
    attention = G . W                                  (b, x, y, z)
  so that `attention.mean(axis=(1, 2, 3)) + bias == volume` exactly (up to
  float rounding): the attention map is the Dense weights applied to the
  decoded feature maps before pooling. G is never materialised:
  ``attention = F . (scale * W) + offset . W`` (`FeatureStack.project`).

  Attributes:
    pool_scale, pooled_norm, momentum, axis_name: see `PooledFeatures`.
    volume_bias_init: initial bias, scaled target units.
    zero_init_kernel: start W at 0 (volume == bias for every scan at step 0)
      instead of LeCun-normal.
  """
  pool_scale: float = 1.0
  pooled_norm: str = "none"
  momentum: float = 0.9
  axis_name: str | None = None
  volume_bias_init: float = 0.0
  zero_init_kernel: bool = False

  @nn.compact
  def __call__(self, features: jax.Array | FeatureStack, train: bool = False
               ) -> dict[str, jax.Array]:
    """F (b, x, y, z, C) -> volume (b,), attention (b, x, y, z), pooled (b, C) (the Dense input)."""
    features = FeatureStack.of(features)
    pooled, scale, offset = PooledFeatures(self.pool_scale, self.pooled_norm, self.momentum,
                                           self.axis_name, name="pool")(features, train)
    kernel_init = (nn.initializers.zeros if self.zero_init_kernel
                   else nn.initializers.lecun_normal())
    weights, bias = RefittableDense(kernel_init, nn.initializers.constant(self.volume_bias_init),
                                    name="dense")(pooled.shape[-1], train)
    volume = pooled @ weights + bias
    attention = features.project(scale * weights) + offset @ weights
    return {"volume": volume, "attention": attention, "pooled": pooled}


def random_relu_layer(channels: int, hidden: int, seed: int) -> tuple[jax.Array, jax.Array]:
  """The fixed random 1x1x1 layer of the counting readout: kernel R ~ N(0, 1/C) (C, K) and
  bias r ~ N(0, 1) (K,), drawn from ``seed`` (`CountReadout`, `wmh_jax.study.probe`)."""
  key_kernel, key_bias = jax.random.split(jax.random.key(seed))
  kernel = jax.random.normal(key_kernel, (channels, hidden)) / math.sqrt(channels)
  return kernel, jax.random.normal(key_bias, (hidden,))


def brain_density(hidden: jax.Array, weights: jax.Array, constant: jax.Array, brain: jax.Array,
                  voxel_target: float) -> jax.Array:
  """``brain * (u * h . w) + brain * c / n_brain``: a voxel map (b, x, y, z) whose sum over each
  scan is ``u * (sum of h over the brain) . w + c``, the volume of a head that sums voxel
  features h (b, x, y, z, K, zero outside the brain) and reads them out with w (K,) and c (b,)."""
  n_brain = jnp.maximum(brain.sum(axis=(1, 2, 3)), 1.0)
  return voxel_target * hidden @ weights + brain * (constant / n_brain)[:, None, None, None]


class CountHead(nn.Module):
  """Count head: voxel features summed over the brain (in volume units), then Dense(1).

  The label is a sum over voxels, so the readout is one too (density-map
  counting, Lempitsky & Zisserman 2010). Per voxel, a hidden 1x1x1 layer
  maps the body's features F to ``hidden`` ReLU features h (b, x, y, z, K).
  Their sums over the brain (the image's nonzero voxels: preprocessing sets
  everything outside it to 0), times u = voxel_ml / volume_scale_ml, are
  volumes in target units, S (b, K). A global average (`VolumeHead`) gives
  fractions instead, and a lesion volume is a fraction times the brain
  volume: not a linear function of fractions. S goes through the same
  running standardisation and zero-initialised Dense(1) as the GP head,
  which keeps the Dense layer well conditioned (``pooled_norm="running"``).
  With g = (S - m) * inv_std the standardised sums, W (K,), bias:
    volume    = g . W + bias                                    (b,)
    attention = brain * (u * h . (inv_std * W) + c / n_brain)   (b, x, y, z)
  where c = bias - (m * inv_std) . W and n_brain is the scan's brain voxel
  count, so ``attention.sum(axis=(1, 2, 3)) == volume`` (up to rounding):
  each brain voxel holds its share of the volume. Like the paper's attention
  map it is signed: a non-negative density (the sigmoid of a voxel logit, a
  lesion fraction) stayed at validation ICC 0.015 for 300 steps (BUILD_NOTES,
  issue 19). W and bias come from `RefittableDense`; ``pooled`` is g, the
  Dense layer's input, for its closed-form fit (`wmh_jax.training.refit`).

  Attributes:
    voxel_target: u, target units per voxel (> 0).
    hidden: hidden channels K (>= 1).
    momentum, axis_name: `RunningStandardize`.
    volume_bias_init: initial bias, scaled target units.
  """
  voxel_target: float
  hidden: int = 16
  momentum: float = 0.99
  axis_name: str | None = None
  volume_bias_init: float = 0.0

  @nn.compact
  def __call__(self, features: jax.Array | FeatureStack, image: jax.Array, train: bool = False
               ) -> dict[str, jax.Array]:
    """F (b, x, y, z, C), image (b, x, y, z, 1) -> volume (b,), attention (b, x, y, z),
    pooled (b, K)."""
    features = FeatureStack.of(features)
    kernel = self.param("hidden_kernel", nn.initializers.lecun_normal(),
                        (features.channels, self.hidden), jnp.float32)
    bias = self.param("hidden_bias", nn.initializers.zeros, (self.hidden,), jnp.float32)
    brain = (image[..., 0] > 0).astype(jnp.float32)
    hidden = nn.relu(features.project(kernel) + bias) * brain[..., None]
    sums = hidden.sum(axis=(1, 2, 3)) * self.voxel_target
    pooled, mean, inv_std = RunningStandardize(self.momentum, axis_name=self.axis_name,
                                               name="standardize")(sums, update=train)
    weights, bias = RefittableDense(nn.initializers.zeros,
                                    nn.initializers.constant(self.volume_bias_init),
                                    name="dense")(pooled.shape[-1], train)
    volume = pooled @ weights + bias
    constant = bias - (mean * inv_std) @ weights
    attention = brain_density(hidden, inv_std * weights, constant, brain, self.voxel_target)
    return {"volume": volume, "attention": attention, "pooled": pooled}


class CountReadout(nn.Module):
  """A closed-form counting readout of the body: fixed random ReLU voxel features summed over
  the brain, fitted by ridge least squares instead of trained.

  Per voxel, a fixed random 1x1x1 layer maps the body's features F (C channels)
  to ``hidden`` ReLU features h = relu(F R + r), R ~ N(0, 1/C), r ~ N(0, 1),
  drawn from ``seed`` exactly as `wmh_jax.study.probe` draws its random layer.
  Their sums over the brain (the image's nonzero voxels) times u =
  voxel_ml / volume_scale_ml are volumes in target units, ``counts`` (b, K):
  a lesion volume is a count of voxels, which a sum of voxel features can
  express and an average cannot (BUILD_NOTES, issue 19: with ~500 training
  scans and more, this readout of a weak body beats the intensity floor,
  the linear GAP readout does not).

  Nothing here is trained. The ``readout`` collection holds ``kernel`` (K,),
  ``bias`` () and ``fitted`` (), written by the training loop's refit
  (`wmh_jax.training.refit`) from the training scans' ``counts``. Once
  fitted, and only at inference, it replaces the volume head's volume
  (``counts . kernel + bias``) and attention map, a signed density whose sum
  over the scan is the volume:
    attention = brain * (u * h . kernel + bias / n_brain)     (b, x, y, z)
  Training always uses the volume head, so the body learns as it would without it.

  Attributes:
    voxel_target: u, target units per voxel (> 0).
    hidden: K, random channels (>= 1).
    seed: seed of the random layer.
  """
  voxel_target: float
  hidden: int = 256
  seed: int = 0

  @nn.compact
  def __call__(self, features: FeatureStack, image: jax.Array, head: dict[str, jax.Array],
               train: bool) -> dict[str, jax.Array]:
    """At inference, the head's outputs plus ``counts`` (b, K), with volume and attention
    replaced once fitted; in training (and at init) the head's outputs alone: the training
    step never computes the random features."""
    readout_kernel = self.variable("readout", "kernel", jnp.zeros, (self.hidden,), jnp.float32)
    readout_bias = self.variable("readout", "bias", jnp.zeros, (), jnp.float32)
    fitted = self.variable("readout", "fitted", jnp.zeros, (), jnp.float32)
    if train or self.is_initializing():
      return head
    kernel, bias = random_relu_layer(features.channels, self.hidden, self.seed)
    brain = (image[..., 0] > 0).astype(jnp.float32)
    hidden = nn.relu(features.project(kernel) + bias) * brain[..., None]
    counts = hidden.sum(axis=(1, 2, 3)) * self.voxel_target
    out = {**head, "counts": counts}
    use = fitted.value > 0
    volume = counts @ readout_kernel.value + readout_bias.value
    attention = brain_density(hidden, readout_kernel.value,
                              jnp.broadcast_to(readout_bias.value, volume.shape), brain,
                              self.voxel_target)
    out["volume"] = jnp.where(use, volume, head["volume"])
    out["attention"] = jnp.where(use, attention, head["attention"])
    return out


class VoxelDense(nn.Module):
  """``nn.Dense(1)`` applied voxel-wise to a `FeatureStack`, with nn.Dense's parameters.

  Attributes:
    bias_init: initial output (logit).
  """
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, features: FeatureStack) -> jax.Array:
    """F (b, x, y, z, C) -> F . kernel + bias, (b, x, y, z)."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (features.channels, 1),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (1,), jnp.float32)
    return features.project(kernel[:, 0]) + bias[0]


class SegHead(nn.Module):
  """1x1x1 convolution to one channel: voxel WMH logits (the paper's sigmoid is applied later).

  Attributes:
    bias_init: initial logit; 0 (paper) gives p = 0.5 everywhere at the start,
      the logit of the lesion prevalence gives a prior-probability start.
  """
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, features: jax.Array | FeatureStack) -> jax.Array:
    """F (b, x, y, z, C) -> voxel WMH logits (b, x, y, z)."""
    return VoxelDense(self.bias_init, name="dense")(FeatureStack.of(features))


def volume_outputs(head: dict, features: FeatureStack, image: jax.Array, train: bool
                   ) -> dict[str, jax.Array]:
  """The volume head named by ``head["kind"]`` (`VOLUME_HEADS`), as submodule ``volume_head``,
  then the `CountReadout` (submodule ``count_readout``) when ``head["readout"]`` holds its fields.

  Call inside a compact module. ``head`` holds ``kind``, the head's fields and ``readout``.
  """
  fields = {k: v for k, v in head.items() if k not in ("kind", "readout")}
  if head["kind"] == "count":
    out = CountHead(**fields, name="volume_head")(features, image, train)
  else:
    out = VolumeHead(**fields, name="volume_head")(features, train)
  if head.get("readout") is None:
    return out
  return CountReadout(**head["readout"], name="count_readout")(features, image, out, train)


class GPUNet(nn.Module):
  """Weak-label regression network (GP-Unet): outputs `volume`, `attention`."""
  body: dict
  head: dict

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'volume': (b,), 'attention': (b, x, y, z)}.

    `train` updates the pooled-feature statistics (`pooled_norm="running"`).
    """
    features = UNetBody(**self.body, name="body")(image)
    return volume_outputs(self.head, features, image, train)


class UNetSegmenter(nn.Module):
  """Strong-label shallow U-Net: outputs `seg_logits`."""
  body: dict
  seg_bias_init: float = 0.0

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'seg_logits': (b, x, y, z)}; `train` unused."""
    del train
    features = UNetBody(**self.body, name="body")(image)
    return {"seg_logits": SegHead(self.seg_bias_init, name="seg_head")(features)}


class JointNet(nn.Module):
  """One body, both heads: outputs `volume`, `attention` and `seg_logits`."""
  body: dict
  head: dict
  seg_bias_init: float = 0.0

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> volume (b,), attention, seg_logits (b, x, y, z)."""
    features = UNetBody(**self.body, name="body")(image)
    out = volume_outputs(self.head, features, image, train)
    out["seg_logits"] = SegHead(self.seg_bias_init, name="seg_head")(features)
    return out


class SeverityNet(nn.Module):
  """Body -> `PooledFeatures` -> Dense: `severity_logits`."""
  body: dict
  pool: dict
  num_classes: int = 5

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'severity_logits': (b, num_classes)}."""
    features = UNetBody(**self.body, name="body")(image)
    pooled, _, _ = PooledFeatures(**self.pool, name="pool")(features, train)
    return {"severity_logits": nn.Dense(self.num_classes, name="severity_head")(pooled)}


def readout(model_config: ml_collections.ConfigDict) -> str:
  """The configured inference readout (`READOUTS`); "head" for configs written before it."""
  return model_config.get("readout", "head")


def volume_head(model_config: ml_collections.ConfigDict) -> str:
  """The configured volume head (`VOLUME_HEADS`); "gap" for configs written before it existed."""
  return model_config.get("volume_head", "gap")


def _check(model_config: ml_collections.ConfigDict) -> None:
  conv.check_impl(model_config.conv_impl)
  conv.compute_dtype(compute_dtype(model_config))
  if model_config.depth < 0 or model_config.base_filters < 1:
    raise ValueError(f"model depth must be >= 0 and base_filters >= 1, got "
                     f"{model_config.depth} and {model_config.base_filters}")
  if model_config.norm not in NORMS:
    raise ValueError(f"model.norm={model_config.norm!r}; expected one of {NORMS}")
  if volume_head(model_config) not in VOLUME_HEADS:
    raise ValueError(f"model.volume_head={volume_head(model_config)!r}; "
                     f"expected one of {VOLUME_HEADS}")
  if volume_head(model_config) == "count" and model_config.count_hidden < 1:
    raise ValueError(f"model.count_hidden must be >= 1, got {model_config.count_hidden}")
  if readout(model_config) not in READOUTS:
    raise ValueError(f"model.readout={readout(model_config)!r}; expected one of {READOUTS}")
  if model_config.pooled_norm not in POOLED_NORMS:
    raise ValueError(f"model.pooled_norm={model_config.pooled_norm!r}; "
                     f"expected one of {POOLED_NORMS}")


def compute_dtype(model_config: ml_collections.ConfigDict) -> str:
  """The configured compute dtype (`conv.DTYPES`); "float32" for configs written before it."""
  return model_config.get("dtype", "float32")


def body_fields(model_config: ml_collections.ConfigDict) -> dict:
  """The `UNetBody` attributes of ``config.model``."""
  return dict(base_filters=model_config.base_filters, depth=model_config.depth,
              conv_impl=model_config.conv_impl, norm=model_config.norm,
              dtype=compute_dtype(model_config))


class ModelParts(NamedTuple):
  """The configured pieces a kind's network is built from (`wmh_jax.models.kinds`).

  Attributes:
    body: the `UNetBody` attributes.
    head: the volume head: ``kind`` ("gap" or "count"), its fields, and ``readout``
      (the `CountReadout` fields, with ``model.readout="counts"``).
    pool: the `PooledFeatures` attributes (GAP head, severity head).
  """
  body: dict
  head: dict
  pool: dict


def model_parts(model_config: ml_collections.ConfigDict, *, voxel_target: float | None = None,
                volume_bias_init: float = 0.0, axis_name: str | None = None) -> ModelParts:
  """The body, volume head and pooling of ``config.model``, checked.

  Args:
    model_config: `config.model` (base_filters, depth, conv_impl, norm,
      pool_scale, pooled_norm, pooled_norm_momentum, zero_init_volume_head,
      volume_head, count_hidden, dtype).
    voxel_target: one model-grid voxel in target units; required by
      `volume_head="count"`.
    volume_bias_init: initial volume-head bias in scaled target units.
    axis_name: the data-parallel axis of the training step (running statistics).

  Raises:
    ValueError: an invalid field.
  """
  _check(model_config)
  body = body_fields(model_config)
  pool = dict(pool_scale=model_config.pool_scale, pooled_norm=model_config.pooled_norm,
              momentum=model_config.pooled_norm_momentum, axis_name=axis_name)
  if volume_head(model_config) == "count":
    if voxel_target is None or not voxel_target > 0:
      raise ValueError(f"model.volume_head='count' needs voxel_target > 0, got {voxel_target}")
    head = dict(kind="count", voxel_target=voxel_target, hidden=model_config.count_hidden,
                momentum=model_config.pooled_norm_momentum, axis_name=axis_name,
                volume_bias_init=volume_bias_init)
  else:
    head = dict(kind="gap", **pool, volume_bias_init=volume_bias_init,
                zero_init_kernel=model_config.zero_init_volume_head)
  if readout(model_config) == "counts":
    if voxel_target is None or not voxel_target > 0:
      raise ValueError(f"model.readout='counts' needs voxel_target > 0, got {voxel_target}")
    head["readout"] = dict(voxel_target=voxel_target, hidden=model_config.readout_hidden)
  return ModelParts(body, head, pool)


def count_params(params) -> int:
  """Total number of scalar parameters in a pytree of arrays."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
