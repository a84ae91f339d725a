"""Config file for CLI-level tests: ``--config=tests/tiny_experiment.py``.

Pass ``--config.data.manifest`` and ``--config.data.cache_dir`` on the command line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_data  # pylint: disable=wrong-import-position


def get_config(arg=None):
  return tiny_data.tiny_config(Path(""), Path(""), kind=arg or "weak")
