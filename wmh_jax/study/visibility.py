"""How visible are the lesions on a model grid? Oracle scores of intensity alone.

For each scan with a mask, on the preprocessed model grid (the network's input):

* ``lesion_auc``: the probability that a random lesion voxel is brighter than a
  random non-lesion brain voxel (Mann–Whitney AUC; ties count one half, so the
  percentile clip's ties at 1.0 lower it).
* ``oracle_topk_dice``: the Dice of the ``k`` brightest brain voxels, with ``k``
  the true lesion voxel count (an oracle that knows the count); voxels tied at
  the k-th intensity are shared in proportion.
* ``lesion_clipped``: the share of lesion voxels the upper percentile clip maps
  to exactly 1.0, and ``brain_clipped`` the share of non-lesion brain voxels.

No network can be judged without these: a grid where the oracle Dice is low
needs context (location, shape) to find the lesions. Command line::

  python -m wmh_jax.study.visibility --config=experiments/weak.py:cpu [--split=val]
      [--config.data.spacing_mm=2.8,2.8,4.2 --config.data.shape=56,64,32]
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np
import scipy.stats

from wmh_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Visibility:
  """Intensity-only lesion visibility of one scan (see the module docstring)."""
  lesion_auc: float
  oracle_topk_dice: float
  lesion_clipped: float
  brain_clipped: float


def scan_visibility(image: np.ndarray, brain: np.ndarray, mask: np.ndarray) -> Visibility | None:
  """Visibility of one preprocessed scan; None when it has no lesion voxel.

  Args:
    image: (x, y, z) normalised intensities in [0, 1].
    brain: (x, y, z) bool brain mask.
    mask: (x, y, z) lesion mask (> 0.5 is lesion).
  """
  lesion = (mask > 0.5) & brain
  k = int(lesion.sum())
  if k == 0:
    return None
  values, is_lesion = image[brain], lesion[brain]
  ranks = scipy.stats.rankdata(values)  # average ranks: ties count one half
  others = values.size - k
  auc = (ranks[is_lesion].sum() - k * (k + 1) / 2) / (k * others) if others else float("nan")
  # Top-k with ties at the k-th value shared in proportion (expected Dice).
  kth = np.sort(values)[::-1][k - 1]
  above, tied = values > kth, values == kth
  share = (k - above.sum()) / tied.sum()
  hits = (above & is_lesion).sum() + share * (tied & is_lesion).sum()
  return Visibility(lesion_auc=float(auc), oracle_topk_dice=float(hits / k),
                    lesion_clipped=float(np.mean(values[is_lesion] >= 1.0)),
                    brain_clipped=float(np.mean(values[~is_lesion] >= 1.0)))


def summarise(records: Sequence[dict]) -> dict[str, float]:
  """Medians over the records with a lesion; ``scans`` counts them."""
  found = []
  for record in records:
    if not record.get("has_mask"):
      continue
    loaded = pipeline.load_record(record)
    result = scan_visibility(loaded["image"][..., 0], loaded["brain"], loaded["mask"][..., 0])
    if result is not None:
      found.append(result)
  summary = {"scans": float(len(found))}
  for field in dataclasses.fields(Visibility):
    values = [getattr(v, field.name) for v in found]
    summary[f"median_{field.name}"] = float(np.median(values)) if values else float("nan")
  return summary


def main(argv: Sequence[str]) -> None:
  """Prints the visibility summary of one split of the configured training data."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from wmh_jax.data import records  # pylint: disable=import-outside-toplevel
  from wmh_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file("config", None, "experiment config file")
  split = flags.DEFINE_enum("split", "val", ["train", "val", "test"], "which split")
  cli.define_runtime_flags()
  flags.FLAGS(argv)
  cli.start_from_flags()
  cfg = config.value
  recs = records.split_records(records.load_records(records.training_manifest(cfg), cfg))
  summary = summarise(recs[split.value])
  grid = "x".join(str(int(s)) for s in cfg.data.shape)
  spacing = "x".join(f"{float(s):g}" for s in cfg.data.spacing_mm)
  print(f"grid {grid} at {spacing} mm, percentiles {tuple(cfg.data.percentiles)}, "
        f"{split.value} split: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
  main(sys.argv)
