"""Is the body or the head the limit? Closed-form volume readouts of a trained run's frozen body.

A volume network is a body (the U-Net, which makes voxel features) and a head
(which turns them into one volume). When the network predicts volumes badly,
this probe tells which part to blame. It runs the frozen body of a trained run
over the training split, fits closed-form ridge readouts of the WMH volume on
pooled body features (no gradient steps), and scores them with ICC(2,1) next
to the network's own predictions:

* ``linear gap``: the global average of every feature map (the paper's pooling).
* ``linear brain sum``: every feature map summed over the brain, times the
  voxel volume (mL): volumes, where an average gives fractions;
  ``linear gap + brain sum`` takes both.
* ``random relu gap`` / ``random relu brain sum``: a fixed random 1x1x1 layer
  with ReLU (``--hidden`` channels, seeded) on the features first, then the
  same pooling: a voxel-wise nonlinearity before pooling, the readout of a
  counting head; ``random relu gap + brain sum`` takes both poolings.

A readout far above the network's own score means the head does not use what
the body learnt; readouts no better than the network mean the body is the
limit. With ``--untrained`` every readout is also fitted on the same
architecture with freshly initialised weights (seeded): what training taught
the body is the gap between the two. Each readout standardises its pooled
features with the training mean and SD and picks its ridge penalty by
leave-one-out error on the training scans alone, so validation and test scans
are never seen by a fit. ``model.readout="counts"`` makes the ``random relu
brain sum`` readout a network's own (`wmh_jax.models.architectures.CountReadout`).

Command line (any trained run of any kind, any dataset it was trained on)::

  python -m wmh_jax.study.probe --run=runs/weak/seed_0 [--which=best]
      [--datasets=local,wmhseg] [--hidden=256] [--untrained] [--out=probe.json]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from wmh_jax.data import pipeline, records
from wmh_jax.evaluation import metrics
from wmh_jax.inference import restore
from wmh_jax.models import architectures
from wmh_jax.runtime import checkpoint, sharding
from wmh_jax.training import refit

READOUTS = ("linear gap", "linear brain sum", "linear gap + brain sum", "random relu gap",
            "random relu brain sum", "random relu gap + brain sum")
BATCH = 4


def make_pooling(body: architectures.UNetBody, hidden: int, seed: int, channels: int,
                 voxel_ml: float) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
  """A jitted ``(body params, images (b, x, y, z, 1)) -> {readout: pooled (b, P)}``.

  The random layer is ``relu(F @ R + r)`` with R ~ N(0, 1/C) (C, hidden) and
  r ~ N(0, 1) (hidden,), fixed by ``seed`` (`architectures.random_relu_layer`, the layer of a
  network's counts readout). The brain is the image's nonzero
  voxels.
  """
  kernel, bias = architectures.random_relu_layer(channels, hidden, seed)

  @jax.jit
  def pool(params: dict, images: jax.Array) -> dict[str, jax.Array]:
    features = body.apply({"params": params}, images).materialize()
    brain = (images > 0).astype(jnp.float32)
    relu = jax.nn.relu(features @ kernel + bias)
    relu_gap, relu_sum = relu.mean(axis=(1, 2, 3)), (relu * brain).sum(axis=(1, 2, 3)) * voxel_ml
    gap = features.mean(axis=(1, 2, 3))
    brain_sum = (features * brain).sum(axis=(1, 2, 3)) * voxel_ml
    return {"linear gap": gap, "linear brain sum": brain_sum,
            "linear gap + brain sum": jnp.concatenate([gap, brain_sum], axis=-1),
            "random relu gap": relu_gap, "random relu brain sum": relu_sum,
            "random relu gap + brain sum": jnp.concatenate([relu_gap, relu_sum], axis=-1)}

  return pool


def pooled_features(pool: Callable, params: dict, recs: Sequence[dict]) -> dict[str, np.ndarray]:
  """Every readout's pooled features of ``recs``, readout -> (n, P) float64."""
  pieces: dict[str, list[np.ndarray]] = {}
  for batch in pipeline.eval_batches(recs, BATCH):
    valid = batch["valid"] > 0
    for name, value in pool(params, jnp.asarray(batch["image"])).items():
      pieces.setdefault(name, []).append(np.asarray(value, np.float64)[valid])
  return {name: np.concatenate(parts) for name, parts in pieces.items()}


UNTRAINED = "untrained body: "


def probe(run: str | Path, datasets: Sequence[str] | None = None, which: str = "best",
          hidden: int = 256, seed: int = 0, untrained: bool = False
          ) -> dict[str, dict[str, float]]:
  """ICC(2,1) per readout (and ``network``, its own volumes) per split.

  Args:
    run: a single-seed training workdir.
    datasets: test sets to score besides ``train`` and ``val`` (``local`` and
      the run's external sets; None: none).
    which: ``best`` or ``latest`` checkpoint.
    hidden: channels of the random ReLU layer.
    seed: the random layer's seed, and the untrained body's.
    untrained: also fit every readout on a freshly initialised body (rows
      prefixed :data:`UNTRAINED`).

  Returns:
    ``{row: {split: icc}}`` with rows ``network`` and :data:`READOUTS`, plus
    ``{readout} ridge`` rows giving each chosen penalty under ``train``.
  """
  restored = checkpoint.restore_for_inference(run, which)
  config = restored.config
  splits = records.split_records(records.load_records(records.training_manifest(config), config))
  sets = {"train": splits["train"], "val": splits["val"]}
  if datasets:
    sets.update(records.evaluation_sets(config, datasets))
  body = architectures.UNetBody(**architectures.body_fields(config.model))
  params = restored.variables["params"]["body"]
  channels = jax.eval_shape(body.apply, {"params": params},
                            jnp.zeros((1, *config.data.shape, 1))).channels
  pool = make_pooling(body, hidden, seed, channels, records.voxel_ml(config))
  bodies = {"": params}
  if untrained:
    bodies[UNTRAINED] = body.init(jax.random.key(seed),
                                  jnp.zeros((1, *config.data.shape, 1)))["params"]
  volumes = {name: np.array([r["wmh_volume_ml"] for r in recs], np.float64)
             for name, recs in sets.items()}
  mesh = sharding.make_mesh()
  network = restore.load_networks([run], mesh, which)[0]
  result: dict[str, dict[str, float]] = {"network": {}}
  for name, recs in sets.items():
    predicted = [out["volume_ml"] for _, out in restore.predict_records(network, recs, mesh)]
    result["network"][name] = metrics.icc_2_1(volumes[name], np.array(predicted, np.float64))
  for prefix, body_params in bodies.items():
    features = {name: pooled_features(pool, body_params, recs) for name, recs in sets.items()}
    for readout in READOUTS:
      fit = refit.RidgeReadout(features["train"][readout], volumes["train"])
      result[prefix + readout] = {name: metrics.icc_2_1(volumes[name], fit.predict(f[readout]))
                                  for name, f in features.items()}
      result[f"{prefix}{readout} ridge"] = {"train": fit.ridge}
  return result


def format_table(result: dict[str, dict[str, float]]) -> str:
  """A Markdown table: one row per readout, one ICC(2,1) column per split."""
  splits = list(result["network"])
  lines = ["| readout | " + " | ".join(splits) + " | ridge |",
           "|---" * (len(splits) + 2) + "|"]
  rows = ["network", *READOUTS]
  rows += [UNTRAINED + r for r in READOUTS if UNTRAINED + r in result]
  for row in rows:
    ridge = result.get(f"{row} ridge", {}).get("train")
    lines.append(f"| {row} | " + " | ".join(f"{result[row][s]:.3f}" for s in splits)
                 + f" | {'' if ridge is None else f'{ridge:g}'} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """Prints the probe table of one run; ``--out`` also writes it as JSON."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from wmh_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  run = flags.DEFINE_string("run", None, "a single-seed training workdir", required=True)
  which = flags.DEFINE_enum("which", "best", ["best", "latest"], "checkpoint")
  datasets = flags.DEFINE_list("datasets", [], "test sets besides train and val "
                               "(local and the run's external sets)")
  hidden = flags.DEFINE_integer("hidden", 256, "channels of the random ReLU layer")
  untrained = flags.DEFINE_bool("untrained", False, "also fit the readouts on a freshly "
                                "initialised body of the same architecture")
  out = flags.DEFINE_string("out", None, "JSON file for the table")
  cli.define_runtime_flags()
  flags.FLAGS(argv)
  cli.start_from_flags()
  result = probe(run.value, datasets.value or None, which.value, hidden.value,
                 untrained=untrained.value)
  print(f"ICC(2,1) of closed-form readouts of the frozen body of {run.value} "
        f"(fitted on train; ridge by leave-one-out):")
  print(format_table(result))
  if out.value:
    Path(out.value).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  main(sys.argv)
