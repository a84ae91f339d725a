"""How many weakly labelled scans does each closed-form readout of a trained weak body need?

Usage::

  python -m bench.readout_size --run=runs/weak1600/seed_0 --sizes=60,120,240,480,960 \
      [--out=readout_size.json]

Runs the frozen body of a trained run (best checkpoint) over its training,
validation and local test splits once, then fits each readout of
`wmh_jax.study.probe` (ridge, penalty by leave-one-out) and the intensity
floor (`wmh_jax.evaluation.baselines.IntensityVolumeRegression`) on nested,
seeded subsets of the training scans (the first n of one permutation, seed 0),
and prints their ICC(2,1) on the whole validation and test splits. The body
itself was trained on the whole training split: this measures what the
readout needs, not what the body needs. A benchmark script, never run by CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wmh_jax.data import records
from wmh_jax.evaluation import baselines, metrics
from wmh_jax.models import architectures
from wmh_jax.runtime import checkpoint
from wmh_jax.study import probe
from wmh_jax.training import refit

READOUTS = ("linear gap", "random relu brain sum", "random relu gap + brain sum")
SCORED = ("val", "test")


def readout_scores(run: Path, sizes: list[int], hidden: int = 256
                   ) -> dict[int, dict[str, dict[str, float]]]:
  """{training scans n: {readout or "floor": {split: ICC(2,1)}}}."""
  restored = checkpoint.restore_for_inference(run, "best")
  config = restored.config
  sets = records.split_records(records.load_records(records.training_manifest(config), config))
  body = architectures.UNetBody(**architectures.body_fields(config.model))
  params = restored.variables["params"]["body"]
  channels = jax.eval_shape(body.apply, {"params": params},
                            jnp.zeros((1, *config.data.shape, 1))).channels
  pool = probe.make_pooling(body, hidden, 0, channels, records.voxel_ml(config))
  splits = ("train", *SCORED)
  features = {s: probe.pooled_features(pool, params, sets[s]) for s in splits}
  intensity = {s: np.stack([baselines.record_features(r) for r in sets[s]]) for s in splits}
  volumes = {s: np.array([r["wmh_volume_ml"] for r in sets[s]], np.float64) for s in splits}
  order = np.random.default_rng(0).permutation(len(sets["train"]))
  result = {}
  for n in sizes:
    chosen = order[:n]
    row = {}
    for readout in READOUTS:
      fit = refit.RidgeReadout(features["train"][readout][chosen], volumes["train"][chosen])
      row[readout] = {s: metrics.icc_2_1(volumes[s], fit.predict(features[s][readout]))
                      for s in SCORED}
    floor = baselines.IntensityVolumeRegression().fit_features(intensity["train"][chosen],
                                                               volumes["train"][chosen])
    row["floor"] = {s: metrics.icc_2_1(volumes[s], floor.predict_features(intensity[s]))
                    for s in SCORED}
    result[n] = row
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--run", type=Path, required=True, help="a single-seed weak workdir")
  parser.add_argument("--sizes", default="60,120,240,480", help="training scans per fit")
  parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
  args = parser.parse_args()
  result = readout_scores(args.run, [int(s) for s in args.sizes.split(",")])
  names = (*READOUTS, "floor")
  print("| training scans | " + " | ".join(f"{n} val | {n} test" for n in names) + " |")
  print("|---" * (1 + 2 * len(names)) + "|")
  for n, row in result.items():
    print(f"| {n} | " + " | ".join(f"{row[k][s]:.3f}" for k in names for s in SCORED) + " |")
  if args.out:
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
