"""The study: trains the runs of a study config, restores them, and writes tables and figures."""
