"""Shared pytest fixtures."""

from __future__ import annotations

import os
import re
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


@pytest.fixture(scope="session")
def programs():
  """One `train.ProgramCache` for the session: runs of one setting compile once, as in a sweep."""
  from wmh_jax.training import train  # pylint: disable=import-outside-toplevel
  return train.ProgramCache()


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


# A device count forced with XLA_FLAGS (portability runs, BUILD_NOTES "Portable
# tests") that does not divide a test's fixed global batch (the tiny dataset's
# batch of 4, in this process or in a CLI subprocess that inherits XLA_FLAGS)
# makes the training code refuse to start. That is the documented behaviour,
# not a failure of the test: report it as a skip with the reason.
# wmh_jax.runtime.sharding's message, and JAX's when a test shards a batch itself.
_NOT_DIVISIBLE = (re.compile(r"global batch size (\d+) is not divisible by the (\d+) devices"),
                  re.compile(r"partitioned (\d+) times, but does not evenly divide the "
                             r"dimension size (\d+)"))


def _forced_device_count() -> int | None:
  match = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                    os.environ.get("XLA_FLAGS", ""))
  return int(match.group(1)) if match else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  forced = _forced_device_count()
  if not report.failed or forced is None or call.excinfo is None:
    return
  message = str(call.excinfo.value)
  for pattern, (batch_group, devices_group) in zip(_NOT_DIVISIBLE, ((1, 2), (2, 1))):
    match = pattern.search(message)
    if match:
      batch, devices = int(match.group(batch_group)), int(match.group(devices_group))
      if batch % devices and devices % forced == 0:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1],
                           f"Skipped: global batch size {batch} does not split over {devices} "
                           f"devices (XLA_FLAGS forces {forced} per process)")
      return
