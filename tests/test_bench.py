"""bench/: PyTorch reference = Flax net, Markdown writer, timing.jsonl reader, CLI.

No test here asserts a time. The PyTorch tests skip when the optional
``bench`` extra (torch) is not installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import profile, report, run, training
from wmh_jax.models import architectures, kinds
from wmh_jax.training import throughput

TINY_SHAPE = (16, 16, 8)


def _tiny_config(kind: str):
  config = training.bench_config(kind, "cpu")
  config.data.shape = TINY_SHAPE
  config.model.base_filters = 2
  return config


def _flax_params_and_shapes(config, batch: int) -> tuple[int, dict[str, tuple[int, ...]]]:
  """Parameter count and output shapes of the Flax model, without computing anything."""
  model = kinds.build_model(config.model)
  image = jax.ShapeDtypeStruct((batch, *training.grid(config), 1), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)["params"]
  outputs = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, image)
  # "pooled" (the GP head's pooled features, kept for OOD scores) has no PyTorch twin: the
  # reference times the forward and backward pass, not the OOD statistics.
  return architectures.count_params(params), {k: tuple(v.shape) for k, v in outputs.items()
                                              if k != "pooled"}


@pytest.mark.parametrize("kind", ["weak", "strong"])
@pytest.mark.parametrize("shape_name", ["tiny", "cpu", "paper"])
def test_torch_reference_has_the_flax_parameter_count_and_outputs(kind, shape_name):
  torch = pytest.importorskip("torch")
  from bench import torch_reference
  config = _tiny_config(kind) if shape_name == "tiny" else training.bench_config(kind, shape_name)
  flax_params, flax_shapes = _flax_params_and_shapes(config, batch=2)
  net = torch_reference.build_model(kind, config.model.base_filters, config.model.depth)
  assert torch_reference.count_params(net) == flax_params
  if shape_name == "tiny":
    with torch.no_grad():
      outputs = net(torch.rand(2, 1, *TINY_SHAPE))
  else:
    with torch.device("meta"):
      outputs = torch_reference.build_model(kind, config.model.base_filters,
                                            config.model.depth)(
          torch.empty(2, 1, *training.grid(config)))
  assert {k: tuple(v.shape) for k, v in outputs.items()} == flax_shapes


def test_bench_steps_run_and_check_the_same_net():
  pytest.importorskip("torch")
  config = _tiny_config("weak")
  config.model.depth = 0  # a single block: the plumbing, compiled in seconds
  batch = training.synthetic_batch(TINY_SHAPE)
  jax_result = training.JaxStep(config, batch).timed(repeats=1)
  torch_result = training.time_torch_step(config, batch, "channels_last_3d", 1, "cpu", 1)
  assert torch_result.framework == "PyTorch (channels_last_3d, 1 thread)"
  training.check_same_net(jax_result, torch_result)
  assert jax_result.flops and jax_result.flops > 0
  assert len(jax_result.times_s) == len(torch_result.times_s) == 1
  torch_result.params += 1
  with pytest.raises(AssertionError, match="parameters"):
    training.check_same_net(jax_result, torch_result)


def test_module_and_pass_from_op_names():
  assert profile.module_and_pass(
      "jit(per_device)/jvp(GPUNet)/body/up_0/conv_0/conv_general_dilated") == (
          "body/up_0/conv_0", "forward")
  assert profile.module_and_pass(
      "jit(per_device)/transpose(jvp(GPUNet))/body/up_0/conv_0/bxyzc,ijkco->bxyzijko/"
      "dot_general") == ("body/up_0/conv_0", "backward")
  assert profile.module_and_pass("jit(per_device)/add") == ("(step)", "update")


HLO_SNIPPET = """HloModule m

%fused_computation.1 (param_0: f32[4,8]) -> f32[8,4] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%param_0), dimensions={1,0}
}

