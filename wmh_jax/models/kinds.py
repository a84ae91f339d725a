"""The registry of model kinds: one entry per kind says everything the stages need of it.

A kind is what a run trains: ``config.model.kind``. Its :class:`Kind` names

- the network it builds (:func:`build_model`; `wmh_jax.models.architectures`);
- its loss terms (`wmh_jax.training.losses.TERMS`) and their weights;
- the validation score that ranks its checkpoints, and the curves the study draws;
- its physical outputs (`wmh_jax.inference.forward.physical_outputs`) and their units;
- the columns and voxel maps of the predict command;
- whether it has a volume head (GP head: refits, OOD scores, intervals) and/or a
  segmentation head (Dice of p > 0.5).

Paper: §2.2 (weak: GP-Unet regression of the volume; strong: shallow U-Net
segmenter). ``joint`` and ``severity`` are this toolkit's extensions (README).
No other module branches on a kind's name: they ask this registry, like
big_vision's ``evaluators/common.py:from_config`` looks evaluators up by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import ml_collections

from wmh_jax.models import architectures

# Units of every physical output (keys of `inference.forward.physical_outputs`).
UNITS: Mapping[str, str] = {
    "volume_ml": "mL",
    "seg_volume_ml": "mL (voxels with p > 0.5)",
    "soft_volume_ml": "mL (summed probability)",
    "seg_prob": "probability per voxel (x, y, z)",
    "attention": "attention per voxel (x, y, z); mL per voxel for the count head",
    "severity": "class 0-4",
}


@dataclasses.dataclass(frozen=True)
class Kind:
  """What one model kind trains, scores and outputs.

  Attributes:
    name: ``config.model.kind``.
    labels: what it learns from: "volume" (weak labels), "mask" (strong
      labels), "volume+mask" or "severity".
    build: ``(parts, seg_bias_init, model_config) -> nn.Module`` with
      `architectures.ModelParts`.
    loss_terms: ``(term, weight)`` pairs summed in order into the training
      loss; ``term`` names `training.losses.TERMS`, ``weight`` is None (1)
      or a dotted config field.
    score: the validation metric that ranks checkpoints (higher is better).
    curves: validation metrics drawn as learning curves.
    outputs: physical outputs, in the order predict writes their columns;
      units in :data:`UNITS`.
    predict_columns: per-network ``volumes.csv`` columns (keys of ``outputs``).
    volume_head: has the GP volume head (closed-form refit, OOD reference,
      conformal intervals).
    segmentation_head: has the voxel segmentation head (Dice of p > 0.5).
    color: matplotlib colour of its study figures.
  """
  name: str
  labels: str
  build: Callable[[architectures.ModelParts, float, ml_collections.ConfigDict], nn.Module]
  loss_terms: tuple[tuple[str, str | None], ...]
  score: str
  curves: tuple[str, ...]
  outputs: tuple[str, ...]
  predict_columns: tuple[str, ...]
  volume_head: bool
  segmentation_head: bool
  color: str

  @property
  def predicts_volume(self) -> bool:
    """Whether it outputs a WMH volume (every kind but the severity classifier)."""
    return "volume_ml" in self.outputs

  @property
  def maps(self) -> tuple[str, ...]:
    """The voxel maps among its outputs (predict writes them on the native grid)."""
    return tuple(o for o in self.outputs if o in ("attention", "seg_prob"))


REGISTRY: Mapping[str, Kind] = {kind.name: kind for kind in (
    Kind("weak", labels="volume",
         build=lambda parts, seg_bias, cfg: architectures.GPUNet(parts.body, parts.head),
         loss_terms=(("volume_mse", None),), score="val_icc", curves=("val_icc",),
         outputs=("volume_ml", "attention"), predict_columns=("volume_ml",),
         volume_head=True, segmentation_head=False, color="tab:blue"),
    Kind("strong", labels="mask",
         build=lambda parts, seg_bias, cfg: architectures.UNetSegmenter(parts.body, seg_bias),
         loss_terms=(("segmentation", None),), score="val_dice", curves=("val_dice",),
         outputs=("volume_ml", "seg_volume_ml", "soft_volume_ml", "seg_prob"),
         predict_columns=("volume_ml", "soft_volume_ml"),
         volume_head=False, segmentation_head=True, color="tab:orange"),
    Kind("joint", labels="volume+mask",
         build=lambda parts, seg_bias, cfg: architectures.JointNet(parts.body, parts.head,
                                                                   seg_bias),
         loss_terms=(("volume_mse", None), ("segmentation", "train.joint_dice_weight")),
         score="val_icc", curves=("val_icc", "val_dice"),
         outputs=("volume_ml", "seg_volume_ml", "soft_volume_ml", "seg_prob", "attention"),
         predict_columns=("volume_ml", "seg_volume_ml", "soft_volume_ml"),
         volume_head=True, segmentation_head=True, color="tab:green"),
    Kind("severity", labels="severity",
         build=lambda parts, seg_bias, cfg: architectures.SeverityNet(
             parts.body, parts.pool, num_classes=cfg.num_severity_classes),
         loss_terms=(("severity_ce", None),), score="val_icc", curves=("val_icc",),
         outputs=("severity",), predict_columns=("severity",),
         volume_head=False, segmentation_head=False, color="gray"),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Kind:
  """The registered kind ``name``.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown model kind {name!r}; expected one of {NAMES}")
  return REGISTRY[name]


def first_of(names: list[str], want: Callable[[Kind], bool]) -> int | None:
  """Index of the first of ``names`` whose kind satisfies ``want``, trying the kinds in
  registry order (so a weak run is picked before a joint one); None when none does."""
  for kind in REGISTRY.values():
    if want(kind) and kind.name in names:
      return names.index(kind.name)
  return None


def build_model(model_config: ml_collections.ConfigDict, *, voxel_target: float | None = None,
                volume_bias_init: float = 0.0, seg_bias_init: float = 0.0,
                axis_name: str | None = None) -> nn.Module:
  """The network of ``model_config.kind``.

  Args:
    model_config: ``config.model`` (`architectures.model_parts` lists the
      fields read).
    voxel_target: one model-grid voxel in target units, voxel_ml /
      volume_scale_ml (`data.records.voxel_target`); required by
      ``volume_head="count"``, which sums voxel fractions times it.
    volume_bias_init: initial volume-head bias in scaled target units (e.g.
      the mean training target); used by kinds with a volume head.
    seg_bias_init: initial segmentation logit (kinds with a segmentation head).
    axis_name: the data-parallel axis the training step maps over; running
      statistics average their batch moments over it (unused at inference).

  Raises:
    ValueError: an unknown kind or an invalid model field.
  """
  kind = get(model_config.kind)
  parts = architectures.model_parts(model_config, voxel_target=voxel_target,
                                    volume_bias_init=volume_bias_init, axis_name=axis_name)
  return kind.build(parts, seg_bias_init, model_config)
