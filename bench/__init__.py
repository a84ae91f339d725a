"""Benchmarks of wmh-jax against a PyTorch reference: ``python -m bench.run``.

Modules:
  * :mod:`bench.run`: the command line; times everything in one run and
    writes a Markdown report.
  * :mod:`bench.training`: JAX and PyTorch training steps of the same nets.
  * :mod:`bench.torch_reference`: GP-Unet / U-Net written in PyTorch (needs
    the optional ``bench`` extra).
  * :mod:`bench.host`: host augmentation and inference (predict) timings.
  * :mod:`bench.report`: Markdown tables, medians and the ``timing.jsonl``
    data-wait reader.
"""
