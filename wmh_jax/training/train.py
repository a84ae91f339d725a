"""The training loop: init, sharded step, validation, checkpoints, logs.

One generic loop serves every model kind (weak, strong, joint, severity);
the kind only selects the model heads (``kinds.build_model``) and the loss
(``losses.loss_fn``). The train state is a plain dict
``{"step", "params", "opt_state"}`` (plus ``"batch_stats"`` for models with
running statistics) replicated over the data mesh.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from wmh_jax import configs
from wmh_jax.data import device_augment, pipeline, records as records_lib
from wmh_jax.errors import CheckpointError, TrainingError
from wmh_jax.evaluation import metrics as metrics_lib, ood
from wmh_jax.inference import forward
from wmh_jax.models import architectures, kinds
from wmh_jax.runtime import checkpoint, fileio, sharding
from wmh_jax.training import losses, refit, throughput
from wmh_jax.training.logs import MetricLogger
from wmh_jax.training.preemption import PreemptionWatch
from wmh_jax.training.prefetch import DevicePrefetch

State = dict[str, Any]


def make_optimizer(train_config: ml_collections.ConfigDict,
                   total_steps: int | None = None) -> optax.GradientTransformation:
  """Adadelta (Keras-2 values: lr 1.0, rho 0.95, eps 1e-7) or Adam, with warm-up and schedule.

  The rate rises linearly from 0 over ``warmup_steps``, then stays
  (``schedule="constant"``) or follows a cosine to 0 at ``total_steps``
  (``"cosine"``, which needs ``total_steps``). optax's ``adadelta`` default
  ``learning_rate=None`` climbs the loss, so the rate is always passed
  explicitly.
  """
  rate, warmup = train_config.learning_rate, train_config.warmup_steps
  if train_config.schedule == "cosine":
    if not total_steps:
      raise ValueError("train.schedule='cosine' needs the run's total step count")
    schedule = optax.warmup_cosine_decay_schedule(0.0, rate, warmup, max(total_steps, warmup + 1))
  elif train_config.schedule == "constant":
    schedule = optax.linear_schedule(0.0, rate, warmup) if warmup > 0 else rate
  else:
    raise ValueError(f"unknown train.schedule {train_config.schedule!r}; use constant or cosine")
  if train_config.optimizer == "adadelta":
    return optax.adadelta(learning_rate=schedule, rho=train_config.rho, eps=train_config.eps)
  if train_config.optimizer == "adam":
    return optax.adam(learning_rate=schedule)
  raise ValueError(f"unknown optimizer {train_config.optimizer!r}; use adadelta or adam")


def make_init(model, optimizer: optax.GradientTransformation, mesh: Mesh,
              image_shape: tuple[int, ...]):
  """``seed (int) -> state``, compiled with replicated ``out_shardings``.

  ``image_shape`` is (x, y, z).

  The state ``{"step", "params", "opt_state"}`` (plus ``batch_stats`` when
  the model keeps running statistics, ``model.pooled_norm="running"``, and
  ``readout`` for a volume head's closed-form refit) is
  created directly on every device of the mesh. The seed is traced, so one
  compilation serves a whole seed sweep.
  """
  def init(seed):
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape, 1)))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": optimizer.init(variables["params"])}
    for collection in ("batch_stats", "readout"):
      if collection in variables:
        state[collection] = variables[collection]
    return state

  return jax.jit(init, out_shardings=sharding.replicated_sharding(mesh))


def model_variables(state: State) -> dict:
  """The Flax variables (``params``; ``batch_stats`` and ``readout`` if any) of a train state."""
  return {k: state[k] for k in ("params", "batch_stats", "readout") if k in state}


def make_train_step(model, config: ml_collections.ConfigDict,
                    optimizer: optax.GradientTransformation, mesh: Mesh):
  """``(state, global batch) -> (state, metrics)`` as ``jit(shard_map)``, state donated.

  Each device computes its rows' part of the global-batch loss
  (``losses.loss_fn`` with ``axis_name``) and its gradient; ``lax.psum`` over
  ``"data"`` completes the gradient. Running statistics (``batch_stats``)
  average their batch moments over ``"data"`` inside the model. A batch
  with ``affine`` (``augment.on_device``) is first resampled on the device
  (`device_augment.augment_batch`).
  """
  kind = config.model.kind
  axis = sharding.DATA_AXIS
  voxel_ml = records_lib.voxel_ml(config)

  def per_device(state: State, batch: dict) -> tuple[State, dict]:
    if "affine" in batch:
      batch = device_augment.augment_batch(batch, voxel_ml)
    def loss_of(params):
      variables = {**model_variables(state), "params": params}
      outputs, updated = model.apply(variables, batch["image"], train=True,
                                     mutable=["batch_stats"])
      loss, step_metrics = losses.loss_fn(kind, outputs, batch, config, axis_name=axis)
      return loss, (step_metrics, updated)

    # Differentiate w.r.t. a per-device ("varying") copy of the replicated
    # params. The loss is a global-batch value (its sums are psum-ed over the
    # data axis), so each device's gradient is the derivative through its own
    # rows, and their psum is the gradient of the global loss, whatever the
    # device count.
    local_params = lax.pcast(state["params"], axis, to="varying")
    (_, (step_metrics, updated)), grads = jax.value_and_grad(loss_of, has_aux=True)(local_params)
    grads = lax.psum(grads, axis)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, **updated, "step": state["step"] + 1, "params": params,
                 "opt_state": opt_state}
    return new_state, step_metrics

  return sharding.data_parallel(per_device, mesh, in_specs=(P(), P(sharding.DATA_AXIS)),
                                out_specs=(P(), P()), donate_argnums=(0,))


def head_inits(config: ml_collections.ConfigDict, train_records: list[dict]) -> dict[str, float]:
  """Data-dependent head initialisations from the training labels.

  Returns:
    ``volume_bias_init``: the mean training target (scaled units), so the
    volume head starts at the mean; ``seg_bias_init``: with
    ``model.seg_prior_init``, the logit of the mean lesion fraction of the
    training scans with masks on the model grid (a prior-probability start,
    Lin et al. 2017), else 0 (p = 0.5, the paper).
  """
  volumes = np.array([r["wmh_volume_ml"] for r in train_records], np.float64)
  inits = {"volume_bias_init": float(volumes.mean() / config.data.volume_scale_ml),
           "seg_bias_init": 0.0}
  voxels = np.prod([int(s) for s in config.data.shape])
  masked = np.array([bool(r["has_mask"]) for r in train_records])
  if config.model.seg_prior_init and masked.any():
    inits["seg_bias_init"] = _logit(volumes[masked].mean() / records_lib.voxel_ml(config)
                                    / voxels)
  return inits


def _logit(fraction: float) -> float:
  """log(f / (1 - f)) of ``fraction`` clipped to [1e-6, 0.5]."""
  fraction = float(np.clip(fraction, 1e-6, 0.5))
  return float(np.log(fraction / (1.0 - fraction)))


def validation_metrics(kind: str, predictions: dict[str, np.ndarray],
                       records: list[dict]) -> dict[str, float]:
  """Per-epoch validation summary; ``val_score`` ranks checkpoints (higher is better).

  ``val_icc``: ICC(2,1) of predicted vs annotated volume (of the classes for a
  severity model); ``val_dice``: mean Dice of p > 0.5 (kinds with a segmentation
  head); ``val_score`` is the kind's `Kind.score`.
  """
  score = kinds.get(kind).score
  annotated = np.array([r["wmh_volume_ml"] for r in records], np.float64)
  result: dict[str, float] = {}
  if "severity" in predictions:
    truth = np.array([r["severity"] for r in records], np.float64)
    result["val_icc"] = metrics_lib.icc_2_1(truth, predictions["severity"].astype(np.float64))
    result["val_accuracy"] = float(np.mean(truth == predictions["severity"]))
    result["val_score"] = result[score]
    return result
  result["val_icc"] = metrics_lib.icc_2_1(annotated, predictions["volume_ml"])
  if "seg_prob" in predictions:
    masks = [pipeline.load_record(r)["mask"][..., 0] for r in records]
    dices = [metrics_lib.dice(m > 0.5, p > 0.5) for m, p in zip(masks, predictions["seg_prob"])]
    result["val_dice"] = float(np.mean(dices))
  result["val_score"] = result[score]
  return {k: float(v) for k, v in result.items()}


@dataclasses.dataclass
class Programs:
  """The jitted functions of one training setting, shared by every seed of a sweep.

  A new seed with the same config (all but ``seed`` and
  ``configs.RUNTIME_FIELDS``), head initialisations, step count and devices
  reuses them, so a sweep compiles each function once.
  """
  model: Any
  optimizer: optax.GradientTransformation
  init: Callable[[int], State]
  step: Callable
  forward: forward.ForwardFn
  compiled_step: Any = None
  cost: throughput.StepCost | None = None


class ProgramCache:
  """The :class:`Programs` of the last training setting, kept for the next run.

  A sweep (``main``'s seeds, the study's runs) hands one cache to each
  :func:`run`: a run with the same setting (:func:`configs.run_identity` but
  ``seed``; head initialisations, step count and devices) reuses the jitted
  functions, so each is compiled once. It holds one setting: a new one replaces it.
  """

  def __init__(self) -> None:
    self._key: str | None = None
    self._programs: Programs | None = None

  def get(self, config: ml_collections.ConfigDict, inits: dict[str, float], mesh: Mesh,
          total_steps: int) -> Programs:
    """The :class:`Programs` of this setting, built on first use and then reused."""
    setting = {k: v for k, v in configs.run_identity(config).items() if k != "seed"}
    key = json.dumps({"config": setting, "inits": inits, "total_steps": total_steps,
                      "devices": [int(d.id) for d in mesh.devices.flat]}, sort_keys=True)
    if key != self._key:
      self._programs, self._key = build_programs(config, inits, mesh, total_steps), key
    return self._programs


def build_programs(config: ml_collections.ConfigDict, inits: dict[str, float], mesh: Mesh,
                   total_steps: int) -> Programs:
  """The model of ``config`` and its jitted init, train step and forward pass."""
  model = kinds.build_model(config.model, **inits, voxel_target=records_lib.voxel_target(config),
                            axis_name=sharding.DATA_AXIS)
  optimizer = make_optimizer(config.train, total_steps)
  shape = tuple(int(s) for s in config.data.shape)
  return Programs(model, optimizer, make_init(model, optimizer, mesh, shape),
                  make_train_step(model, config, optimizer, mesh),
                  forward.make_forward(model, mesh))


def compile_step(programs: Programs, state: State, batch: dict,
                 config: ml_collections.ConfigDict, mesh: Mesh) -> float | None:
  """Compiles the train step for these shapes once; returns the seconds, None if reused.

  Also sets ``programs.cost``, the step's FLOPs and the devices' peak
  (`throughput.step_cost`), from which the logs give scans/s, voxels/s and MFU.
  """
  if programs.compiled_step is not None:
    return None
  start = time.perf_counter()
  programs.compiled_step = programs.step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  programs.cost = throughput.step_cost(
      programs.compiled_step, batch_size=config.train.batch_size,
      voxels_per_scan=int(np.prod([int(s) for s in config.data.shape])),
      num_devices=mesh.size, dtype=architectures.compute_dtype(config.model))
  return seconds


REFIT_MODES = ("none", "epoch", "end")


def refit_due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
  """Whether the volume head is refitted at this epoch end.

  ``train.refit_head`` (`REFIT_MODES`) applies to the kinds with a volume
  head (weak, joint); the others have nothing to refit.
  """
  mode = config.train.refit_head
  if mode not in REFIT_MODES:
    raise ValueError(f"unknown train.refit_head {mode!r}; expected one of {REFIT_MODES}")
  if not kinds.get(config.model.kind).volume_head:
    return False
  return mode == "epoch" or (mode == "end" and step == total_steps)


def validate(programs: Programs, variables: dict, val_records: list[dict],
             config: ml_collections.ConfigDict, mesh: Mesh
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """:func:`validation_metrics` of the model with ``variables`` on the validation records,
  and the predictions (`forward.physical_outputs`, one row per record)."""
  predictions = forward.physical_outputs(
      jax.tree.map(np.asarray, forward.run_batches(
          programs.forward, variables,
          pipeline.eval_batches(val_records, config.train.batch_size),
          mesh, keep_maps=kinds.get(config.model.kind).segmentation_head)),
      volume_scale_ml=config.data.volume_scale_ml, voxel_ml=records_lib.voxel_ml(config))
  return validation_metrics(config.model.kind, predictions, val_records), predictions


def write_val_predictions(workdir: Path, step: int, val_records: list[dict],
                          predictions: dict[str, np.ndarray],
                          ood_reference: ood.Reference | None = None) -> None:
  """``workdir/val_predictions/step_<step>.json``: each validation scan's annotated and
  predicted volume (mL) under the checkpoint of ``step``, the calibration set of its
  conformal intervals (`evaluation.conformal`, used by predict); with
  ``ood_reference`` (`evaluation.ood`, fitted on the training scans) also that,
  as ``ood``. Process 0, atomic."""
  if jax.process_index() != 0 or "volume_ml" not in predictions:
    return
  record = {"step": step, "scan_id": [str(r["scan_id"]) for r in val_records],
            "annotated_ml": [float(r["wmh_volume_ml"]) for r in val_records],
            "predicted_ml": [float(v) for v in predictions["volume_ml"]]}
  if ood_reference is not None:
    record["ood"] = ood_reference.to_json()
  path = checkpoint.val_predictions_path(workdir, step)
  path.parent.mkdir(exist_ok=True)
  fileio.atomic_write_text(path, json.dumps(record))


def refit_volume_head(programs: Programs, state: State, train_records: list[dict],
                      config: ml_collections.ConfigDict, mesh: Mesh
                      ) -> tuple[State, ood.Reference]:
  """``state`` with a closed-form fit of its readout in ``readout`` (`refit`): the volume
  head's Dense layer, or the counts readout (``model.readout="counts"``); and the training
  distribution of the head's pooled features (`evaluation.ood.Reference`).

  The features (`refit.features_of`) of the unaugmented training scans come from the
  current network (inference mode); the targets are their volumes in scaled
  units; the ridge penalty is chosen by leave-one-out error on them.
  Training never reads the fit, so it changes only what inference predicts.
  """
  outputs = forward.run_batches(programs.forward, model_variables(state),
                                  pipeline.eval_batches(train_records, config.train.batch_size),
                                  mesh, keep_maps=False)
  target = np.array([r["wmh_volume_ml"] for r in train_records]) / config.data.volume_scale_ml
  weights, bias = refit.RidgeReadout(refit.features_of(outputs), target).dense()
  readout = refit.fitted_readout(state["readout"], weights, bias)
  reference = ood.Reference.fit(np.asarray(outputs["pooled"]))
  return {**state, "readout": sharding.replicate(readout, mesh)}, reference


def _drain(logger: MetricLogger, ckpt: checkpoint.Checkpointer, workdir: Path) -> None:
  """Fetches the pending step metrics, writes them, and stops on a non-finite loss.

  Records up to the first non-finite loss are written; the error names that
  step and the last checkpoint, which was saved after a drain found every
  earlier loss finite.
  """
  records = logger.fetch_steps()
  bad = next((i for i, r in enumerate(records) if not np.isfinite(r["loss"])), None)
  logger.write_steps(records if bad is None else records[:bad])
  if bad is not None:
    ckpt.wait()
    raise TrainingError(workdir, f"non-finite loss {records[bad]['loss']} at step "
                        f"{records[bad]['step']}; stopped. Last good checkpoint: step "
                        f"{ckpt.latest_step()}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       programs: ProgramCache | None = None) -> dict[str, float]:
  """Trains one seed in ``workdir`` (resuming if it holds checkpoints).

  ``programs``: the sweep's :class:`ProgramCache` (None: compile for this run alone).

  Returns:
    The last validation metrics (``val_icc``, ``val_score``, ...), plus
    ``preempted`` = 1.0 when a preemption notice stopped the run early.
  """
  return run(config, workdir, programs)[1]


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        programs: ProgramCache | None = None) -> tuple[State, dict[str, float]]:
  """Like :func:`train_and_evaluate`, also returning the final train state.

  The host never waits for the device between log steps: step metrics stay
  on the device and are fetched, checked and written every
  ``train.log_every_steps`` steps, at epoch ends and before every save.
  ``train.prefetch_batches`` global batches are placed on the devices ahead.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh()
  splits = records_lib.split_records(
      records_lib.load_records(records_lib.training_manifest(config), config))
  train_records, val_records = splits["train"], splits["val"]
  if not train_records or not val_records:
    raise TrainingError(config.data.manifest or None,
                        f"need train and val scans, got {len(train_records)} and "
                        f"{len(val_records)}")

  batch_size = config.train.batch_size
  steps_per_epoch = len(train_records) // batch_size
  if steps_per_epoch == 0:
    raise TrainingError(None, f"{len(train_records)} training scans < batch size {batch_size}")
  total_steps = steps_per_epoch * config.train.num_epochs
  programs = (programs or ProgramCache()).get(config, head_inits(config, train_records), mesh,
                                              total_steps)
  data_iter = DevicePrefetch(
      pipeline.make_train_iterator(
          train_records, config, seed=config.seed, process_index=jax.process_index(),
          process_count=jax.process_count(),
          batch_size_per_process=sharding.local_batch_size(batch_size)),
      mesh, config.train.prefetch_batches)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.checkpoint_keep)
  try:
    restored = ckpt.restore_latest(jax.eval_shape(programs.init, config.seed), data_iter,
                                   config)
  except CheckpointError:
    ckpt.close()
    data_iter.close()
    raise
  state = restored if restored is not None else programs.init(config.seed)
  start = int(state["step"])
  logger = MetricLogger(workdir, start_step=start, total_steps=total_steps,
                        batch_size=batch_size)
  if start:
    logger.say(f"resumed {workdir} at step {start}")
  log_every = max(1, int(config.train.log_every_steps))
  last_val: dict[str, float] = {}
  try:
    with PreemptionWatch() as preemption:
      for step in range(start, total_steps):
        wait_start = time.perf_counter()
        batch = next(data_iter)
        logger.add_data_wait(time.perf_counter() - wait_start)
        if programs.compiled_step is None:
          logger.compile_s = compile_step(programs, state, batch, config, mesh)
          logger.restart_clock()
        logger.cost = programs.cost
        state, step_metrics = programs.compiled_step(state, batch)
        logger.add_step(step + 1, step_metrics)
        stop = preemption.reached(step + 1)
        epoch_end = (step + 1) % steps_per_epoch == 0
        save = epoch_end or stop or step + 1 == total_steps
        if save or (step + 1) % log_every == 0:
          _drain(logger, ckpt, workdir)
        if epoch_end:
          ood_reference = None
          if refit_due(config, step + 1, total_steps):
            state, ood_reference = refit_volume_head(programs, state, train_records, config,
                                                     mesh)
          last_val, predictions = validate(programs, model_variables(state), val_records,
                                           config, mesh)
          write_val_predictions(workdir, step + 1, val_records, predictions, ood_reference)
          if refit_due(config, step + 1, total_steps):
            trained = {**model_variables(state), "readout": refit.unfitted(state["readout"])}
            last_val.update({f"trained_head_{k}": v for k, v in
                             validate(programs, trained, val_records, config, mesh)[0].items()})
          logger.log_eval(step + 1, (step + 1) // steps_per_epoch, last_val)
        if save:
          ckpt.save(step + 1, state, data_iter, config,
                    metrics={"val_score": last_val["val_score"]} if epoch_end else None)
          logger.restart_clock()
        if stop:
          ckpt.wait()
          logger.say(f"SIGTERM: saved step {step + 1} in {workdir} and stopping")
          return state, {**last_val, "preempted": 1.0}
  finally:
    ckpt.wait()
    ckpt.close()
    data_iter.close()
    logger.close()
  if not last_val:  # resumed a finished run: report the stored best
    last_val = json.loads((workdir / "final_metrics.json").read_text())
  if jax.process_index() == 0:
    fileio.atomic_write_text(workdir / "final_metrics.json", json.dumps(last_val, indent=2))
  return state, last_val
