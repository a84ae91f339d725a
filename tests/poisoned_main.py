"""``python tests/poisoned_main.py --poison_step=N <wmh_jax.main flags>``.

The training CLI with the N-th training batch (1-based, counted from the
start of this process) turned to NaN, for the non-finite-loss tests.
"""

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).parent))

import poison  # pylint: disable=wrong-import-position
from wmh_jax import main as training_cli  # pylint: disable=wrong-import-position
from wmh_jax.data import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_integer("poison_step", None, "1-based training batch to poison.", required=True)


def main(argv):
  pipeline.make_train_iterator = poison.poisoning(pipeline.make_train_iterator,
                                                  flags.FLAGS.poison_step)
  training_cli.main(argv)


if __name__ == "__main__":
  app.run(main)
