"""Files: atomic writes (every output appears whole or not at all) and the cache root."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
  """Yields a temporary path next to ``path``; renames it over ``path`` on success.

  The temp file lives in the same folder (so ``os.replace`` is atomic), gets
  mode 0644, and is removed if the body raises. ``suffix`` lets writers that
  choose a format from the file name (nibabel: ``.nii.gz``) see the right one.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
  """Calls ``write(file)`` on a temp file next to ``path``, then renames it (mode 644)."""
  with atomic_path(path) as tmp, tmp.open("wb") as f:
    write(f)


def _cell(value: Any) -> str:
  """CSV cell: floats in full precision (``nan`` for NaN), None as empty."""
  if value is None:
    return ""
  if isinstance(value, float):
    return repr(value)
  return str(value)


def write_csv(path: str | os.PathLike, columns: Sequence[str],
              rows: Sequence[Mapping[str, Any]]) -> None:
  """Atomically (re)writes a CSV of ``rows`` with header ``columns`` (missing cells empty)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_cell(row.get(c)) for c in columns])
  atomic_write_text(path, buffer.getvalue())


def default_cache_root() -> Path:
  """Where wmh-jax caches what it can rebuild (cohort, preprocessed arrays, XLA programs):
  ``$WMH_JAX_CACHE`` or ``~/.cache/wmh_jax``."""
  return Path(os.environ.get("WMH_JAX_CACHE", Path.home() / ".cache" / "wmh_jax"))
