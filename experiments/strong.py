r"""Strong labels: a shallow U-Net segments WMH voxel-wise; volume = voxel count.

Paper: O. Werner et al., weak vs strong labels for WMH volume (cited in README.md; its
text is not distributed with the repository), §2.2 "Segmentation Network Trained with Strong
Labels" and §2.3 "Training Details". The base config (wmh_jax/configs.py) cites the
paper for each field and is this experiment's recipe unchanged; this file sets only the
model kind. The argument ``paper`` sets every deviation from the paper back.

Command (3 seeds, §2.3 "repeated three times"):

  python -m wmh_jax.main --config=experiments/strong.py:cpu --workdir=runs/strong --seeds=0,1,2

Expected wall time, 2 CPU cores: ``:cpu`` about 8 min of training per seed (720
steps at ~0.5 s; BUILD_NOTES.md, "Making the networks learn"), plus about 1.6 min
to build the built-in cohort the first time (README.md); paper scale (no
argument) is a GPU job.

Arguments (comma-separated, like big_vision's ``runlocal``):
  cpu    a run that fits 2 CPU cores: 56x64x16 grid at 2.8x2.8x8.4 mm, 8 base
         filters, 400 local scans, 12 epochs of 60 steps, flips only
         (``wmh_jax.configs.apply_cpu_variant``; listed in ``cpu_variant_changes``).
  paper  the paper-exact recipe (``wmh_jax.configs.PAPER_RECIPE``; listed in
         ``paper_recipe_changes``), e.g. ``:cpu,paper``.
  domain domain-randomised augmentation (``augment.domain``; not in the paper;
         README "Domain randomisation"), e.g. ``:cpu,domain``.
"""

from wmh_jax import configs


def get_config(arg=None):
  # Every other value is the base recipe of wmh_jax/configs.py, which cites the paper (or
  # the reason for a deviation) for each field; the strong network uses it unchanged.
  config = configs.get_config()
  # §2.2: the GP-Unet body without the global pooling, then a 1x1x1 conv and a sigmoid;
  # "thresholded at 0.5"; the volume is the foreground voxel count.
  config.model.kind = "strong"
  return configs.apply_flags(config, arg)
