"""What every command-line entry point does first, after absl parses the flags.

Library INFO logs (Orbax, JAX) are hidden unless the user passes
``--verbosity`` (0 = INFO, 1 = debug); warnings and errors always show. The
persistent XLA compilation cache is turned on (:mod:`wmh_jax.compilation`).
"""

from __future__ import annotations

from absl import flags, logging

from wmh_jax import compilation


def quiet_library_logs() -> None:
  """Warnings and errors only, unless ``--verbosity`` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def start() -> None:
  """Quiet logs and the persistent compilation cache (``--compilation_cache``)."""
  quiet_library_logs()
  compilation.enable_from_flags()
