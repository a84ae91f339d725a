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
  # Every other value: the shared defaults of wmh_jax/configs.py, which are
  # experiments/strong.py's recipe (its comments cite the paper for each).
  config = configs.get_config()
  config.model.kind = "joint"
  config.train.joint_dice_weight = 1.0  # equal weight; not tuned
  return configs.apply_flags(config, arg)
