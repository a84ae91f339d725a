"""``python tests/poisoned_main.py [--poison_step=N] [--sigterm_batch=K] <wmh_jax.main flags>``.

The training CLI with the N-th training batch (1-based, counted from the
start of this process) turned to NaN, for the non-finite-loss tests, and/or
SIGTERM sent to itself when it takes the K-th batch, for the preemption tests.
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).parent))

import poison  # pylint: disable=wrong-import-position
from wmh_jax import main as training_cli  # pylint: disable=wrong-import-position
from wmh_jax.data import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_integer("poison_step", None, "1-based training batch to poison.")
flags.DEFINE_integer("sigterm_batch", None, "1-based training batch whose taking sends SIGTERM.")


def main(argv):
  if flags.FLAGS.poison_step:
    pipeline.make_train_iterator = poison.poisoning(pipeline.make_train_iterator,
                                                    flags.FLAGS.poison_step)
  if flags.FLAGS.sigterm_batch:
    pipeline.make_train_iterator = poison.sigterm_at(pipeline.make_train_iterator,
                                                     flags.FLAGS.sigterm_batch)
  training_cli.main(argv)


if __name__ == "__main__":
  app.run(main)
