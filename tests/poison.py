"""Test-only NaN injection: wraps the training iterator so that one batch is poisoned.

The production loop knows nothing of it: tests replace
``wmh_jax.data.pipeline.make_train_iterator`` (``monkeypatch`` in-process,
:mod:`poisoned_main` for the CLI).
"""

from __future__ import annotations

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


def poisoning(make_train_iterator: Callable, step: int) -> Callable:
  """``make_train_iterator`` whose iterator poisons its ``step``-th batch."""
  def make(*args, **kwargs):
    return PoisonedBatches(make_train_iterator(*args, **kwargs), step)
  return make
