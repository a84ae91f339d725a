"""What every command-line entry point does first, after absl parses the flags.

Library INFO logs (Orbax, JAX) are hidden unless the user passes
``--verbosity`` (0 = INFO, 1 = debug); warnings and errors always show. The
persistent XLA compilation cache is turned on (:mod:`wmh_jax.compilation`).
"""

from __future__ import annotations

import argparse
import logging as std_logging

from absl import flags, logging

from wmh_jax import compilation

# Orbax warnings that every read-only restore prints and that say nothing to a user.
_ORBAX_NOTICES = ("read_only=True", "Given directory is read only",
                  "was found in the checkpoint, but could not be restored")


class _DropOrbaxNotices(std_logging.Filter):
  """Drops :data:`_ORBAX_NOTICES`; every other record passes."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "orbax" not in record.pathname or record.levelno >= std_logging.ERROR:
      return True
    message = record.getMessage()
    return not any(notice in message for notice in _ORBAX_NOTICES)


_ORBAX_FILTER = _DropOrbaxNotices()


def quiet_library_logs(verbosity: int | None) -> None:
  """Warnings and errors only, without Orbax's read-only notices; ``verbosity`` 0/1 = INFO/debug."""
  if verbosity is not None:
    logging.set_verbosity(verbosity)
    return
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)
  std_logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # a no-op if already added


def start(verbosity: int | None = None, compilation_cache: str | None = None) -> None:
  """Quiet logs and the persistent compilation cache (None = the default folder)."""
  quiet_library_logs(verbosity)
  compilation.enable_persistent_cache(compilation_cache)


def start_from_flags() -> None:
  """:func:`start` for absl entry points: ``--verbosity`` and ``--compilation_cache``."""
  verbosity = flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None
  start(verbosity, flags.FLAGS.compilation_cache)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """``--verbosity`` and ``--compilation_cache`` for argparse entry points; then :func:`start`."""
  parser.add_argument("--verbosity", type=int, default=None,
                      help="library logs: 0 = INFO, 1 = debug (default: warnings only)")
  parser.add_argument("--compilation_cache", default=None,
                      help="persistent XLA cache folder (default <cache root>/xla; '' = off)")
