"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from absl import flags


@pytest.fixture(autouse=True, scope="session")
def absl_flags_parsed() -> None:
  """Grain worker processes (``loader.worker_count > 0``) read absl flags.

  ``python -m wmh_jax.main`` parses them in ``app.run``; the library leaves
  absl's global state to its callers, so the test session marks them parsed.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def write_nifti(tmp_path: Path) -> Callable[..., Path]:
  """Factory writing a tiny NIfTI file under ``tmp_path``.

  ``write_nifti(name, data, affine=None)`` saves ``data`` (any shape and dtype)
  with ``affine`` (4x4, default identity = 1 mm RAS) to ``tmp_path / name``
  (``.nii`` or ``.nii.gz``, sub-folders created) and returns the path.
  """

  def write(name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path

  return write
