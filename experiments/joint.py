"""GP-Unet body with both heads: volume MSE + soft Dice (the paper's discussion)."""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "joint"
  return config
