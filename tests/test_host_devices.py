"""wmh_jax.runtime.host_devices: ``--cpu_devices`` (the 4-device CLI run is in test_train.py)."""

from __future__ import annotations

import jax
import pytest

from wmh_jax.runtime import host_devices


def test_no_count_leaves_jax_alone():
  devices = jax.devices()  # JAX has started: changing its device count now would raise
  host_devices.use_cpu_devices(None)
  assert jax.devices() == devices


def test_bad_counts_are_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match="must be >= 1"):
    host_devices.use_cpu_devices(0)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  with pytest.raises(ValueError, match="contradicts XLA_FLAGS"):
    host_devices.use_cpu_devices(2)
