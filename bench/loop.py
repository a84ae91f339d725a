"""The training loop's host-device overlap, before and after (issue 12), in one process.

Usage::

  WMH_JAX_CACHE=$HOME/wmh_cache python -m bench.loop [--config=experiments/weak.py:cpu]
      [--repeats=2]

Runs the real loop (``wmh_jax.training.train.run``: one epoch, 60 steps at ``:cpu``,
then validation) alternately in two modes, with one compiled step:

* ``sync``: ``train.log_every_steps=1``, ``train.prefetch_batches=0``, what
  the loop did before: it fetched the metrics, and so waited for the device,
  after every step, and placed each batch on the device only when the step
  needed it.
* ``async``: the defaults, metrics fetched every 10 steps, 2 batches prefetched.

Reports the median step time and the data-wait share (``timing.jsonl``,
first interval excluded) per mode, and their ratio. Not a test; never run by CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from absl import flags

from bench import report
from wmh_jax import configs
from wmh_jax.training import train

MODES = {"sync": {"train.log_every_steps": 1, "train.prefetch_batches": 0},
         "async": {"train.log_every_steps": 10, "train.prefetch_batches": 2}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--config", default="experiments/weak.py:cpu")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
  results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
  programs = train.ProgramCache()  # the modes differ only in runtime fields: one compile
  with tempfile.TemporaryDirectory(prefix="wmh_bench_loop_") as root:
    for repeat in range(args.repeats):
      for mode, fields in MODES.items():
        config = configs.load_config_file(args.config)
        config.train.num_epochs = 1
        for field, value in fields.items():
          section, name = field.split(".")
          config[section][name] = value
        run_dir = Path(root) / f"{mode}_{repeat}"
        start = time.perf_counter()
        train.run(config, run_dir, programs)
        wait = report.read_data_wait(run_dir / "timing.jsonl")
        results[mode].append((wait.median_step_s, wait.wait_share))
        print(f"{mode} repeat {repeat}: {time.perf_counter() - start:.0f} s, "
              f"median {results[mode][-1][0]:.3f} s/step, data wait "
              f"{100 * results[mode][-1][1]:.1f}%", flush=True)
  load = os.getloadavg()[0]
  print(f"\n{args.config}, {args.repeats} alternating repeats per mode, load {load:.1f}")
  print("| mode | median s/step | data wait share |\n|---|---|---|")
  medians = {}
  for mode, rows in results.items():
    medians[mode] = statistics.median(r[0] for r in rows)
    print(f"| {mode} | {medians[mode]:.3f} | "
          f"{100 * statistics.median(r[1] for r in rows):.1f}% |")
  print(f"async / sync step time: {medians['async'] / medians['sync']:.3f}")


if __name__ == "__main__":
  main()
