"""Data layer: NIfTI I/O and preprocessing, manifests, the synthetic cohort, Grain pipeline."""
