"""``python -m wmh_jax.analysis``: the command of :mod:`wmh_jax.study.analysis`."""

import sys

from wmh_jax.study import analysis

if __name__ == "__main__":
  sys.exit(analysis.main())
