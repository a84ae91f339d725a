"""One process of a multi-process training test (run by test_train.py).

usage: distributed_worker.py PORT NUM_PROCESSES PROCESS_ID MANIFEST CACHE WORKDIR OUT_NPZ
"""

import sys
from pathlib import Path

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port, num_processes, process_id, manifest, cache, workdir, out):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes), process_id=int(process_id))
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(Path(__file__).parent))
  import tiny_data  # pylint: disable=import-outside-toplevel
  from wmh_jax import train  # pylint: disable=import-outside-toplevel
  config = tiny_data.tiny_config(Path(manifest), Path(cache))
  state, _ = train.run(config, Path(workdir))
  leaves = jax.tree.leaves(state["params"])
  np.savez(out, *[np.asarray(leaf.addressable_data(0)) for leaf in leaves])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
