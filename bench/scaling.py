"""Validation score against training steps, with the floor drawn: is "more steps" the answer?

Usage::

  python -m bench.scaling --runs="weak paper head=runs/scaling/weak_gap_720,..." \
      --out=docs/scaling

Each ``--runs`` entry is ``label=workdir`` (a seed folder or a workdir holding
``seed_0``), one training budget per workdir, its cosine schedule stretched to
that budget. The figure plots each run's per-epoch validation ICC(2,1)
(volume networks) or mean Dice (strong) from its ``metrics.jsonl`` against the
step on a log axis, one colour per run (a weak run with a readout fit gives
two curves: the readout, solid, and the trained Dense layer, the paper's
head, dashed), with the floors of the same validation split as
horizontal lines: the intensity-volume regression for ICC, the intensity
threshold for Dice (`wmh_jax.evaluation.baselines`, fitted on the training
split of the first run's grid). Writes ``scaling.png`` and ``scaling.md`` (one
row per run: its final and best validation scores, steps, median step time).
This is a benchmark script, never run by CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from wmh_jax.runtime import checkpoint
from wmh_jax.training import logs  # pylint: disable=wrong-import-position
from wmh_jax.data import records  # pylint: disable=wrong-import-position
from wmh_jax.evaluation import baselines, metrics  # pylint: disable=wrong-import-position


def seed_dir(workdir: Path) -> Path:
  """``workdir`` itself when it holds ``metrics.jsonl``, else its ``seed_0``."""
  return workdir if (workdir / "metrics.jsonl").exists() else workdir / "seed_0"


def median_step_s(run: Path) -> float:
  """Median step time (s) over the run's logged intervals."""
  lines = [json.loads(line) for line in (run / "timing.jsonl").read_text().splitlines()]
  return statistics.median(r["step_time_s"] for r in lines if "step_time_s" in r)


def floors(run: Path) -> dict[str, float]:
  """Validation ICC(2,1) of the intensity-volume regression and Dice of the threshold baseline."""
  config = checkpoint.restore_for_inference(run, "latest").config
  split = records.split_records(records.load_records(records.training_manifest(config), config))
  regression = baselines.IntensityVolumeRegression().fit(split["train"])
  volumes = np.array([r["wmh_volume_ml"] for r in split["val"]])
  threshold = baselines.ThresholdSegmentation().fit(split["train"])
  dices = [p.dice for p in threshold.predict(split["val"])]
  return {"val_icc": metrics.icc_2_1(volumes, regression.predict(split["val"])),
          "val_dice": float(np.nanmean(dices))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", required=True, help="comma-separated label=workdir")
  parser.add_argument("--out", required=True, help="folder for scaling.png and scaling.md")
  args = parser.parse_args()
  runs = {label: seed_dir(Path(path)) for label, path in
          (item.split("=", 1) for item in args.runs.split(",") if item.strip())}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  floor = floors(next(iter(runs.values())))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colours: dict[str, str] = {}
  rows = []
  for label, run in runs.items():
    points = logs.validation_records(run / "metrics.jsonl")
    series = [("val_dice", label)] if "val_dice" in points[-1] else [("val_icc", label)]
    if "trained_head_val_icc" in points[-1]:  # a weak/joint run with a readout fit
      series = [("val_icc", f"{label}: readout fit"),
                ("trained_head_val_icc", f"{label}: trained Dense (paper head)")]
    steps = [p["step"] for p in points]
    colour = colours.setdefault(label, f"C{len(colours)}")
    for key, name in series:
      axis = axes[1] if key == "val_dice" else axes[0]
      axis.plot(steps, [p[key] for p in points], marker="o", ms=3, color=colour,
                ls="--" if key.startswith("trained_head") else "-", label=name)
      rows.append({"run": f"{label}, {name.split(': ')[-1]}" if ": " in name else label,
                   "steps": steps[-1], "score": key.replace("trained_head_", ""),
                   "final": points[-1][key], "best": max(p[key] for p in points),
                   "step_s": median_step_s(run), "workdir": str(run)})
  for axis, key, name in ((axes[0], "val_icc", "validation ICC(2,1)"),
                          (axes[1], "val_dice", "validation Dice (strong)")):
    axis.axhline(floor[key], color="k", ls="--", lw=1,
                 label=("floor: intensity-volume regression" if key == "val_icc"
                        else "floor: intensity threshold") + f" ({floor[key]:.3f})")
    axis.set_xscale("log")
    axis.set_xlabel("training step (cosine schedule stretched to each budget)")
    axis.set_ylabel(name)
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "scaling.png", dpi=110)
  lines = ["| run | steps | score | final | best | median s/step |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['run']} | {r['steps']} | {r['score']} | {r['final']:.3f} | {r['best']:.3f} "
            f"| {r['step_s']:.3f} |" for r in rows]
  lines += ["", f"Floors on the same validation split: intensity-volume regression ICC(2,1) "
            f"{floor['val_icc']:.3f}; intensity threshold Dice {floor['val_dice']:.3f}."]
  (out / "scaling.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
