"""Deciding, at each step, whether every process stops and checkpoints there.

A preemption notice (SIGTERM from SLURM, a TPU/GPU scheduler or a user) may
reach one process only, or several at different steps. The checkpoint save
and the train step are collective, so every process must stop at the same
step. With more than one process this uses JAX's preemption sync service
(``multihost_utils.reached_preemption_sync_point``, the mechanism behind
Orbax's ``CheckpointManager.reached_preemption``): the notice is propagated
to all processes, which agree on the first safe step. With one process a
SIGTERM handler sets a flag.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Context manager; ``reached(step)`` is True at the step where every process stops.

  Call :meth:`reached` once per step, with the same step numbers on every
  process (the sync protocol needs to see every step).
  """

  def __init__(self):
    self.collective = jax.process_count() > 1
    self._requested = False
    self._previous = None
    self._warned = False

  def __enter__(self) -> "PreemptionWatch":
    # With several processes JAX's own notifier owns SIGTERM; a Python
    # handler would replace it and the notice would never be shared.
    if not self.collective:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, no preemption stop
        self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether all processes stop after ``step`` (1-based count of finished steps)."""
    if not self.collective:
      return self._requested
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError as err:  # preemption service disabled (jax_enable_preemption_service)
      if not self._warned:
        logging.warning("no collective preemption handling: %s", err)
        self._warned = True
      return False

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
