"""XLA compilation: JAX's persistent on-disk cache, on by default for the CLIs.

A compiled train step or forward pass is written to ``<cache root>/xla``
(``$WMH_JAX_CACHE/xla``, or ``~/.cache/wmh_jax/xla``), so a second process
with the same program (a resumed run, the next command of a study, an
analysis after training) loads it instead of compiling. ``--compilation_cache``
picks another folder; ``--compilation_cache=`` (empty) turns it off. Deleting
the folder is always safe.
"""

from __future__ import annotations

from pathlib import Path

import jax

from wmh_jax.runtime import fileio


def default_directory() -> Path:
  """``<cache root>/xla``."""
  return fileio.default_cache_root() / "xla"


def enable_persistent_cache(directory: str | Path | None = None) -> Path | None:
  """Points JAX's persistent compilation cache at ``directory``.

  Args:
    directory: the folder; None = ``$JAX_COMPILATION_CACHE_DIR`` when set,
      else :func:`default_directory`; ``""`` turns the cache off (nothing is
      read or written).

  Returns:
    The folder in use, or None when off.
  """
  if directory == "":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if directory is None:
    directory = jax.config.jax_compilation_cache_dir or default_directory()
  path = Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  return path
