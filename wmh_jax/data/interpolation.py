"""Linear interpolation along one axis: the neighbours and weight of each sample position.

One rule for every resampler of the data layer: the synthetic cohort's
separable resampling (`synthetic.render`), the augmentation's separable affine
(`augment`, on the host and in the train step) and the scanner-domain
re-acquisition (`domain`). Positions are fractional indices, clamped to
``[0, n-1]``; sample ``i0`` weighs ``1 - frac`` and ``i1`` weighs ``frac``.
"""

from __future__ import annotations

import numpy as np


def linear_taps(positions, n: int, xp=np):
  """Neighbour indices and fraction of linear interpolation along an axis of ``n`` samples.

  Args:
    positions: float array of fractional indices (any shape).
    n: samples along the axis (>= 1).
    xp: the array module: numpy on the host, ``jax.numpy`` in the train step.

  Returns:
    ``(i0, i1, frac)``, each ``positions.shape``: ``i0 = min(floor(p), n - 2)``
    and ``i1 = min(i0 + 1, n - 1)`` (int: ``intp`` under numpy, ``int32``
    under jax), and ``frac = p - i0`` in the dtype of ``p - i0``, where ``p``
    is the position clamped to ``[0, n-1]``.
  """
  index_dtype = np.intp if xp is np else xp.int32
  clamped = xp.clip(positions, 0.0, n - 1.0)
  i0 = xp.minimum(xp.floor(clamped).astype(index_dtype), max(n - 2, 0))
  return i0, xp.minimum(i0 + 1, n - 1), clamped - i0
