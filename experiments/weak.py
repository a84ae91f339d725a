"""GP-Unet trained on per-scan WMH volume (weak labels), paper §2.2."""

from wmh_jax import configs


def get_config(arg=None):
  return configs.get_config(arg)
