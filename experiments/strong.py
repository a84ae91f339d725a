"""Shallow U-Net trained on voxel masks ("strong labels"), paper §2.2–2.3.

  python -m wmh_jax.main --config=experiments/strong.py:cpu --workdir=runs/strong

Wall time: `:cpu` about 10 min on 2 CPU cores (720 steps); paper scale is a
GPU job. Arguments as `experiments/weak.py` (`cpu`, `paper`, `cpu,paper`).

| field | value | source |
|---|---|---|
| model.kind | strong: the GP-Unet body, 1x1x1 conv, sigmoid | §2.2 "Segmentation Network" |
| output | probability >= 0.5 is WMH; volume = voxel count x voxel volume | §2.2 |
| loss.seg | Dice + BCE on logits (nnU-Net) — paper soft Dice | per-scan soft Dice collapses to predicting nothing (BUILD_NOTES) |
| loss.dice_reduction | batch — paper per scan | small-lesion scans prefer an empty prediction per scan |
| model.seg_prior_init | bias = logit(training lesion fraction) — paper 0 | no early flood of p = 0.5 |
| everything else | as `experiments/weak.py` | §2.3 |
"""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "strong"
  return config
