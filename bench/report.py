"""Markdown report, timing helpers and the training-log data-wait reader.

Nothing here imports JAX or PyTorch, so the pieces are cheap to test.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
  """Runs ``fn`` once to warm up, then ``repeats`` times.

  ``fn`` must return only when its work is done (e.g. call
  ``jax.block_until_ready`` or ``tensor.item()`` itself).

  Returns:
    (warm-up seconds, list of ``repeats`` seconds).
  """
  start = time.perf_counter()
  fn()
  warmup = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return warmup, times


def fmt(value: float | None, digits: int = 3) -> str:
  """``value`` to ``digits`` significant digits (no exponent below 1e6); '—' for None."""
  if value is None:
    return "—"
  if abs(value) >= 10 ** digits:
    return f"{value:,.0f}"
  return f"{value:.{digits}g}"


def _cell(value: object) -> str:
  """One Markdown table cell: str, '|' escaped, newlines flattened."""
  return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-flavoured Markdown table (no trailing newline).

  Raises:
    ValueError: if a row's length differs from the header's.
  """
  for row in rows:
    if len(row) != len(headers):
      raise ValueError(f"row {list(row)} has {len(row)} cells, expected {len(headers)}")
  lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


@dataclasses.dataclass
class Section:
  """One report section: a heading, a Markdown table and notes (bullets)."""
  heading: str
  table: str
  notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
  """The whole report; :meth:`write` can be called after every section."""
  title: str
  preamble: list[str] = dataclasses.field(default_factory=list)
  sections: list[Section] = dataclasses.field(default_factory=list)

  def render(self) -> str:
    """The report as Markdown text."""
    parts = [f"# {self.title}", ""]
    parts += [f"- {line}" for line in self.preamble]
    for section in self.sections:
      parts += ["", f"## {section.heading}", "", section.table]
      if section.notes:
        parts.append("")
        parts += [f"- {note}" for note in section.notes]
    return "\n".join(parts) + "\n"

  def write(self, path: Path) -> None:
    """Writes :meth:`render` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(self.render())


@dataclasses.dataclass(frozen=True)
class DataWait:
  """Step-time split of one training run (first logged step excluded).

  Attributes:
    path: the ``timing.jsonl`` read.
    steps: steps counted.
    median_step_s: median wall time of a step, data wait included (s).
    median_wait_s: median time spent waiting for the next batch (s).
    wait_share: sum of waits / sum of step times, in [0, 1].
  """
  path: Path
  steps: int
  median_step_s: float
  median_wait_s: float
  wait_share: float


def timing_files(workdir: Path) -> list[Path]:
  """``workdir/timing.jsonl``, or those of its ``seed_*/`` runs (a seed sweep).

  Raises:
    FileNotFoundError: if there is none.
  """
  direct = workdir / "timing.jsonl"
  if direct.is_file():
    return [direct]
  sweep = sorted(workdir.glob("seed_*/timing.jsonl"))
  if not sweep:
    raise FileNotFoundError(f"{workdir}: no timing.jsonl (nor seed_*/timing.jsonl)")
  return sweep


def read_data_wait(path: Path) -> DataWait:
  """Parses a ``timing.jsonl`` written by ``wmh_jax.training.logs.MetricLogger``.

  Each timing line is ``{"step", "steps", "step_time_s", "data_wait_s"}``:
  the mean step time and data wait over the ``steps`` steps of one log
  interval ending at ``step`` (``steps`` absent = 1, older logs). Torn or
  foreign lines (the compile-time record) are skipped and a repeated step
  keeps its last record. The first interval (compilation, warm-up) is left
  out; medians and the share weight each interval by its steps.

  Raises:
    ValueError: if fewer than two intervals are logged.
  """
  by_step: dict[int, tuple[float, float, int]] = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
      by_step[int(record["step"])] = (float(record["step_time_s"]),
                                      float(record["data_wait_s"]), int(record.get("steps", 1)))
    except (ValueError, KeyError, TypeError):
      continue
  kept = [by_step[step] for step in sorted(by_step)[1:]]
  if not kept:
    raise ValueError(f"{path}: fewer than two training intervals logged")
  step_times = [s for s, _, n in kept for _ in range(n)]
  waits = [w for _, w, n in kept for _ in range(n)]
  return DataWait(path=path, steps=len(step_times),
                  median_step_s=statistics.median(step_times),
                  median_wait_s=statistics.median(waits),
                  wait_share=sum(waits) / sum(step_times))
