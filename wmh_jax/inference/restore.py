"""Trained networks: restore them from workdirs, name them, run them on preprocessed scans.

The one path from a training workdir to per-scan outputs in physical units,
shared by :mod:`wmh_jax.study.analysis` (cached test records) and
:mod:`wmh_jax.inference.predict` (new scans). Weights and config come from the checkpoint
alone (:func:`wmh_jax.runtime.checkpoint.restore_for_inference`).

Naming: a workdir given by the user is a *group* (an ensemble over seeds),
named after the folder (``runs/weak`` → ``weak``). Its networks are its
``seed_*`` runs, named ``<group>_<seed dir>`` (``weak_seed_0``). A single run
given directly is its own group of one, with one name for both: its folder's
name, or ``<parent>_<folder>`` for a ``seed_*`` folder (``weak_seed_0``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from wmh_jax.data import nifti, pipeline, records
from wmh_jax.errors import CheckpointError, WMHError
from wmh_jax.evaluation import ood
from wmh_jax.inference import forward
from wmh_jax.models import kinds
from wmh_jax.runtime import checkpoint, sharding


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """One restored run (one seed), ready for inference.

  Attributes:
    name: the network's own name, e.g. ``weak_seed_0`` (predict's column prefix).
    group: its ensemble, the workdir it was given as (``weak``); analysis's ``run``.
    kind: weak | strong | joint | severity.
    spec: its preprocessing grid.
    volume_scale_ml: regression target scale (mL per target unit).
    voxel_ml: volume of one model-grid voxel (mL).
    source: ``<workdir>@<step>``: identifies the weights.
    variables: Flax variables replicated over the mesh.
    forward: compiled ``variables, images (B,x,y,z,1) -> outputs``.
    seed: the training seed (``config.seed``).
    workdir: the run's workdir (absolute).
    step: the restored checkpoint step.
    config: the run's config, from the checkpoint.
    val_predictions: the validation scans' ``scan_id``, ``annotated_ml`` and
      ``predicted_ml`` under this checkpoint, stored by training
      (`train.write_val_predictions`); None for runs trained before it was.
  """
  name: str
  group: str
  kind: str
  spec: nifti.PreprocessSpec
  volume_scale_ml: float
  voxel_ml: float
  source: str
  variables: Any
  forward: forward.ForwardFn
  seed: int | None = None
  workdir: Path | None = None
  step: int | None = None
  config: ml_collections.ConfigDict | None = None
  val_predictions: dict | None = None

  @property
  def ood_reference(self) -> ood.Reference | None:
    """The training distribution of its volume-head features, as stored by training
    (`evaluation.ood`); None without one."""
    stored = (self.val_predictions or {}).get("ood")
    return ood.Reference.from_json(stored) if stored else None


def names(path: str | Path, runs: Sequence[Path]) -> tuple[str, list[str]]:
  """(group name, network names) of one workdir and its run dirs (see the module doc)."""
  path = Path(path).absolute()
  if [Path(run).absolute() for run in runs] == [path]:
    name = f"{path.parent.name}_{path.name}" if path.name.startswith("seed_") else path.name
    return name, [name]
  return path.name, [f"{path.name}_{Path(run).name}" for run in runs]


def load_networks(paths: Sequence[str | Path], mesh: Mesh, which: str = "best",
                  seeds: Collection[int] | None = None) -> list[Network]:
  """Restores every run of every workdir, in order (seed sweeps expand to their seeds).

  Runs with one architecture share one compiled forward.

  Args:
    paths: seed-sweep workdirs (``seed_*/`` children) or single-run workdirs.
    which: ``"best"`` (highest validation score) or ``"latest"`` checkpoint.
    seeds: keep only runs whose ``config.seed`` is in ``seeds``; None: all.

  Raises:
    CheckpointError: no readable checkpoint, two groups with one name, or a
      workdir with none of ``seeds``.
  """
  forwards: dict[str, forward.ForwardFn] = {}
  loaded: list[Network] = []
  for path in paths:
    runs = [run.absolute() for run in checkpoint.run_dirs(path)]
    group, run_names = names(path, runs)
    if any(n.group == group for n in loaded):
      raise CheckpointError(path, f"a second model group named {group!r}; "
                            "rename one of the workdirs")
    count = len(loaded)
    for name, run in zip(run_names, runs):
      restored = checkpoint.restore_for_inference(run, which)
      config = restored.config
      if seeds is not None and int(config.seed) not in seeds:
        continue
      arch = config.model.to_json(sort_keys=True)
      if arch not in forwards:
        forwards[arch] = forward.make_forward(
            kinds.build_model(config.model, voxel_target=records.voxel_target(config)), mesh)
      loaded.append(Network(
          name=name, group=group, kind=config.model.kind, spec=records.preprocess_spec(config),
          volume_scale_ml=float(config.data.volume_scale_ml), voxel_ml=records.voxel_ml(config),
          source=f"{run}@{restored.step}",
          variables=sharding.replicate(restored.variables, mesh), forward=forwards[arch],
          seed=int(config.seed), workdir=run, step=restored.step, config=config,
          val_predictions=stored_val_predictions(run, restored.step)))
    if len(loaded) == count:
      raise CheckpointError(path, f"no run with seed in {sorted(seeds or ())}")
  return loaded


def stored_val_predictions(workdir: Path, step: int) -> dict | None:
  """The validation predictions training stored for ``step`` (`train.write_val_predictions`),
  or None when there are none (a run from before they were stored)."""
  path = checkpoint.val_predictions_path(workdir, step)
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:  # torn by a kill mid-write: no calibration rather than a crash
    return None


def group_networks(networks: Sequence[Network], *, same_grid: bool = False
                   ) -> dict[str, list[Network]]:
  """Networks by group, in load order.

  Args:
    same_grid: require the networks of a group to share model kind and grid
      (an ensemble averages their maps).

  Raises:
    CheckpointError: with ``same_grid``, a group whose networks differ.
  """
  groups: dict[str, list[Network]] = {}
  for network in networks:
    first = groups.setdefault(network.group, [network])[0]
    if network is first:
      continue
    if same_grid and (network.kind, network.spec) != (first.kind, first.spec):
      raise CheckpointError(network.workdir or network.source,
                            f"differs from {first.name} in model kind or grid ({network.kind} "
                            f"{network.spec} vs {first.kind} {first.spec})")
    groups[network.group].append(network)
  return groups


# ---------------------------------------------------------------------------
# Running


def _average_tta(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rows (original, x-flipped) -> one row: maps flipped back, then all outputs averaged."""
  out = {}
  for key, value in raw.items():
    if value.ndim == 4:  # (2, x, y, z) voxel maps
      value = np.stack([value[0], value[1, ::-1]])
    out[key] = value.mean(axis=0, keepdims=True)
  return out


