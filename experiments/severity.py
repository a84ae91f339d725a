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
  # Every other value: the shared defaults of wmh_jax/configs.py, which are
  # experiments/strong.py's recipe (its comments cite the paper for each).
  config = configs.get_config()
  config.model.kind = "severity"
  config.model.num_severity_classes = 5  # quintiles of the training domain's volumes
  return configs.apply_flags(config, arg)
