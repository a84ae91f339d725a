r"""Severity-score pilot: 5 classes (volume quintiles of the domain), cross-entropy.

Not a result of the paper: a pilot of predicting a clinical severity class
instead of the volume. The GP-Unet body and its standardised pooled features
feed a Dense layer of ``model.num_severity_classes`` logits.

Command: ``python -m wmh_jax.main --config=experiments/severity.py:cpu
--workdir=runs/severity --seeds=0,1,2``. Expected wall time, 2 CPU cores:
``:cpu`` about 7 min per seed (BUILD_NOTES.md, "The study"). Arguments ``cpu``
and ``paper`` as in ``experiments/weak.py``.
"""

from wmh_jax import configs


def get_config(arg=None):
  # Every other value is the base recipe of wmh_jax/configs.py, which cites the paper (or
  # the reason for a deviation) for each field.
  config = configs.get_config()
  config.model.kind = "severity"  # classes: the base's `model.num_severity_classes` (5)
  return configs.apply_flags(config, arg)