def _scans(outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """Batched physical outputs → one dict per scan: volumes as float, classes as int,
  maps ``(x, y, z)``."""
  count = len(next(iter(outputs.values())))
  return [{k: v[i] if v.ndim > 1 else v[i].item() for k, v in outputs.items()}
          for i in range(count)]


def run_batch(network: Network, batch: dict[str, np.ndarray], mesh: Mesh, *,
              tta: bool = False, label: str = "") -> list[dict[str, Any]]:
  """One padded batch through one network; per valid row, its outputs in physical units.

  Args:
    batch: ``image`` float32 (B,x,y,z,1) and ``valid`` (B,), B a multiple of
      the device count.
    tta: the batch holds one scan and its model-grid x-flipped copy
      (:func:`predict_image`); their raw outputs are averaged into one scan.
    label: names the scans in the error message.

  Returns:
    :func:`wmh_jax.inference.forward.physical_outputs` of each valid row: volumes
    (float, mL), ``severity`` (int), maps ``(x, y, z)``.

  Raises:
    WMHError: a non-finite model output.
  """
  raw = forward.run_batches(network.forward, network.variables, [batch], mesh, keep_maps=True)
  if not all(np.isfinite(v).all() for v in raw.values()):
    raise WMHError(network.source, "non-finite model output" + (f" on {label}" if label else ""))
  if tta:
    raw = _average_tta(raw)
  return _scans(forward.physical_outputs(raw, volume_scale_ml=network.volume_scale_ml,
                                           voxel_ml=network.voxel_ml))


def padded_batch(images: np.ndarray, devices: int) -> dict[str, np.ndarray]:
  """``images`` (n,x,y,z,1) zero-padded to a multiple of ``devices``, + ``valid`` (B,)."""
  n = len(images)
  total = -(-n // devices) * devices
  padded = np.zeros((total,) + images.shape[1:], np.float32)
  padded[:n] = images
  return {"image": padded, "valid": (np.arange(total) < n).astype(np.float32)}


def predict_image(network: Network, image: np.ndarray, mesh: Mesh, tta: bool = False
                  ) -> dict[str, Any]:
  """One preprocessed image through one network.

  Args:
    image: float32 ``network.spec.shape`` (x, y, z) preprocessed image.
    tta: also run the model-grid x-flipped image (RAS axis 0); the flipped
      maps are flipped back and the raw outputs of both passes averaged
      before thresholds and classes are derived.

  Returns:
    The scan's outputs, see :func:`run_batch`.

  Raises:
    WMHError: a non-finite model output.
  """
  images = image[None, ..., None]
  if tta:
    images = np.concatenate([images, images[:, ::-1]])
  return run_batch(network, padded_batch(images, mesh.size), mesh, tta=tta)[0]


def predict_records(network: Network, recs: Sequence[dict], mesh: Mesh
                    ) -> Iterator[tuple[dict, dict[str, Any]]]:
  """Runs the network over cached records; yields ``(record, outputs)`` per scan, in order.

  Batches hold the run's training batch size rounded up to a multiple of the
  device count (:func:`wmh_jax.data.pipeline.eval_batches`).

  Raises:
    WMHError: a non-finite model output.
  """
  size = -(-int(network.config.train.batch_size) // mesh.size) * mesh.size
  for start, batch in zip(range(0, len(recs), size), pipeline.eval_batches(recs, size)):
    outputs = run_batch(network, batch, mesh, label=str(batch["scan_id"]))
    yield from zip(recs[start:start + size], outputs)
