"""The study's result types: tables, figure panels and learning curves.

:mod:`wmh_jax.study.tables` and :mod:`wmh_jax.study.figures` compute them;
:mod:`wmh_jax.study.report` lays them out as files. Arrays are NumPy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Table:
  """A named result table.

  Attributes:
    name: file stem (``tables/<name>.csv`` / ``.md``).
    title: one-line heading.
    columns: column order.
    rows: one dict per row; a missing or None cell is written empty (CSV) or
      ``n/a`` (Markdown).
    note: text printed under the table (e.g. why it is empty).
  """
  name: str
  title: str
  columns: list[str]
  rows: list[dict[str, Any]]
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Panel:
  """One image of the examples figure (2D arrays are axial slices ``(x, y)``).

  Attributes:
    title: panel title.
    background: ``(x, y)`` image or map shown with ``cmap``.
    cmap: matplotlib colormap of the background.
    contour: ``(x, y)`` binary mask drawn as an outline in ``contour_color``, or None.
    fill: ``(x, y)`` binary mask drawn as a translucent overlay, or None.
    contour_color: matplotlib colour of the outline.
  """
  title: str
  background: np.ndarray
  cmap: str = "gray"
  contour: np.ndarray | None = None
  fill: np.ndarray | None = None
  contour_color: str = "red"


@dataclasses.dataclass(frozen=True)
class Curve:
  """One validation metric of one seed over training (a learning curve).

  Attributes:
    run: the run's name.
    kind: the run's model kind (`wmh_jax.models.kinds`).
    seed: the training seed.
    metric: the ``metrics.jsonl`` key (``report.CURVE_STYLES`` draws it).
    steps: int ``(n,)`` training steps of the validation passes.
    values: float64 ``(n,)`` the metric at those steps.
  """
  run: str
  kind: str
  seed: int
  metric: str
  steps: np.ndarray
  values: np.ndarray
