"""Global batches placed on the devices ahead of the step that consumes them.

The host iterator (Grain) yields each process's rows; :class:`DevicePrefetch`
turns them into global, batch-sharded arrays ``size`` batches ahead, so the
host-to-device copy overlaps the running step. It is checkpointable like the
iterator it wraps: ``get_state()`` is the state *after the last batch handed
out*, not after the ones still queued, so a resumed run sees exactly the
batches the interrupted one had not consumed.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from wmh_jax.runtime import sharding


class DevicePrefetch:
  """Iterator of global batches (dicts of ``jax.Array``), ``size`` ahead on device.

  Args:
    host_iterator: yields this process's rows as dicts of numpy arrays and
      has ``get_state()``/``set_state()`` (a Grain ``DatasetIterator``).
    mesh: the data mesh the batches are sharded over.
    size: batches kept in flight beyond the one returned; 0 = none.
  """

  def __init__(self, host_iterator: Any, mesh: Mesh, size: int):
    if size < 0:
      raise ValueError(f"prefetch size must be >= 0, got {size}")
    self._host = host_iterator
    self._mesh = mesh
    self._size = size
    self._queue: collections.deque = collections.deque()
    self._consumed_state = copy.deepcopy(host_iterator.get_state())

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._queue) <= self._size:
      # Copied out of the loader's shared memory (Grain workers), which is
      # then freed at once; a device array aliasing it would keep it past exit.
      local = {key: np.array(value) for key, value in next(self._host).items()}
      self._queue.append((sharding.global_batch(local, self._mesh),
                          copy.deepcopy(self._host.get_state())))
    batch, self._consumed_state = self._queue.popleft()
    return batch

  def get_state(self) -> Any:
    """The wrapped iterator's state after the last batch returned by ``next``."""
    return self._consumed_state

  def set_state(self, state: Any) -> None:
    """Restores the wrapped iterator and drops the queued batches."""
    self._host.set_state(state)
    self._queue.clear()
    self._consumed_state = copy.deepcopy(state)

  def close(self) -> None:
    """Drops the queued batches and closes the wrapped iterator (Grain: stops its
    workers and frees their shared memory)."""
    self._queue.clear()
    getattr(self._host, "close", lambda: None)()

  def start_prefetch(self) -> None:
    """Starts the wrapped iterator's own prefetching, if it has any (Grain does)."""
    getattr(self._host, "start_prefetch", lambda: None)()