ENTRY %main (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  %add.2 = f32[4,8]{1,0} add(%p, %p), metadata={op_name="jit(f)/jvp(Net)/body/conv/add"}
  ROOT %transpose_fusion.3 = f32[8,4]{1,0} fusion(%add.2), kind=kLoop, calls=%fused_computation.1
}
"""


def test_untagged_instructions_inherit_the_module_of_their_input():
  instructions, op_names = profile.parse_hlo(HLO_SNIPPET)
  assert instructions["transpose_fusion.3"].calls == "fused_computation.1"
  assert instructions["transpose_fusion.3"].operands == ["add.2"]
  assert profile.own_op_name(instructions["transpose_fusion.3"], op_names) == ""
  assert profile.inherited_op_name("transpose_fusion.3", instructions, op_names) == (
      "jit(f)/jvp(Net)/body/conv/add")
  assert profile.op_class("ynn_fusion.61") == "ynn_fusion"
  assert profile.is_library_call("ynn_fusion.61") and not profile.is_library_call("add.2")


def test_profile_of_a_tiny_step_attributes_time_to_modules_and_passes():
  config = _tiny_config("weak")
  config.model.depth = 1
  step = training.JaxStep(config, training.synthetic_batch(TINY_SHAPE))
  ops = profile.profile_step(step, repeats=1)
  assert ops and all(op.ms >= 0 for op in ops)
  passes = {op.step_pass for op in ops}
  assert {"forward", "backward"} <= passes
  modules = {op.module for op in ops}
  assert any(module.startswith("body/down_0/conv_") for module in modules)
  sections = profile.summary_sections("weak", ops, step_s=0.1)
  assert [s.heading for s in sections] == ["weak: by op class", "weak: by module and pass",
                                           "weak: top 15 instructions"]


def test_markdown_table_and_report():
  table = report.markdown_table(("a", "b|c"), [[1, "x"], [2.5, "y\nz"]])
  assert table.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | x |", "| 2.5 | y z |"]
  with pytest.raises(ValueError, match="2 cells"):
    report.markdown_table(("a",), [[1, 2]])
  doc = report.Report("T", ["p"], [report.Section("S", table, ["n"])]).render()
  assert doc.startswith("# T\n\n- p\n\n## S\n\n| a |")
  assert doc.endswith("\n- n\n")


def test_fmt():
  assert report.fmt(None) == "—"
  assert report.fmt(0.012345) == "0.0123"
  assert report.fmt(123456.7) == "123,457"


def test_read_data_wait_excludes_the_first_step(tmp_path):
  lines = [json.dumps({"step": 1, "step_time_s": 30.0, "data_wait_s": 5.0})]
  lines += [json.dumps({"step": s, "step_time_s": 2.0, "data_wait_s": w})
            for s, w in [(2, 0.1), (3, 0.3), (4, 0.2)]]
  lines += ['{"step": 5, "step_ti', json.dumps({"other": 1})]  # torn and foreign lines
  path = tmp_path / "timing.jsonl"
  path.write_text("\n".join(lines) + "\n")
  wait = report.read_data_wait(path)
  assert wait.steps == 3
  assert wait.median_step_s == pytest.approx(2.0)
  assert wait.median_wait_s == pytest.approx(0.2)
  assert wait.wait_share == pytest.approx(0.6 / 6.0)
  assert report.timing_files(tmp_path) == [path]
  path.write_text(lines[0] + "\n")
  with pytest.raises(ValueError, match="fewer than two"):
    report.read_data_wait(path)


def test_timing_files_of_a_seed_sweep(tmp_path):
  for seed in (1, 0):
    (tmp_path / f"seed_{seed}").mkdir()
    (tmp_path / f"seed_{seed}" / "timing.jsonl").write_text("")
  assert report.timing_files(tmp_path) == [tmp_path / "seed_0" / "timing.jsonl",
                                           tmp_path / "seed_1" / "timing.jsonl"]
  with pytest.raises(FileNotFoundError):
    report.timing_files(tmp_path / "seed_0" / "missing")


def test_data_wait_section_without_and_with_a_workdir(tmp_path):
  args = run.parse_args(["--quick", f"--out={tmp_path / 'r.md'}"])
  suite = run.Suite(args, [])
  suite.data_wait()
  assert "no --train_workdir given" in (tmp_path / "r.md").read_text()
  (tmp_path / "timing.jsonl").write_text(
      "".join(json.dumps({"step": s, "step_time_s": 1.0, "data_wait_s": 0.05}) + "\n"
              for s in range(1, 5)))
  suite.args.train_workdir = tmp_path
  suite.data_wait()
  assert "| 3 | 1 | 0.05 | 5% |" in (tmp_path / "r.md").read_text()


def test_parse_args():
  args = run.parse_args(["--quick", "--out=x.md"])
  assert (args.shapes, args.repeats, args.out) == (["cpu"], 2, Path("x.md"))
  args = run.parse_args([])
  assert args.shapes == ["cpu", "paper"] and args.kinds == ["weak", "strong"]
  assert args.torch_formats == ["channels_last_3d", "contiguous"]
  assert run.parse_args(["--torch_threads=2,1"]).torch_threads == [2, 1]
  for bad in (["--shapes=cpu,huge"], ["--torch_threads=0"], ["--torch_threads=two"]):
    with pytest.raises(SystemExit):
      run.parse_args(bad)


def test_peak_table():
  assert throughput.peak_tflops("NVIDIA H200")["bf16"] == pytest.approx(989.4)
  assert throughput.peak_tflops("NVIDIA H100 PCIe")["bf16"] == pytest.approx(756.0)
  assert throughput.peak_tflops("TPU v5 lite") == {"bf16": 197.0}
  assert throughput.peak_tflops("cpu") is None


def test_roofline_cells_use_the_measured_cpu_peak():
  peak = throughput.measured_matmul_peak_tflops(n=128, repeats=2)
  assert peak > 0
  result = training.StepResult(framework="JAX", kind="weak", shape=(8, 8, 4), base_filters=2,
                               params=10, output_shapes={}, warmup_s=1.0, times_s=[0.5, 0.5],
                               flops=2e9)
  cell = run._peak_cell  # pylint: disable=protected-access
  achieved, share = cell(result, "cpu", 0.4)
  assert achieved == report.fmt(0.004)
  assert share == f"1.0% of measured fp32 matmul {report.fmt(0.4)}"
  assert cell(result, "cpu", None)[1] == "unknown (`cpu`)"
  no_count = training.StepResult(**{**result.__dict__, "flops": None})
  assert cell(no_count, "cpu", 0.4) == ("—", "—")


def test_phantom_is_a_brain_with_lesions():
  from bench import host
  image, mask = host.phantom((32, 32, 8), (1.4, 1.4, 4.2), seed=0)
  assert image.dtype == mask.dtype == np.float32
  assert 0 < mask.sum() < (image > 0).sum()
  assert np.all(image[mask > 0] == 1.0)


def test_read_data_wait_weights_log_intervals_by_their_steps(tmp_path):
  lines = [json.dumps({"step": 10, "steps": 10, "step_time_s": 3.0, "data_wait_s": 1.0}),
           json.dumps({"step": 20, "steps": 10, "step_time_s": 1.0, "data_wait_s": 0.1}),
           json.dumps({"step": 23, "steps": 3, "step_time_s": 2.0, "data_wait_s": 0.4}),
           json.dumps({"step": 23, "compile_s": 11.0})]  # the compile record is not a step
  path = tmp_path / "timing.jsonl"
  path.write_text("\n".join(lines) + "\n")
  wait = report.read_data_wait(path)
  assert wait.steps == 13
  assert wait.median_step_s == pytest.approx(1.0)
  assert wait.wait_share == pytest.approx((10 * 0.1 + 3 * 0.4) / (10 * 1.0 + 3 * 2.0))


def test_device_benchmark_smoke_fills_every_section(tmp_path):
  """``python -m bench.device --smoke``: the accelerator benchmark's whole code path on CPU."""
  from bench import device  # pylint: disable=import-outside-toplevel
  out = tmp_path / "results_gpu.md"
  device.run(out, smoke=True, scans=0, repeats=0, train_seconds=0.0, train_dtype="bfloat16",
             workdir=tmp_path / "work")
  text = out.read_text()
  assert "SMOKE RUN" in text and "cohort: 12 local scans" in text and "wall time" in text
  steps = [line for line in text.splitlines() if line.startswith(("| weak |", "| strong |"))]
  settings = {tuple(cell.strip() for cell in line.split("|")[1:4]) for line in steps}
  assert {("weak", "float32", "4"), ("weak", "float32", "8")} <= settings
  assert "measured CPU fp32 matmul" in text and "failed" not in text
  assert "## Training loader at 16x16x8" in text and "| 1 |" in text
  runs = [line for line in steps if "| bfloat16 | 1 | " in line]
  assert len(runs) == 1 and all(re.search(r"1: -?\d\.\d{3}", line) for line in runs), runs


