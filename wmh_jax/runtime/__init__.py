"""Runtime services every stage uses: device mesh, checkpoints, files, CLI start-up, XLA cache."""
