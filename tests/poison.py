"""Test-only hooks on the training iterator: a NaN batch, a SIGTERM at a known batch.

The production loop knows nothing of it: tests replace
``wmh_jax.data.pipeline.make_train_iterator`` (``monkeypatch`` in-process,
:mod:`poisoned_main` for the CLI).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

import numpy as np


class PoisonedBatches:
  """The wrapped iterator's batches, with NaN images in the ``step``-th one (1-based).

  Checkpointable like the wrapped iterator (``get_state``/``set_state`` pass through).
  """

  def __init__(self, inner: Any, step: int):
    self.inner, self.step, self.count = inner, step, 0

  def __iter__(self) -> "PoisonedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.inner)
    self.count += 1
    if self.count == self.step:
      batch = {**batch, "image": batch["image"] * np.float32("nan")}
    return batch

  def get_state(self) -> Any:
    return self.inner.get_state()

  def set_state(self, state: Any) -> None:
    self.inner.set_state(state)


class SigtermAt:
  """The wrapped iterator's batches; taking the ``batch``-th (1-based) sends this process SIGTERM.

  A preemption notice at a known point of the loop, so tests need not race the
  training process. Checkpointable like the wrapped iterator.
  """

  def __init__(self, inner: Any, batch: int):
    self.inner, self.batch, self.count = inner, batch, 0

  def __iter__(self) -> "SigtermAt":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self.count += 1
    if self.count == self.batch:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.inner)

  def get_state(self) -> Any:
    return self.inner.get_state()

  def set_state(self, state: Any) -> None:
    self.inner.set_state(state)


def sigterm_at(make_train_iterator: Callable, batch: int) -> Callable:
  """``make_train_iterator`` whose iterator sends SIGTERM when taking its ``batch``-th batch."""
  def make(*args, **kwargs):
    return SigtermAt(make_train_iterator(*args, **kwargs), batch)
  return make


def poisoning(make_train_iterator: Callable, step: int) -> Callable:
  """``make_train_iterator`` whose iterator poisons its ``step``-th batch."""
  def make(*args, **kwargs):
    return PoisonedBatches(make_train_iterator(*args, **kwargs), step)
  return make
