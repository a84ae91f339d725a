"""Orbax checkpoints: train state, Grain iterator state and the run's config.

Layout: ``workdir/checkpoints/<step>/{state,data_iter,config}``. ``state`` is a
plain pytree ``{"step", "params", "opt_state"}`` (plus ``batch_stats``
for models with running statistics); ``config`` is the
run's ``ConfigDict`` as JSON, so a checkpoint is self-describing: analysis and
prediction rebuild the model from the workdir alone. Nothing is pickled.

Retention: the latest ``keep`` checkpoints plus the best one by the validation
score (``metrics["val_score"]``, higher is better).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from wmh_jax import configs
from wmh_jax.errors import CheckpointError

T = TypeVar("T")

SCORE = "val_score"


def val_predictions_path(workdir: str | Path, step: int) -> Path:
  """Where a run keeps its validation predictions under the checkpoint of ``step``."""
  return Path(workdir) / "val_predictions" / f"step_{step}.json"


def _score(metrics: dict[str, float]) -> float:
  return metrics[SCORE]


def _brief(error: Exception) -> str:
  """``Type: first line of the message``, at most 200 characters (Orbax errors are long)."""
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0]}"[:200]


class _JsonIteratorState:
  """Grain's Orbax handler for an iterator that is not a Grain ``DatasetIterator``.

  The handler stores a ``DatasetIterator``'s dict state as JSON, and asks any
  other iterator for bytes; this gives it the same JSON, so the file does not
  depend on the wrapper (e.g. :class:`wmh_jax.training.prefetch.DevicePrefetch`).
  """

  def __init__(self, iterator: Any):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state(), indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    getattr(self.iterator, "start_prefetch", lambda: None)()


def _grain_item(iterator: Any) -> Any:
  return iterator if isinstance(iterator, grain.DatasetIterator) else _JsonIteratorState(iterator)


class Checkpointer:
  """Saves and restores one training run under ``workdir/checkpoints``."""

  def __init__(self, workdir: str | Path, keep: int = 3):
    self.directory = Path(workdir).absolute() / "checkpoints"
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_score, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_score, best_mode="max", preservation_policy=preservation,
        enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: dict, data_iter: Any,
           config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of ``state``, the iterator and the config."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(_grain_item(data_iter)),
        config=ocp.args.JsonSave(json.loads(config.to_json())))
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore_latest(self, abstract_state: dict, data_iter: Any,
                     config: ml_collections.ConfigDict) -> dict | None:
    """Restores the newest readable checkpoint into ``data_iter``; None if none.

    A step that fails to restore (truncated or missing files) is skipped with
    a warning naming it, and the previous step is tried.

    Corrupt steps newer than the restored one are deleted, so that the resumed
    run can save those steps again.

    Raises:
      CheckpointError: when the stored model config differs from ``config``, or
        when no stored step can be restored.
    """
    def restore(step: int) -> dict:
      _check_compatible(self._restore_config(step), config, self.directory)
      return self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(_grain_item(data_iter))))["state"]

    steps = sorted(self.manager.all_steps(), reverse=True)
    found = first_restorable(steps, restore)
    if found is None:
      if steps:
        raise CheckpointError(self.directory, f"no restorable checkpoint (steps {steps} "
                              "failed, see the warnings); use a fresh --workdir or the "
                              "original config")
      return None
    step, state, bad = found
    for newer in bad:  # the resumed run saves these steps again
      logging.warning("deleting corrupt checkpoint step %d; resuming from step %d", newer, step)
      self.manager.delete(newer)
    return state

  def _restore_config(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def first_restorable(steps: Sequence[int], restore: Callable[[int], T],
                     where: str | Path | None = None) -> tuple[int, T, list[int]] | None:
  """The first step, in the given order, that ``restore`` reads: (step, value, failed steps).

  A step whose restore raises (truncated or missing files) is logged with the
  reason (and ``where``, the run) and the next one is tried; a :class:`CheckpointError` (a readable run
  that must not be used, e.g. another model) is raised at once. None when every
  step fails (or there is none).
  """
  failed: list[int] = []
  for step in steps:
    try:
      return step, restore(step), failed
    except CheckpointError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      logging.warning("checkpoint step %d%s is corrupt (%s); trying an earlier one", step,
                      "" if where is None else f" in {where}", _brief(err))
      failed.append(step)
  return None


def _check_compatible(stored: dict, config: ml_collections.ConfigDict,
                      directory: Path) -> None:
  """The stored run must be the run resuming (`configs.run_identity`); it may train longer."""
  changed = configs.changed_fields(stored, config, ignore=configs.EXTENSIBLE_FIELDS)
  if changed:
    field = changed[0]
    old = json.loads(configs.run_identity(stored).get(field, "null"))
    new = configs.flatten(json.loads(config.to_json()))[field]
    raise CheckpointError(
        directory, f"checkpoint was trained with {field}={old!r} but the "
        f"config asks for {new!r}; use a fresh --workdir or the original config")


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A trained model as analysis and prediction need it.

  ``variables`` are the Flax variables: ``params``, and ``batch_stats`` for
  models with running statistics.
  """
  workdir: Path
  step: int
  config: ml_collections.ConfigDict
  variables: dict


