"""Project exception types.

Every error that a user can cause with bad input is raised as a subclass of
:class:`WMHError`. Its message names the offending file (and, for manifests,
the row and column) and the reason, on one line, so that command-line tools can
print ``str(err)`` and carry on with the next input.
"""

from __future__ import annotations

import os


class WMHError(Exception):
  """Base class: a problem with a named file, described on one line."""

  def __init__(self, path: str | os.PathLike | None, reason: str):
    self.path = None if path is None else os.fspath(path)
    self.reason = reason
    where = self.path if self.path is not None else "<no file>"
    super().__init__(f"{where}: {reason}")


class InputError(WMHError):
  """An image or mask file that cannot be used (unreadable, wrong shape, NaN...)."""


class ManifestError(WMHError):
  """A manifest that is malformed; names the row (1-based data row) and column."""

  def __init__(self, path, reason: str, row: int | None = None,
               column: str | None = None):
    self.row = row
    self.column = column
    where = []
    if row is not None:
      where.append(f"row {row}")
    if column is not None:
      where.append(f"column '{column}'")
    prefix = (", ".join(where) + ": ") if where else ""
    super().__init__(path, prefix + reason)


class CheckpointError(WMHError):
  """A workdir or checkpoint that cannot be restored."""


class TrainingError(WMHError):
  """Training cannot continue (e.g. a non-finite loss)."""
