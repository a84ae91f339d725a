"""Inference: the batched forward pass, restored networks, and the predict command's outputs."""
