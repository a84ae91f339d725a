"""experiments/weak.py with domain-randomised augmentation (issue 15).

Not in the paper. Each training image gets a random scanner: contrast curve,
bias field, resolution, noise and normalisation percentiles
(`config.augment.domain`, wmh_jax/data/domain.py; ranges and their sources
in wmh_jax/configs.py). Only the image changes; masks and volumes do not.
At the `:cpu` grid (2.8x2.8x8.4 mm) the resolution step is a no-op: the grid
is already coarser than its targets.

Command: ``python -m wmh_jax.main --config=experiments/weak_domain.py:cpu
--workdir=runs/weak_domain --seeds=0,1,2``; or the pair in one study:
``python -m wmh_jax.study --config=experiments/domain_study.py:cpu``. Wall time as
experiments/weak.py (the randomisation is ~1 % of a `:cpu` step).
"""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("weak_experiment",
                                               Path(__file__).with_name("weak.py"))
_BASE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_BASE)


def get_config(arg=None):
  config = _BASE.get_config(arg)
  config.augment.domain.enabled = True
  return config
