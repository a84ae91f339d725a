"""Severity-score pilot: 5 classes from volume quantiles, cross-entropy."""

from wmh_jax import configs


def get_config(arg=None):
  config = configs.get_config(arg)
  config.model.kind = "severity"
  return config
