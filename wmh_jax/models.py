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
units, i.e. mL / `config.data.volume_scale_ml`), `seg_prob (b, x, y, z)`
(strong, joint), `severity_logits (b, num_severity_classes)` (severity).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wmh_jax import conv

KINDS = ("weak", "strong", "joint", "severity")


def max_pool_2x(x: jax.Array) -> jax.Array:
  """2x2x2 max-pooling, stride 2: (b, x, y, z, c) -> (b, x/2, y/2, z/2, c).

  Written as a reshape and a max (gradient shared among tied maxima), which
  XLA:CPU runs much faster than `reduce_window`'s select-and-scatter.
  """
  b, nx, ny, nz, c = x.shape
  x = x.reshape(b, nx // 2, 2, ny // 2, 2, nz // 2, 2, c)
  return x.max(axis=(2, 4, 6))


class Block(nn.Module):
  """Two Conv3D+ReLU, then concat(input, output): c -> c + features channels."""
  features: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, x, y, z, c) -> (b, x, y, z, c + features)."""
    h = x
    for i in range(2):
      h = nn.relu(conv.Conv3D(self.features, impl=self.conv_impl,
                              name=f"conv_{i}")(h))
    return jnp.concatenate([x, h], axis=-1)


class UpBlock(nn.Module):
  """`Block` applied to concat(upsample_2x(coarse), skip); same parameters.

  The first convolution is a `conv.UpConcatConv3D`, which (on CPU) convolves
  the upsampled part at the coarse resolution.
  """
  features: int
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, coarse: jax.Array, skip: jax.Array) -> jax.Array:
    """coarse (b, x/2, y/2, z/2, cu), skip (b, x, y, z, cs) -> (b, x, y, z, cu + cs + features)."""
    h = nn.relu(conv.UpConcatConv3D(self.features, impl=self.conv_impl,
                                    name="conv_0")(coarse, skip))
    h = nn.relu(conv.Conv3D(self.features, impl=self.conv_impl,
                            name="conv_1")(h))
    return jnp.concatenate([conv.upsample_2x(coarse), skip, h], axis=-1)


class UNetBody(nn.Module):
  """Shallow U-Net body shared by every model (paper §2.2, Fig. 1).

  Attributes:
    base_filters: filters of the full-resolution blocks (doubled per level).
    depth: number of 2x poolings; each spatial dim must divide by 2**depth.
    conv_impl: `conv.Conv3D` formulation.
  """
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, x, y, z, c) -> last feature maps F (b, x, y, z, C)."""
    factor = 2 ** self.depth
    if x.ndim != 5 or any(n % factor for n in x.shape[1:4]):
      raise ValueError(f"input shape {tuple(x.shape)} must be (b, x, y, z, c) "
                       f"with x, y, z divisible by 2**depth = {factor}")
    skips = []
    for level in range(self.depth):
      x = Block(self.base_filters * 2**level, self.conv_impl,
                name=f"down_{level}")(x)
      skips.append(x)
      x = max_pool_2x(x)
    x = Block(self.base_filters * 2**self.depth, self.conv_impl,
              name="bottom")(x)
    for level in reversed(range(self.depth)):
      x = UpBlock(self.base_filters * 2**level, self.conv_impl,
                  name=f"up_{level}")(x, skips[level])
    return x


class VolumeHead(nn.Module):
  """GP head: global average pool x pool_scale -> Dense(1), and its attention map.

  With F the last feature maps (b, x, y, z, C), W (C,) and bias the Dense
  parameters and s = `pool_scale`:
    volume    = s * mean_voxels(F) . W + bias          (b,)
    attention = s * F . W                              (b, x, y, z)
  so that `attention.mean(axis=(1, 2, 3)) + bias == volume` exactly (up to
  float rounding): the attention map is the Dense weights applied to the
  decoded feature maps before pooling (paper §2.2).

  Attributes:
    pool_scale: s above (1.0 = paper).
    volume_bias_init: initial bias, scaled target units.
    zero_init_kernel: start W at 0 (volume == bias for every scan at step 0)
      instead of LeCun-normal.
  """
  pool_scale: float = 1.0
  volume_bias_init: float = 0.0
  zero_init_kernel: bool = False

  @nn.compact
  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    """F (b, x, y, z, C) -> {'volume': (b,), 'attention': (b, x, y, z)}."""
    pooled = features.mean(axis=(1, 2, 3)) * self.pool_scale
    kernel_init = (nn.initializers.zeros if self.zero_init_kernel
                   else nn.initializers.lecun_normal())
    dense = nn.Dense(1, kernel_init=kernel_init,
                     bias_init=nn.initializers.constant(self.volume_bias_init),
                     name="dense")
    volume = dense(pooled)[:, 0]
    weights = dense.variables["params"]["kernel"][:, 0]
    attention = (features @ weights) * self.pool_scale
    return {"volume": volume, "attention": attention}


