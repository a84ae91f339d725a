"""What every command-line entry point does first, after absl parses the flags.

Library INFO logs (Orbax, JAX) are hidden unless the user passes
``--verbosity`` (0 = INFO, 1 = debug); warnings and errors always show. The
persistent XLA compilation cache is turned on (:mod:`wmh_jax.runtime.compilation`).
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from wmh_jax.runtime import compilation, host_devices

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


def define_runtime_flags(values: flags.FlagValues = flags.FLAGS, cpu_devices: bool = False
                         ) -> None:
  """``--compilation_cache`` (and, for commands that train, ``--cpu_devices``) on ``values``.

  Entry points call it; no library module defines a flag. ``--verbosity`` is
  absl's own flag on the global ``FLAGS``; a command's own ``values`` get one too.
  """
  flags.DEFINE_string("compilation_cache", None,
                      "Persistent XLA compilation cache folder (default: <cache root>/xla); "
                      "empty to turn it off.", flag_values=values)
  if values is not flags.FLAGS:
    flags.DEFINE_integer("verbosity", None, "Library logs: 0 = INFO, 1 = debug (default: "
                         "warnings only).", flag_values=values)
  if cpu_devices:
    flags.DEFINE_integer("cpu_devices", None,
                         "Split this host's CPU into N XLA devices and train data-parallel over "
                         "them (faster on multi-core CPUs; N must divide the global batch). "
                         "Default: leave JAX's device count alone (1 CPU device).",
                         flag_values=values)


def start_from_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """:func:`start` with ``--verbosity`` and ``--compilation_cache``, then
  ``--cpu_devices`` where the command has it (a bad count is a usage error)."""
  verbosity = values.verbosity if values["verbosity"].present else None
  start(verbosity, values.compilation_cache)
  if "cpu_devices" in values:
    try:
      host_devices.use_cpu_devices(values.cpu_devices)
    except ValueError as err:
      raise app.UsageError(str(err)) from None


def parse_command(program: str, description: str, define: Callable[[flags.FlagValues], None],
                  argv: Sequence[str] | None, arguments: str = "") -> tuple[flags.FlagValues,
                                                                            list[str]]:
  """Parses one command's absl flags on a ``FlagValues`` of its own, then :func:`start_from_flags`.

  For commands that tests call as ``main(argv)`` and that take positional
  arguments: the global ``FLAGS`` stay untouched, so the command can run many
  times in one process. Flags and positional arguments may be interleaved.

  Args:
    program: how the user runs it (``python -m wmh_jax.predict``).
    description: one line for ``--help``.
    define: defines the command's flags on the given ``FlagValues``.
    argv: the arguments after the program (None: ``sys.argv[1:]``).
    arguments: the positional arguments, for the usage line.

  Returns:
    The parsed flags and the positional arguments.

  Raises:
    SystemExit: 2 after a bad or missing flag (the message and the usage on
      stderr); 0 after ``--help``.
  """
  values = flags.FlagValues()
  define(values)
  define_runtime_flags(values)
  usage = f"usage: {program} [flags] {arguments}".rstrip()
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in ("-h", "--help", "--helpfull") for arg in argv):  # before required flags
    print(f"{usage}\n\n{description} (-h, --help: this help)\n\n"
          f"{values.get_help(include_special_flags=False)}")
    raise SystemExit(0)
  try:
    positional = values([program, *argv])[1:]
  except flags.Error as err:
    print(f"{usage}\n{program}: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  if positional and not arguments:
    print(f"{usage}\n{program}: error: unexpected arguments {positional}", file=sys.stderr)
    raise SystemExit(2)
  start_from_flags(values)
  return values, positional
