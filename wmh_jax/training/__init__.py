"""Training: the data-parallel loop, losses, head refits, prefetch, preemption and metric logs."""