def test_time_to_quality_reads_a_runs_clock_and_picks_the_last_score_inside_each_budget(
    tmp_path):
  from bench import time_to_quality as ttq
  timing = [{"step": s, "steps": 10, "step_time_s": 0.5, "data_wait_s": 0.0}
            for s in (10, 20, 30, 40)]
  timing.append({"step": 40, "summary": True, "compile_s": 3.0})
  (tmp_path / "timing.jsonl").write_text("\n".join(map(json.dumps, timing)) + "\n")
  metrics = [{"step": 1, "loss": 1.0}, {"step": 20, "epoch": 1, "val_score": 0.5},
             {"step": 40, "epoch": 2, "val_score": 0.7}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, metrics)) + "\n")
  curve = ttq.wmhjax_curve(tmp_path)
  # Clock at an epoch end: compile + the logged step times up to it (validation excluded).
  assert curve == [ttq.Point(3.0 + 10.0, 20, 0.5), ttq.Point(3.0 + 20.0, 40, 0.7)]
  assert ttq.at_budget(curve, 12.9) is None
  assert ttq.at_budget(curve, 13.0).score == 0.5
  assert ttq.at_budget(curve, 600.0).score == 0.7  # ended sooner: its final score
  # An evaluation triggered by passing a mark counts at the mark, not at the overshoot.
  monai = [ttq.Point(60.4, 100, 0.2, mark=60.0), ttq.Point(180.2, 300, 0.6, mark=180.0)]
  assert ttq.at_budget(monai, 60.0).score == 0.2 and ttq.at_budget(monai, 179.0).score == 0.2
  text = ttq.table({"wmhjax-weak": curve, "monai-unet": monai}, [60.0, 180.0])
  assert text.splitlines()[0] == "| tool | metric | 1 min | 3 min | end of run |"
  assert "| monai-unet | val Dice | 0.200 (step 100) | 0.600 (step 300) |" in text
  assert "| wmhjax-weak | val ICC | 0.700 (step 40) | 0.700 (step 40) |" in text
