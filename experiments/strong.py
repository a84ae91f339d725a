"""Shallow U-Net trained on voxel masks with soft Dice (strong labels), paper §2.2."""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "strong"
  return config
