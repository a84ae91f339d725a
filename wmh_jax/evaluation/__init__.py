"""Evaluation: metrics, statistics and attention-map thresholding."""
