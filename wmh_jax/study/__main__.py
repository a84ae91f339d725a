"""``python -m wmh_jax.study``: the command of :mod:`wmh_jax.study.sweep`."""

from absl import app

from wmh_jax.study import sweep

if __name__ == "__main__":
  sweep.define_flags()
  app.run(sweep.main)