class SegHead(nn.Module):
  """1x1x1 convolution to one channel and a sigmoid."""

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """F (b, x, y, z, C) -> voxel WMH probability (b, x, y, z) in [0, 1]."""
    return nn.sigmoid(nn.Dense(1, name="dense")(features)[..., 0])


class GPUNet(nn.Module):
  """Weak-label regression network (GP-Unet): outputs `volume`, `attention`."""
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"
  pool_scale: float = 1.0
  volume_bias_init: float = 0.0
  zero_init_volume_head: bool = False

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'volume': (b,), 'attention': (b, x, y, z)}.

    `train` is accepted for a uniform interface; no layer depends on it.
    """
    del train
    features = UNetBody(self.base_filters, self.depth, self.conv_impl,
                        name="body")(image)
    return VolumeHead(self.pool_scale, self.volume_bias_init,
                      self.zero_init_volume_head, name="volume_head")(features)


class UNetSegmenter(nn.Module):
  """Strong-label shallow U-Net: outputs `seg_prob`."""
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'seg_prob': (b, x, y, z)}; `train` unused."""
    del train
    features = UNetBody(self.base_filters, self.depth, self.conv_impl,
                        name="body")(image)
    return {"seg_prob": SegHead(name="seg_head")(features)}


class JointNet(nn.Module):
  """One body, both heads: outputs `volume`, `attention` and `seg_prob`."""
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"
  pool_scale: float = 1.0
  volume_bias_init: float = 0.0
  zero_init_volume_head: bool = False

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> volume (b,), attention, seg_prob (b, x, y, z)."""
    del train
    features = UNetBody(self.base_filters, self.depth, self.conv_impl,
                        name="body")(image)
    out = VolumeHead(self.pool_scale, self.volume_bias_init,
                     self.zero_init_volume_head, name="volume_head")(features)
    out["seg_prob"] = SegHead(name="seg_head")(features)
    return out


class SeverityNet(nn.Module):
  """Body -> global average pool x pool_scale -> Dense: `severity_logits`."""
  base_filters: int = 32
  depth: int = 2
  conv_impl: str = "auto"
  pool_scale: float = 1.0
  num_classes: int = 5

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """image (b, x, y, z, 1) -> {'severity_logits': (b, num_classes)}; `train` unused."""
    del train
    features = UNetBody(self.base_filters, self.depth, self.conv_impl,
                        name="body")(image)
    pooled = features.mean(axis=(1, 2, 3)) * self.pool_scale
    return {"severity_logits": nn.Dense(self.num_classes,
                                        name="severity_head")(pooled)}


def build_model(model_config: ml_collections.ConfigDict, *,
                volume_bias_init: float = 0.0) -> nn.Module:
  """The model named by `model_config.kind` (one of `KINDS`).

  Args:
    model_config: `config.model` (kind, base_filters, depth, conv_impl,
      pool_scale, num_severity_classes).
    volume_bias_init: initial volume-head bias in scaled target units (e.g.
      the mean training target); used by the weak and joint models.
  """
  kind = model_config.kind
  conv.check_impl(model_config.conv_impl)
  if model_config.depth < 0 or model_config.base_filters < 1:
    raise ValueError(f"model depth must be >= 0 and base_filters >= 1, got "
                     f"{model_config.depth} and {model_config.base_filters}")
  body = dict(base_filters=model_config.base_filters, depth=model_config.depth,
              conv_impl=model_config.conv_impl)
  head = dict(pool_scale=model_config.pool_scale,
              volume_bias_init=volume_bias_init,
              zero_init_volume_head=model_config.get("zero_init_volume_head",
                                                     False))
  if kind == "weak":
    return GPUNet(**body, **head)
  if kind == "strong":
    return UNetSegmenter(**body)
  if kind == "joint":
    return JointNet(**body, **head)
  if kind == "severity":
    return SeverityNet(**body, pool_scale=model_config.pool_scale,
                       num_classes=model_config.num_severity_classes)
  raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def count_params(params) -> int:
  """Total number of scalar parameters in a pytree of arrays."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
