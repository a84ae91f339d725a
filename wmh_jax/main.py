"""Entry point: ``python -m wmh_jax.main --config=experiments/weak.py --workdir=runs/weak``.

Flags pick the config file (``:cpu`` for the 2-core variant), override fields
(``--config.seed=2``) and run a seed sweep (``--seeds=0,1,2`` → ``workdir/seed_<n>``).
On a cluster, ``jax.distributed.initialize()`` is called first: automatically
under SLURM / Cloud TPU / an explicit coordinator, or when ``--distributed``.
A :class:`~wmh_jax.errors.WMHError` (bad manifest, incompatible checkpoint,
non-finite loss) ends the run with one ``error: <file>: <reason>`` line on
stderr and exit status 1. SIGTERM saves a checkpoint of the seed in flight and
ends the sweep (exit status 0); the same command resumes it.

Output: a progress bar, one line per validation and a summary per seed.
Library INFO logs (Orbax, JAX) appear only with ``--verbosity=0`` (or 1 for
debug detail); the default shows warnings and errors. Compiled programs are
kept in the persistent XLA cache (``--compilation_cache``; :mod:`wmh_jax.runtime.cli`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from wmh_jax.errors import WMHError
from wmh_jax.runtime import cli

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; seeds go to <workdir>/seed_<n>.")
flags.DEFINE_list("seeds", None, "Seeds to sweep (default: the config's seed).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected "
                  "under SLURM with >1 task, on Cloud TPU pods, or with --coordinator_address).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual multi-host).")
flags.DEFINE_integer("num_processes", None, "Total processes (manual multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (manual multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_runtime_flags(cpu_devices=True)

FLAGS = flags.FLAGS

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
  if any(os.environ.get(name) for name in _CLUSTER_ENV):
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed() -> None:
  """Starts multi-process JAX when asked for or when a cluster is detected."""
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.coordinator_address:
    # Cross-process collectives on CPU devices (harmless where GPUs/TPUs do the work).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.distributed or _cluster_detected():
    jax.distributed.initialize()
  logging.info("process %d of %d, %d global devices", jax.process_index(),
               jax.process_count(), jax.device_count())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.start_from_flags()
  initialize_distributed()
  from wmh_jax.training import logs, train  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else [config.seed]
  results = {}
  programs = train.ProgramCache()  # the seeds share one compiled step
  for seed in seeds:
    with config.unlocked():
      config.seed = seed
    try:
      results[seed] = train.train_and_evaluate(config, Path(FLAGS.workdir) / f"seed_{seed}",
                                               programs)
    except WMHError as err:  # bad input, checkpoint or loss: one line, exit status 1
      sys.exit(f"error: {err}")
    if results[seed].get("preempted"):  # the job is being stopped: leave later seeds alone
      print(f"seed {seed}: stopped by SIGTERM after saving a checkpoint; later seeds not "
            "started; run the same command again to resume", flush=True)
      return
    print(f"seed {seed}: final validation " + ", ".join(
        f"{k}={v:.4f}" for k, v in results[seed].items()), flush=True)
    evals = logs.validation_records(Path(FLAGS.workdir) / f"seed_{seed}" / "metrics.jsonl")
    if evals:
      best = max(evals, key=lambda e: e["val_score"])
      print(f"seed {seed}: best checkpoint (what analysis and predict restore): epoch "
            f"{best['epoch']}, step {best['step']}, val_score={best['val_score']:.4f}", flush=True)


if __name__ == "__main__":
  app.run(main)
