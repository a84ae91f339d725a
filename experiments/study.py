"""The whole study (paper §2.4, §3): weak, strong, joint and severity x 3 seeds.

``python -m wmh_jax.study --config=experiments/study.py:cpu --workdir=runs/study``

The argument (``:cpu`` or nothing) is passed on to every experiment config
file. The ``data`` fields, when set, override the same fields of every
experiment (``--config.data.manifest=my_scans.csv`` runs the study on your own
data; ``--config.data.external_manifests=a.csv,b.csv`` adds external test sets).
"""

from pathlib import Path

import ml_collections

HERE = Path(__file__).resolve().parent


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  suffix = f":{arg}" if arg else ""
  # "name=path.py[:arg]", in report order (relative paths from the cwd).
  config.experiments = tuple(f"{kind}={HERE / kind}.py{suffix}"
                             for kind in ("weak", "strong", "joint", "severity"))
  config.seeds = (0, 1, 2)
  config.data = ml_collections.ConfigDict()
  config.data.manifest = ""
  config.data.external_manifests = ""
  config.data.cohort_dir = ""
  config.data.cache_dir = ""
  config.analysis = ml_collections.ConfigDict()
  config.analysis.datasets = ""        # comma-separated; empty = every test set
  config.analysis.n_boot = 1000        # bootstrap resamples per CI
  config.analysis.boot_seed = 0
  return config
