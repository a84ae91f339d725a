"""Time to quality: the validation ICC (weak labels) and Dice (strong labels) that a training
budget buys, wmh-jax's recipes beside stock MONAI networks on the same split.

Usage (needs the bench extra: ``pip install -e .[bench]``, PyTorch and MONAI)::

  python -m bench.time_to_quality [--budgets_min=1,3,6] [--tools=wmhjax-weak,...]
      [--workdir=/tmp/ttq] [--out=bench/results_time_to_quality.md]

Every tool trains on the training split of the ``:cpu`` grid and split (the
cached records wmh-jax itself trains on: 56x64x16 voxels of 2.8x2.8x8.4 mm,
240 training and 80 validation scans), batch 4, left-right flips, and is
scored on the validation split as ``wmh_jax.training.train.validation_metrics`` scores
it: ICC(2,1) of the volume in mL (weak tools), mean Dice of p > 0.5 (strong
tools). One tool at a time, so the machine is the same for all.

- ``wmhjax-weak`` / ``wmhjax-strong``: ``python -m wmh_jax.main`` with
  ``experiments/{weak,strong}.py:cpu`` (720 steps, cosine schedule), one
  device. Its clock at an epoch end is the compile time plus the logged step
  times (data wait included, validation excluded), from the run's
  ``timing.jsonl``; its score there is that epoch's ``val_score``.
- ``monai-regressor``: ``monai.networks.nets.Regressor`` (channels 8/16/32,
  strides 2, its default residual units, PReLU and instance norm), MSE on the
  volume / 10 mL, Adam 1e-3.
- ``monai-unet``: ``monai.networks.nets.UNet`` (channels 8/16/32, strides 2),
  ``monai.losses.DiceCELoss(sigmoid=True)`` (Dice per scan, the default), Adam 1e-3.

A MONAI tool trains until the largest budget and is evaluated whenever its
training clock (batch assembly + forward + backward + update, evaluation
excluded) passes an evaluation point (every ``--eval_every_s`` and each
budget). A budget's figure is the last evaluation inside it; "—" means
none yet. wmh-jax's recipe ends after 720 steps: for budgets beyond its
end it keeps its final score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from wmh_jax import configs
from wmh_jax.data import pipeline, records
from wmh_jax.training import train

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("wmhjax-weak", "wmhjax-strong", "monai-regressor", "monai-unet")
BATCH = 4
VOLUME_SCALE_ML = 10.0
MONAI_CHANNELS = (8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Point:
  """One evaluation of a tool.

  Attributes:
    seconds: training clock at the evaluation.
    step: training steps so far.
    score: validation score.
    mark: the evaluation point (s) whose passing triggered it (MONAI), None for an
      epoch end (wmh-jax); the clock overshoots a mark by less than one step.
  """
  seconds: float
  step: int
  score: float
  mark: float | None = None


@dataclasses.dataclass(frozen=True)
class Split:
  """The ``:cpu`` training and validation scans in memory.

  Attributes:
    train_images, val_images: (n, x, y, z) float32 in [0, 1].
    train_masks: (n, x, y, z) float32 (0/1).
    train_ml: (n,) annotated WMH volume in mL.
    val_records: the validation records, scored by ``train.validation_metrics``.
    voxel_ml: mL per voxel of the grid.
  """
  train_images: np.ndarray
  train_masks: np.ndarray
  train_ml: np.ndarray
  val_images: np.ndarray
  val_records: list[dict]
  voxel_ml: float


def load_split() -> Split:
  """The cached records of ``experiments/weak.py:cpu``'s training and validation split."""
  config = configs.load_config_file(str(REPO / "experiments" / "weak.py") + ":cpu")
  splits = records.split_records(records.load_records(records.training_manifest(config), config))

  def arrays(recs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, annotated mL) of ``recs``."""
    scans = [pipeline.load_record(r) for r in recs]
    return (np.stack([s["image"][..., 0] for s in scans]),
            np.stack([s["mask"][..., 0] for s in scans]),
            np.array([r["wmh_volume_ml"] for r in recs], np.float64))

  return Split(*arrays(splits["train"]), arrays(splits["val"])[0], splits["val"],
               records.voxel_ml(config))


# ---------------------------------------------------------------------------
# wmh-jax: a real run, its clock read from its own logs


def wmhjax_curve(workdir: Path) -> list[Point]:
  """(training seconds, step, val_score) at every epoch end of a finished run."""
  timing = [json.loads(line) for line in (workdir / "timing.jsonl").read_text().splitlines()]
  compile_s = next(r["compile_s"] for r in timing if r.get("summary"))
  intervals = [(r["step"], r["step_time_s"] * r["steps"]) for r in timing if "steps" in r]
  points = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "val_score" in record and "epoch" in record:
      seconds = compile_s + sum(s for step, s in intervals if step <= record["step"])
      points.append(Point(seconds, record["step"], record["val_score"]))
  return points


def run_wmhjax(kind: str, workdir: Path) -> list[Point]:
  """Trains ``experiments/<kind>.py:cpu`` in a subprocess (one device; a finished run in
  ``workdir`` is reused, as ``wmh_jax.main`` resumes it); its curve."""
  subprocess.run([sys.executable, "-m", "wmh_jax.main",
                  f"--config={REPO / 'experiments' / kind}.py:cpu", f"--workdir={workdir}"],
                 cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  return wmhjax_curve(workdir / "seed_0")


# ---------------------------------------------------------------------------
# MONAI: a plain PyTorch loop on the same arrays


def monai_tool(tool: str, split: Split, seed: int):
  """(model, loss of (output, batch), validation score of the model) of a MONAI tool."""
  import torch  # pylint: disable=import-outside-toplevel
  from monai.losses import DiceCELoss  # pylint: disable=import-outside-toplevel
  from monai.networks.nets import Regressor, UNet  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  if tool == "monai-regressor":
    model = Regressor(in_shape=(1, *split.train_images.shape[1:]), out_shape=(1,),
                      channels=MONAI_CHANNELS, strides=(2, 2, 2))

    def loss(output, images, masks, volumes):
      del images, masks
      return torch.mean((output[:, 0] - volumes / VOLUME_SCALE_ML) ** 2)

    def score(predict: Callable) -> float:
      volumes = np.concatenate([predict(x)[:, 0] * VOLUME_SCALE_ML
                                for x in _batches(split.val_images)])
      return train.validation_metrics("weak", {"volume_ml": volumes.astype(np.float64)},
                                      split.val_records)["val_score"]
  else:
    model = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=MONAI_CHANNELS,
                 strides=(2, 2))
    dice_ce = DiceCELoss(sigmoid=True)

    def loss(output, images, masks, volumes):
      del images, volumes
      return dice_ce(output, masks)

    def score(predict: Callable) -> float:
      probs = np.concatenate([1.0 / (1.0 + np.exp(-predict(x)[:, 0]))
                              for x in _batches(split.val_images)])
      volumes = (probs > 0.5).sum(axis=(1, 2, 3)) * split.voxel_ml
      return train.validation_metrics("strong", {"volume_ml": volumes, "seg_prob": probs},
                                      split.val_records)["val_score"]
  return model, loss, score


def _batches(images: np.ndarray) -> list[np.ndarray]:
  return [images[i:i + BATCH] for i in range(0, len(images), BATCH)]


def run_monai(tool: str, split: Split, budgets_s: Sequence[float], eval_every_s: float,
              seed: int = 0) -> list[Point]:
  """Trains a MONAI tool until the largest budget; evaluations on the training clock."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model, loss_fn, score = monai_tool(tool, split, seed)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

  def predict(images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
      return model(torch.from_numpy(images[:, None])).numpy()

  def evaluate(seconds: float, step: int, mark: float) -> Point:
    model.eval()
    point = Point(seconds, step, score(predict), mark)
    model.train()
    print(f"{tool}: {seconds:.0f} s, step {step}: {point.score:.3f}", flush=True)
    return point

  rng = np.random.default_rng(seed)
  marks = sorted({*np.arange(eval_every_s, max(budgets_s), eval_every_s), *budgets_s})
  clock, step, points, order = 0.0, 0, [], np.array([], np.int64)
  model.train()
  while marks:
    start = time.perf_counter()
    if len(order) < BATCH:
      order = rng.permutation(len(split.train_images))
    index, order = order[:BATCH], order[BATCH:]
    flip = rng.random(BATCH) < 0.5
    images = np.stack([x[::-1] if f else x for x, f in zip(split.train_images[index], flip)])
    masks = np.stack([x[::-1] if f else x for x, f in zip(split.train_masks[index], flip)])
    batch = [torch.from_numpy(np.ascontiguousarray(a)[:, None]) for a in (images, masks)]
    volumes = torch.from_numpy(split.train_ml[index].astype(np.float32))
    optimizer.zero_grad()
    loss = loss_fn(model(batch[0]), batch[0], batch[1], volumes)
    loss.backward()
    optimizer.step()
    clock += time.perf_counter() - start
    step += 1
    while marks and clock >= marks[0]:
      points.append(evaluate(clock, step, float(marks.pop(0))))
  return points


# ---------------------------------------------------------------------------
# The table


def at_budget(points: Sequence[Point], budget_s: float) -> Point | None:
  """The last evaluation inside ``budget_s`` (the final one for a run that ended sooner); an
  evaluation triggered by a mark counts at its mark."""
  inside = [p for p in points if (p.seconds if p.mark is None else p.mark) <= budget_s + 1e-9]
  return inside[-1] if inside else None


def table(curves: dict[str, list[Point]], budgets_s: Sequence[float]) -> str:
  """Markdown: one row per tool, one score (and its step) per budget."""
  lines = ["| tool | metric | " + " | ".join(f"{b / 60:g} min" for b in budgets_s)
           + " | end of run |", "|---" * (len(budgets_s) + 3) + "|"]
  for tool, points in curves.items():
    metric = "val ICC" if tool in ("wmhjax-weak", "monai-regressor") else "val Dice"
    cells = []
    for budget in budgets_s:
      point = at_budget(points, budget)
      cells.append("—" if point is None else f"{point.score:.3f} (step {point.step})")
    last = points[-1]
    lines.append(f"| {tool} | {metric} | " + " | ".join(cells)
                 + f" | {last.score:.3f} at {last.seconds / 60:.1f} min, step {last.step} |")
  return "\n".join(lines)


def environment(load_before: float, load_after: float) -> list[str]:
  """Preamble lines: command, date, versions, cores and load."""
  import datetime  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  versions = [f"JAX {jax.__version__}"]
  try:
    import monai  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    versions += [f"PyTorch {torch.__version__}", f"MONAI {monai.__version__}"]
  except ImportError:
    versions.append("PyTorch/MONAI not installed")
  return [f"- command: `python -m bench.time_to_quality {' '.join(sys.argv[1:])}`",
          f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
          f"- {', '.join(versions)}; {len(os.sched_getaffinity(0))} cores; load average "
          f"{load_before:.1f} before, {load_after:.1f} after"]


def define_flags() -> None:
  flags.DEFINE_list("budgets_min", ["1", "3", "6"], "training budgets (minutes)")
  flags.DEFINE_list("tools", list(TOOLS), f"tools to run, of {TOOLS}")
  flags.DEFINE_float("eval_every_s", 30.0, "MONAI evaluation interval (training seconds)")
  flags.DEFINE_string("workdir", None, "folder for the wmh-jax runs (default: a temp folder)")
  flags.DEFINE_string("out", "bench/results_time_to_quality.md", "Markdown report path")


def main(argv: Sequence[str]) -> int:
  del argv
  import tempfile  # pylint: disable=import-outside-toplevel
  flag = flags.FLAGS
  budgets_s = [60.0 * float(b) for b in flag.budgets_min]
  unknown = set(flag.tools) - set(TOOLS)
  if unknown:
    raise app.UsageError(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
  workdir = Path(flag.workdir or tempfile.mkdtemp(prefix="ttq_"))
  load = os.getloadavg()
  split = None
  curves: dict[str, list[Point]] = {}
  for tool in flag.tools:
    if tool.startswith("wmhjax-"):
      curves[tool] = run_wmhjax(tool.removeprefix("wmhjax-"), workdir / tool)
    else:
      split = split or load_split()
      curves[tool] = run_monai(tool, split, budgets_s, flag.eval_every_s)
  text = "\n".join([
      "# Time to quality", "", *environment(load[0], os.getloadavg()[0]), "",
      table(curves, budgets_s), "",
      "Figures: the last validation score inside each training budget (see the module "
      "docstring for the clocks).", ""])
  Path(flag.out).write_text(text)
  (Path(flag.out).with_suffix(".json")).write_text(json.dumps(
      {tool: [dataclasses.asdict(p) for p in points] for tool, points in curves.items()},
      indent=1))
  print(text)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
