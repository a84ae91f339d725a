"""Host input pipeline on Grain: cached records → augmented, sharded batches.

Training stream (one process or many)::

  source (reads .npz) → seed(seed) → shuffle (reshuffled every epoch) → repeat
    → augment (rng from seed, record index, epoch) → batch(b) → [p::P]
    → to_iter_dataset → mp_prefetch (with worker processes, :func:`worker_count`)

The stream of records is the same for every process; it is cut into
sub-batches of ``b = B / P`` rows and process ``p`` takes sub-batches ``p, p+P,
...``. Global batch ``k`` (``B`` rows) is therefore sub-batches ``kP .. kP+P-1``:
the process-local batches concatenated in process order are exactly the batch
a single process with batch ``B`` yields, row for row. Augmentation draws
depend only on ``(seed, record index, epoch)``, so batches do not depend on
the number of processes or of loader workers either.

Batches are dicts of numpy arrays:
  image: float32 ``(b, x, y, z, 1)``.
  mask: float32 ``(b, x, y, z, 1)`` in {0, 1}; zeros for records without mask.
  volume_ml: float32 ``(b,)``: the transformed mask's volume for records with
    a mask, else the record's ``wmh_volume_ml``.
  severity: int32 ``(b,)``, -1 when unknown.
  has_mask: float32 ``(b,)`` in {0, 1}.
  affine: float32 ``(b, 4, 4)``, only with ``augment.on_device``: each row's
    drawn pull matrix; image and mask are then untransformed (and
    ``volume_ml`` is the record's), and the train step resamples them
    (`wmh_jax.data.device_augment`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from wmh_jax.data import augment, domain, nifti


def load_record(record: dict) -> dict[str, np.ndarray]:
  """Reads one cached record (no augmentation).

  Returns:
    ``image`` float32 ``(x, y, z, 1)``, ``mask`` float32 ``(x, y, z, 1)`` (zeros
    without a mask), ``brain`` bool ``(x, y, z)``, ``spacing_mm`` float64
    ``(3,)``, and the scalars ``volume_ml`` (the record's ``wmh_volume_ml``,
    float32), ``severity`` (int32) and ``has_mask`` (float32).
  """
  with np.load(record["path"]) as data:
    image = data["image"].astype(np.float32)
    mask = data["mask"].astype(np.float32) if "mask" in data else np.zeros_like(image)
    brain = data["brain"].astype(bool)
    spacing_mm = data["spacing_mm"].astype(np.float64)
  return {"image": image[..., None], "mask": mask[..., None], "brain": brain,
          "spacing_mm": spacing_mm,
          "volume_ml": np.float32(record["wmh_volume_ml"]),
          "severity": np.int32(record["severity"]),
          "has_mask": np.float32(record["has_mask"])}


class CachedScans:
  """Grain ``RandomAccessDataSource`` over cached records (picklable).

  ``source[i]`` is :func:`load_record` of record ``i`` plus ``record_index``.
  """

  def __init__(self, records: Sequence[dict]):
    self._records = [dict(r) for r in records]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {**load_record(self._records[index]), "record_index": int(index)}

  def __repr__(self) -> str:
    return f"CachedScans({len(self._records)} records)"


def record_rng(seed: int, record_index: int, epoch: int) -> np.random.Generator:
  """The augmentation generator of one record in one epoch."""
  return np.random.default_rng([seed, record_index, epoch])


class AugmentRecord(grain.transforms.MapWithIndex):
  """Augments one loaded record into a training example (picklable).

  The element's index in the repeated stream gives the epoch
  (``index // num_records``); the random draw comes from
  :func:`record_rng`. Records without a mask keep their brain in the field of
  view (their volume label must stay valid); records with a mask get their
  label recomputed from the transformed mask. With ``augment.on_device`` the
  drawn matrix is returned as ``affine`` instead of being applied (the train
  step applies it, `wmh_jax.data.device_augment`). With ``augment.domain.enabled``
  the image first goes through :func:`wmh_jax.data.domain.randomise` (its
  own generator, :func:`wmh_jax.data.domain.domain_rng`; image only).
  """

  def __init__(self, seed: int, num_records: int,
               config_augment: ml_collections.ConfigDict):
    self._seed = seed
    self._num_records = num_records
    self._augment = ml_collections.ConfigDict(config_augment.to_dict())

  def map_with_index(self, index: int, element: dict) -> dict[str, np.ndarray]:
    image, mask = element["image"][..., 0], element["mask"][..., 0]
    has_mask = bool(element["has_mask"])
    volume_ml = element["volume_ml"]
    epoch = index // self._num_records
    config_domain = self._augment.get("domain")
    if config_domain is not None and config_domain.enabled:  # image only, own stream
      image = domain.randomise(domain.domain_rng(self._seed, element["record_index"], epoch),
                               image, element["brain"], element["spacing_mm"], config_domain)
    if self._augment.enabled:
      rng = record_rng(self._seed, element["record_index"], epoch)
      matrix = augment.sample_affine(rng, image.shape, element["spacing_mm"], self._augment,
                                     keep_in_fov=None if has_mask else element["brain"])
      if self._augment.get("on_device", False):
        return {"image": image[..., None], "mask": mask[..., None], "volume_ml": volume_ml,
                "severity": element["severity"], "has_mask": element["has_mask"],
                "affine": matrix.astype(np.float32)}
      image, moved = augment.apply_affine(image, mask if has_mask else None, matrix)
      mask = moved if has_mask else mask
    if has_mask:
      volume_ml = np.float32(nifti.volume_ml(mask, element["spacing_mm"]))
    return {"image": image[..., None], "mask": mask[..., None], "volume_ml": volume_ml,
            "severity": element["severity"], "has_mask": element["has_mask"]}


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def worker_count(config_loader: ml_collections.ConfigDict) -> int:
  """Grain worker processes for ``loader.worker_count``.

  -1 (the default) gives the cores left after the main process, at least 1:
  one worker per free core. The host must feed every local accelerator, and a
  worker augments ~80 image+mask pairs/s at the paper grid (``bench.loader``).
  0 augments in the main process; a positive value is used as given.

  Raises:
    ValueError: a value below -1.
  """
  count = int(config_loader.worker_count)
  if count < -1:
    raise ValueError(f"loader.worker_count={count}; use -1 (auto), 0 (in-process) or > 0")
  return max(available_cores() - 1, 1) if count == -1 else count


def make_train_iterator(records: Sequence[dict], config: ml_collections.ConfigDict,
                        seed: int, process_index: int = 0, process_count: int = 1, *,
                        batch_size_per_process: int) -> grain.DatasetIterator:
  """The endless, shuffled, augmented, process-sharded training iterator.

  Args:
    records: cached records (:func:`wmh_jax.data.cache.preprocessed_records`),
      the same list on every process.
    config: uses ``config.augment`` and ``config.loader`` (``worker_count``,
      :func:`worker_count`: 0 = in-process, else Grain worker processes, which
      need the caller's absl flags parsed; ``worker_buffer_size``: batches
      buffered per worker).
    seed: run seed in ``[0, 2**32)``; fixes the shuffles and augmentations.
    process_index: this JAX process.
    process_count: number of JAX processes.
    batch_size_per_process: rows per local batch (global batch / process_count).
  Returns:
    A Grain ``DatasetIterator`` of batches (see the module docstring); it is
    checkpointable with ``get_state()``/``set_state()`` and with Orbax through
    ``grain.checkpoint.CheckpointSave``/``CheckpointRestore``.
  Raises:
    ValueError: no records, or worker processes asked for with absl flags unparsed.
  """
  if not records:
    raise ValueError("make_train_iterator needs at least one record")
  dataset = (grain.MapDataset.source(CachedScans(records)).seed(seed).shuffle().repeat()
             .map_with_index(AugmentRecord(seed, len(records), config.augment))
             .batch(batch_size_per_process)[process_index::process_count])
  buffer = max(1, int(config.loader.worker_buffer_size))
  iter_dataset = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer))
  workers = worker_count(config.loader)
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers
      raise ValueError("loader.worker_count > 0 needs parsed absl flags: run under "
                       "absl.app.run (python -m wmh_jax.main does), call "
                       "absl.flags.FLAGS.mark_as_parsed() first, or set loader.worker_count=0")
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=buffer))
  return iter(iter_dataset)


def eval_batches(records: Sequence[dict], batch_size: int) -> Iterator[dict]:
  """Deterministic, unaugmented batches of ``records`` in order.

  The last batch is padded to ``batch_size`` by repeating the last record.

  Yields:
    Dicts with ``image``, ``mask`` (float32 ``(b, x, y, z, 1)``), ``volume_ml``
    (float32 ``(b,)``, the records' ``wmh_volume_ml``), ``severity`` (int32
    ``(b,)``), ``has_mask`` and ``valid`` (float32 ``(b,)``, 0 for padding) and
    ``scan_id`` (list of ``b`` str).
  """
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    valid = np.zeros(batch_size, np.float32)
    valid[:len(chunk)] = 1.0
    chunk += [chunk[-1]] * (batch_size - len(chunk))
    loaded = [load_record(r) for r in chunk]
    batch = {key: np.stack([item[key] for item in loaded])
             for key in ("image", "mask", "volume_ml", "severity", "has_mask")}
    yield {**batch, "valid": valid, "scan_id": [str(r["scan_id"]) for r in chunk]}
