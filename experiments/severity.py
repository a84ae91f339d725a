"""Severity-score pilot: 5 classes (volume quintiles of the domain), cross-entropy.

  python -m wmh_jax.main --config=experiments/severity.py:cpu --workdir=runs/severity

The GP-Unet body and its standardised pooled features feed a Dense layer of
`model.num_severity_classes` logits. Arguments and everything else as
`experiments/weak.py`.
"""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "severity"
  config.model.num_severity_classes = 5
  return config
