"""GP-Unet body with both heads: volume MSE + segmentation loss (the paper's discussion, §4).

  python -m wmh_jax.main --config=experiments/joint.py:cpu --workdir=runs/joint

The loss is MSE(volume) + `train.joint_dice_weight` x the strong segmentation
loss (`experiments/strong.py`); scans without a mask only get the MSE.
Arguments and everything else as `experiments/weak.py`.
"""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "joint"
  config.train.joint_dice_weight = 1.0
  return config
