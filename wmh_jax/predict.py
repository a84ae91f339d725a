"""``python -m wmh_jax.predict``: the command of :mod:`wmh_jax.inference.predict`."""

import sys

from wmh_jax.inference import predict

if __name__ == "__main__":
  sys.exit(predict.main())
