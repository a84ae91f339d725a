r"""Both labels: the GP-Unet body with both heads, MSE(volume) + segmentation loss.

Not a result of the paper: its discussion (§4) proposes combining weak and
strong labels. The loss is MSE(volume) + ``train.joint_dice_weight`` x the
strong segmentation loss; scans without a mask only get the MSE.

Command: ``python -m wmh_jax.main --config=experiments/joint.py:cpu --workdir=runs/joint
--seeds=0,1,2``. Expected wall time, 2 CPU cores: ``:cpu`` about 10–11 min per
seed (BUILD_NOTES.md, "The study"). Arguments ``cpu`` and ``paper`` as in
``experiments/weak.py``.
"""

from wmh_jax import configs


def get_config(arg=None):
  # Every other value is the base recipe of wmh_jax/configs.py, which cites the paper (or
  # the reason for a deviation) for each field.
  config = configs.get_config()
  config.model.kind = "joint"  # the loss weight `train.joint_dice_weight` is the base's 1
  return configs.apply_flags(config, arg)
