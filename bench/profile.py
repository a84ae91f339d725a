"""Where a compiled training step spends its time: an XLA profile by op, layer and pass.

Usage::

  python -m bench.profile [--kinds=weak,strong] [--shape=cpu] [--repeats=3]
      [--out=bench/profile_cpu.md]

Runs the project's compiled train step (`bench.training.JaxStep`, batch 4)
under ``jax.profiler`` and reads the per-op execution events of XLA's thunk
runtime back with ``jax.profiler.ProfileData``. Each event is an HLO
instruction of the optimised program; its ``op_name`` metadata names the Flax
module (``body/up_0/conv_0``) and the pass (``jvp(...)``: forward,
``transpose(jvp(...))``: backward). Instructions XLA inserts itself (layout
transposes, the kernel-gradient convolutions) carry no ``op_name``; they get
the module of the nearest tagged input and the pass ``untagged``.

Times are summed over all threads and divided by the steps profiled, so on
a multi-core CPU the total exceeds the wall-clock step time: compare shares,
not absolute sums, with the step time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax

from bench import report, training

DEFAULT_OUT = Path("bench/profile_cpu.md")

# An HLO instruction line: "[ROOT] %name = shape opcode(operands), ..., calls=%comp, ...".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>\S+) "
                          r"(?P<opcode>[\w\-]+)\((?P<operands>[^)]*)\)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) .*\{$")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CALLS = re.compile(r"calls=%?(?P<comp>[\w.\-]+)")
_OPERAND = re.compile(r"%(?P<name>[\w.\-]+)")
# Library calls (convolutions, matmuls), by fusion-kind prefix of the instruction name.
_LIBRARY_PREFIXES = ("ynn_fusion", "xnn_fusion", "onednn", "convolution", "dot", "custom-call")


@dataclasses.dataclass
class Instruction:
  """One HLO instruction of the optimised program.

  Attributes:
    name: instruction name (the profiler's event name).
    shape: result shape, e.g. ``f32[4,56,64,16,8]{4,3,2,1,0}``.
    op_name: its ``op_name`` metadata ('' when XLA inserted it).
    calls: the computation it calls (fusions), or ''.
    operands: names of its operands.
  """
  name: str
  shape: str
  op_name: str
  calls: str
  operands: list[str]


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
  """Instructions by name and each computation's ``op_name`` values, from HLO text."""
  instructions: dict[str, Instruction] = {}
  computation_op_names: dict[str, list[str]] = collections.defaultdict(list)
  computation = ""
  for line in text.splitlines():
    if (header := _COMPUTATION.match(line)) and "=" not in line.split("{")[0]:
      computation = header.group("name")
      continue
    if not (match := _INSTRUCTION.match(line)):
      continue
    op_name = (m.group("op_name") if (m := _OP_NAME.search(line)) else "")
    calls = (m.group("comp") if (m := _CALLS.search(line)) else "")
    instructions.setdefault(match.group("name"), Instruction(
        match.group("name"), match.group("shape"), op_name, calls,
        _OPERAND.findall(match.group("operands"))))
    if op_name:
      computation_op_names[computation].append(op_name)
  return instructions, computation_op_names


def own_op_name(instruction: Instruction, computation_op_names: dict[str, list[str]]) -> str:
  """The instruction's ``op_name``, or the first inside the fusion it calls ('' if none)."""
  if instruction.op_name:
    return instruction.op_name
  names = computation_op_names.get(instruction.calls, [])
  return names[0] if names else ""


def inherited_op_name(name: str, instructions: dict[str, Instruction],
                      computation_op_names: dict[str, list[str]], depth: int = 4) -> str:
  """The ``op_name`` of the nearest tagged operand (breadth first, ``depth`` levels)."""
  frontier = list(instructions[name].operands) if name in instructions else []
  for _ in range(depth):
    following = []
    for operand in frontier:
      if operand not in instructions:
        continue
      if found := own_op_name(instructions[operand], computation_op_names):
        return found
      following += instructions[operand].operands
    frontier = following
  return ""


def module_and_pass(op_name: str) -> tuple[str, str]:
  """``jit(f)/transpose(jvp(GPUNet))/body/up_0/conv_0/conv`` -> ('body/up_0/conv_0', 'backward').

  The pass is 'forward' (inside ``jvp(...)`` only), 'backward' (inside
  ``transpose(...)``) or 'update' (outside the model: loss reduction,
  optimiser); the module is the path of Flax scopes without the primitive.
  """
  parts = op_name.split("/")[1:]  # drop jit(...)
  step_pass = "update"
  while parts and "(" in parts[0]:
    step_pass = "backward" if parts[0].startswith("transpose(") else "forward"
    parts = parts[1:]
  module = []
  for part in parts[:-1]:  # Flax scopes are identifiers; stop at e.g. an einsum's name scope
    if not part.isidentifier():
      break
    module.append(part)
  return "/".join(module) or "(step)", step_pass


def op_class(name: str) -> str:
  """An event's op class: its instruction name without the numeric suffix."""
  return re.sub(r"\.\d+$", "", name)


def is_library_call(name: str) -> bool:
  """Whether the instruction runs in a library kernel (convolution or matmul)."""
  return name.startswith(_LIBRARY_PREFIXES)


@dataclasses.dataclass
class OpTime:
  """Thread-summed time of one HLO instruction per profiled step.

  Attributes:
    name: instruction name.
    shape: result shape.
    module: Flax module path (or '(step)').
    step_pass: 'forward', 'backward', 'update' or 'untagged'.
    ms: milliseconds per step, summed over threads.
  """
  name: str
  shape: str
  module: str
  step_pass: str
  ms: float


def profile_step(step: training.JaxStep, repeats: int) -> list[OpTime]:
  """Per-instruction times of ``step``'s compiled program over ``repeats`` steps.

  Two untimed steps run first; then ``repeats`` steps run under the profiler.
  """
  for _ in range(2):
    step.run()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(repeats):
      step.run()
    jax.profiler.stop_trace()
    traces = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not traces:
      raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(str(traces[-1]))
  instructions, computation_op_names = parse_hlo(step.compiled.as_text())
  totals: dict[str, float] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in instructions:
          totals[event.name] += event.duration_ns
  ops = []
  for name, total_ns in totals.items():
    instruction = instructions[name]
    if op_name := own_op_name(instruction, computation_op_names):
      module, step_pass = module_and_pass(op_name)
    else:
      module, _ = module_and_pass(inherited_op_name(name, instructions, computation_op_names))
      step_pass = "untagged"
    ops.append(OpTime(name, instruction.shape.split("{")[0], module, step_pass,
                      total_ns / repeats / 1e6))
  return sorted(ops, key=lambda op: -op.ms)


def _share(ms: float, total: float) -> str:
  return f"{100 * ms / total:.1f}%"


def summary_sections(kind: str, ops: list[OpTime], step_s: float, top: int = 15
                     ) -> list[report.Section]:
  """Three report sections for one model: by op class, by module and pass, top instructions."""
  total = sum(op.ms for op in ops)
  by_class: dict[str, float] = collections.Counter()
  by_module: dict[tuple[str, str], float] = collections.Counter()
  for op in ops:
    by_class[op_class(op.name)] += op.ms
    by_module[(op.module, op.step_pass)] += op.ms
  library = sum(op.ms for op in ops if is_library_call(op.name))
  notes = [f"step wall time {report.fmt(step_s)} s (median); thread-summed op time "
           f"{report.fmt(total / 1e3)} s; library calls (convolutions, matmuls) "
           f"{_share(library, total)} of op time, everything else (layout copies, "
           "concatenations, padding, elementwise) the rest"]
  class_rows = [(name, report.fmt(ms), _share(ms, total))
                for name, ms in sorted(by_class.items(), key=lambda kv: -kv[1])[:top]]
  module_rows = [(module, step_pass, report.fmt(ms), _share(ms, total))
                 for (module, step_pass), ms in sorted(by_module.items(),
                                                       key=lambda kv: -kv[1])[:top]]
  op_rows = [(op.name, op.shape, op.module, op.step_pass, report.fmt(op.ms),
              _share(op.ms, total)) for op in ops[:top]]
  return [
      report.Section(f"{kind}: by op class", report.markdown_table(
          ("op class", "ms/step (threads summed)", "share"), class_rows), notes),
      report.Section(f"{kind}: by module and pass", report.markdown_table(
          ("module", "pass", "ms/step", "share"), module_rows)),
      report.Section(f"{kind}: top {top} instructions", report.markdown_table(
          ("instruction", "result shape", "module", "pass", "ms/step", "share"), op_rows)),
  ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line options."""
  parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--kinds", default="weak,strong", help="comma-separated model kinds")
  parser.add_argument("--shape", default="cpu", choices=tuple(training.SHAPES))
  parser.add_argument("--repeats", type=int, default=3, help="profiled steps")
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """Profiles each kind's train step and writes the Markdown report."""
  args = parse_args(argv)
  command = "python -m bench.profile " + " ".join(sys.argv[1:] if argv is None else argv)
  out = report.Report("wmh-jax train-step profile", preamble=[
      f"command: `{command.strip()}`",
      f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
      f"JAX {jax.__version__}, backend `{jax.default_backend()}`, conv formulation "
      f"'auto' -> `{training.conv_formulation()}`",
      f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
  ])
  for kind in args.kinds.split(","):
    config = training.bench_config(kind, args.shape)
    step = training.JaxStep(config, training.synthetic_batch(training.grid(config)))
    step_s = step.timed(args.repeats).median_s
    out.sections += summary_sections(f"{kind}, {args.shape} grid", profile_step(step, args.repeats),
                                     step_s)
    out.write(args.out)
  out.preamble.append(f"load average at end: {os.getloadavg()[0]:.1f}")
  out.write(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
