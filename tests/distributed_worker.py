"""One process of a multi-process training test (run by test_train.py).

usage: distributed_worker.py PORT NUM_PROCESSES PROCESS_ID MANIFEST CACHE WORKDIR OUT_NPZ
       [EPOCHS [SIGTERM_AT [PACE_S]]]

Trains the tiny config for EPOCHS epochs (default 1) and saves the final
params to OUT_NPZ and ``{"preempted", "step"}`` to OUT_NPZ + ".json".
SIGTERM_AT > 0: this process sends itself SIGTERM when it takes that training
batch (1-based), the preemption notice of one process only. PACE_S: seconds
slept per batch, so that the notice can spread before the run ends.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


class _Hooked:
  """The training iterator with a pace and a self-sent SIGTERM (test hooks only)."""

  def __init__(self, inner, sigterm_at: int, pace_s: float):
    self.inner, self.sigterm_at, self.pace_s, self.count = inner, sigterm_at, pace_s, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(self.pace_s)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def main(port, num_processes, process_id, manifest, cache, workdir, out, epochs="1",
         sigterm_at="0", pace_s="0"):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes), process_id=int(process_id))
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(Path(__file__).parent))
  import tiny_data  # pylint: disable=import-outside-toplevel
  from wmh_jax.training import train  # pylint: disable=import-outside-toplevel
  from wmh_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if int(sigterm_at) > 0 or float(pace_s) > 0:
    make = pipeline.make_train_iterator
    pipeline.make_train_iterator = lambda *a, **k: _Hooked(make(*a, **k), int(sigterm_at),
                                                           float(pace_s))
  config = tiny_data.tiny_config(Path(manifest), Path(cache))
  config.train.num_epochs = int(epochs)
  state, metrics = train.run(config, Path(workdir))
  leaves = jax.tree.leaves(state["params"])
  np.savez(out, *[np.asarray(leaf.addressable_data(0)) for leaf in leaves])
  Path(out + ".json").write_text(json.dumps(
      {"preempted": bool(metrics.get("preempted")),
       "step": int(np.asarray(state["step"].addressable_data(0)))}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