def restore_for_inference(workdir: str | Path, which: str = "best") -> RestoredRun:
  """Restores params and config from a run's workdir alone.

  Args:
    workdir: a single-seed run directory (holding ``checkpoints/``).
    which: ``"best"`` (highest validation score) or ``"latest"``.

  Raises:
    CheckpointError: when the workdir holds no readable checkpoint.
  """
  directory = Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise CheckpointError(workdir, "no checkpoints/ folder: is this a training workdir?")
  options = ocp.CheckpointManagerOptions(best_fn=_score, best_mode="max", read_only=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
    preferred = manager.best_step() if which == "best" else manager.latest_step()
    steps = [preferred] + sorted((s for s in manager.all_steps() if s != preferred),
                                 reverse=True)

    def restore(step: int) -> RestoredRun:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_host_target(manager, step)),
          config=ocp.args.JsonRestore()))
      config = restored["config"]
      missing = configs.missing_recipe_fields(config)
      if missing:
        raise CheckpointError(workdir, f"trained by an older wmh-jax (its config has no "
                              f"{missing[0]}; its segmentation head and pooling differ): "
                              "retrain it")
      state = restored["state"]
      variables = {k: jax.tree.map(jax.device_get, state[k])
                   for k in ("params", "batch_stats", "readout") if k in state}
      return RestoredRun(Path(workdir), step, ml_collections.ConfigDict(config), variables)

    found = first_restorable([s for s in steps if s is not None], restore, workdir)
  if found is None:
    raise CheckpointError(workdir, "no readable checkpoint")
  return found[1]


def stored_config(workdir: str | Path) -> dict:
  """The config (plain JSON) saved with a run's newest readable checkpoint; no arrays are read.

  Raises:
    CheckpointError: when the workdir holds no checkpoint with a readable config.
  """
  directory = Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    raise CheckpointError(workdir, "no checkpoints/ folder: is this a training workdir?")
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(directory, options=options,
                             item_handlers={"config": ocp.JsonCheckpointHandler()}) as manager:
    found = first_restorable(
        sorted(manager.all_steps(), reverse=True),
        lambda step: manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"], workdir)
  if found is None:
    raise CheckpointError(workdir, "no checkpoint with a readable config")
  return found[1]


def _host_target(manager: ocp.CheckpointManager, step: int) -> Any:
  """Abstract state on this process's first device, whatever topology saved it."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      manager.item_metadata(step)["state"])


def run_dirs(path: str | Path) -> list[Path]:
  """Single-seed run dirs under ``path``: ``path`` itself or its ``seed_*`` children."""
  path = Path(path)
  if (path / "checkpoints").is_dir():
    return [path]
  seeds = sorted(p for p in path.glob("seed_*") if (p / "checkpoints").is_dir())
  if not seeds:
    raise CheckpointError(path, "no checkpoints here nor in seed_*/ subfolders")
  return seeds
