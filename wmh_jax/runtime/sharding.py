"""Data parallelism with pmap semantics, written as ``jit(shard_map(...))``.

One mesh axis, ``"data"``, spans every device of every process. Parameters and
optimiser state are replicated (``P()``); batches are split along their leading
axis (``P("data")``). Per-device code completes global-batch values with
``lax.psum``/``lax.pmean`` over ``"data"``, exactly what ``pmap`` did, which is how
JAX itself now builds ``pmap``. The training step ``psum``s gradients, not
``pmean``: its loss is already the global-batch loss (``wmh_jax.training.losses``), so
the per-device gradients are parts of one sum.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh over all global devices (all processes), axis ``"data"``."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Fully replicated over the mesh."""
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
  """Rows this process contributes to a global batch.

  Raises:
    ValueError: if the global batch does not split evenly over devices.
  """
  if global_batch_size % jax.device_count():
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"{jax.device_count()} devices; choose a multiple")
  return global_batch_size // jax.process_count()


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles a global, batch-sharded array from each process's rows.

  Args:
    local: this process's rows, every array with leading axis ``b_local``.
    mesh: the data mesh.

  Returns:
    Arrays with leading axis ``b_local * process_count``, sharded over ``"data"``.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree replicated on every device of the mesh."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def data_parallel(fn: Callable, mesh: Mesh, *, in_specs: Any, out_specs: Any,
                  donate_argnums: tuple[int, ...] = ()) -> Callable:
  """``jax.jit(jax.shard_map(fn))``: ``fn`` runs once per device (pmap model)."""
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  return jax.jit(mapped, donate_argnums=donate_argnums)


def to_host(x: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-process sharded) array to every host as numpy."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
