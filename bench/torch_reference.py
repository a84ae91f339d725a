"""The GP-Unet (weak) and shallow U-Net (strong) of `wmh_jax.models.architectures`, in PyTorch.

Layer for layer the nets of ``wmh_jax.models.architectures`` (paper §2.2), with the same
parameter count, used only as a speed reference:

  * block: two 3x3x3 Conv3d + ReLU, then concat(block input, block output);
  * down path: a block, then 2x2x2 max-pooling, ``depth`` times; a bottom block;
  * up path: nearest x2 upsampling, concat with the skip of that level
    (upsampled channels first, as in ``wmh_jax.models.conv.UpConcatConv3D``), a block;
  * weak head: global average pool -> Linear(1) (volume) and the same weights
    applied voxel-wise (attention); strong head: 1x1x1 Conv3d + sigmoid.

Tensors are ``(b, c, x, y, z)`` (PyTorch's N, C, D, H, W with D = x, H = y,
W = z), so spatial output shapes read like the Flax ones. Initialisation
matches Flax (LeCun truncated normal kernels, zero biases), so activations
have the same scale. The training step is forward + backward +
``torch.optim.Adadelta(lr=1.0, rho=0.95, eps=1e-7)`` (Keras-2 values, as
``wmh_jax.training.train.make_optimizer``) on MSE of the volume (weak) or soft Dice
(strong, ``wmh_jax.training.losses.soft_dice_loss`` with eps 1 voxel).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("weak", "strong")
DICE_EPS = 1.0
# Flax's lecun_normal: truncated normal at ±2 std, rescaled to variance 1/fan_in.
_TRUNCATED_STD = 0.87962566103423978


def _lecun_init(module: nn.Module) -> None:
  """Flax-like init of a Conv3d / Linear: truncated LeCun normal kernel, zero bias."""
  if isinstance(module, (nn.Conv3d, nn.Linear)):
    fan_in = module.weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_STD
    nn.init.trunc_normal_(module.weight, std=std, a=-2.0 * std, b=2.0 * std)
    nn.init.zeros_(module.bias)


class Block(nn.Module):
  """Two Conv3d(3x3x3, 'same') + ReLU, then concat(input, output): c -> c + features."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.conv_0 = nn.Conv3d(in_channels, features, 3, padding=1)
    self.conv_1 = nn.Conv3d(features, features, 3, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(b, c, x, y, z) -> (b, c + features, x, y, z)."""
    h = F.relu(self.conv_1(F.relu(self.conv_0(x))))
    return torch.cat([x, h], dim=1)


class UNetBody(nn.Module):
  """Shallow U-Net body (``wmh_jax.models.architectures.UNetBody``); ``out_channels`` is C of F."""

  def __init__(self, base_filters: int, depth: int, in_channels: int = 1):
    super().__init__()
    self.depth = depth
    channels, skips = in_channels, []
    self.down = nn.ModuleList()
    for level in range(depth):
      self.down.append(Block(channels, base_filters * 2**level))
      channels += base_filters * 2**level
      skips.append(channels)
    self.bottom = Block(channels, base_filters * 2**depth)
    channels += base_filters * 2**depth
    self.up = nn.ModuleList()
    for level in reversed(range(depth)):
      self.up.append(Block(channels + skips[level], base_filters * 2**level))
      channels += skips[level] + base_filters * 2**level
    self.out_channels = channels

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(b, c, x, y, z) -> last feature maps F (b, C, x, y, z)."""
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = F.max_pool3d(x, 2)
    x = self.bottom(x)
    for block, skip in zip(self.up, reversed(skips)):
      x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
    return x


class GPUNet(nn.Module):
  """Weak-label GP-Unet: ``volume (b,)`` and ``attention (b, x, y, z)``."""

  def __init__(self, base_filters: int, depth: int):
    super().__init__()
    self.body = UNetBody(base_filters, depth)
    self.dense = nn.Linear(self.body.out_channels, 1)
    self.apply(_lecun_init)

  def forward(self, image: torch.Tensor, maps: bool = True) -> dict[str, torch.Tensor]:
    """image (b, 1, x, y, z) -> volume (b,) [+ attention (b, x, y, z) when ``maps``]."""
    features = self.body(image)
    out = {"volume": self.dense(features.mean(dim=(2, 3, 4)))[:, 0]}
    if maps:
      out["attention"] = torch.einsum("bcxyz,c->bxyz", features, self.dense.weight[0])
    return out


class UNetSegmenter(nn.Module):
  """Strong-label U-Net: ``seg_logits (b, x, y, z)`` (the sigmoid is in the loss)."""

  def __init__(self, base_filters: int, depth: int):
    super().__init__()
    self.body = UNetBody(base_filters, depth)
    self.seg_head = nn.Conv3d(self.body.out_channels, 1, 1)
    self.apply(_lecun_init)

  def forward(self, image: torch.Tensor, maps: bool = True) -> dict[str, torch.Tensor]:
    """image (b, 1, x, y, z) -> seg_logits (b, x, y, z); ``maps`` unused."""
    del maps
    return {"seg_logits": self.seg_head(self.body(image))[:, 0]}


def build_model(kind: str, base_filters: int, depth: int) -> nn.Module:
  """The reference net of ``kind`` ('weak' or 'strong')."""
  if kind == "weak":
    return GPUNet(base_filters, depth)
  if kind == "strong":
    return UNetSegmenter(base_filters, depth)
  raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def count_params(model: nn.Module) -> int:
  """Total number of scalar parameters."""
  return sum(p.numel() for p in model.parameters())


def soft_dice_loss(prob: torch.Tensor, mask: torch.Tensor, eps: float = DICE_EPS
                   ) -> torch.Tensor:
  """Mean over scans of 1 - soft Dice; prob, mask (b, x, y, z)."""
  intersection = (prob * mask).sum(dim=(1, 2, 3))
  dice = (2.0 * intersection + eps) / (prob.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + eps)
  return (1.0 - dice).mean()


def make_train_step(model: nn.Module, kind: str, image: torch.Tensor,
                    target: torch.Tensor) -> Callable[[], float]:
  """A closure running one Adadelta step on a fixed batch; returns the loss.

  Args:
    model: from :func:`build_model`, on the device and in the memory format
      of ``image``.
    kind: 'weak' (MSE of ``volume`` vs ``target`` (b,)) or 'strong' (soft
      Dice of ``sigmoid(seg_logits)`` vs ``target`` (b, x, y, z)).
    image: (b, 1, x, y, z) float32.
    target: see ``kind``.
  """
  optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-7)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    outputs = model(image, maps=False)
    if kind == "weak":
      loss = F.mse_loss(outputs["volume"], target)
    else:
      loss = soft_dice_loss(torch.sigmoid(outputs["seg_logits"]), target)
    loss.backward()
    optimizer.step()
    return loss.item()

  return step
