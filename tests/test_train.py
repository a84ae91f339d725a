"""Training loop: loss goes down, sharded = single device, multi-process, resume, NaN stop."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import poison
import tiny_data
from tolerances import bfloat16_rtol, float32_rtol
from wmh_jax import configs
from wmh_jax.data import pipeline, records
from wmh_jax.errors import CheckpointError, TrainingError
from wmh_jax.evaluation import metrics
from wmh_jax.inference import forward
from wmh_jax.models import kinds
from wmh_jax.runtime import checkpoint, sharding
from wmh_jax.training import logs, refit, throughput, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  return tiny_data.make_tiny_dataset(root / "data"), root / "cache"


def _params_equal(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_adadelta_uses_keras_values():
  config = tiny_data.tiny_config(Path("m.csv"), Path("c"), flags="paper")
  assert config.train.optimizer == "adadelta"
  assert (config.train.learning_rate, config.train.rho, config.train.eps) == (1.0, 0.95, 1e-7)
  params = {"w": np.ones(3, np.float32)}
  opt = train.make_optimizer(config.train)
  state = opt.init(params)
  updates, _ = opt.update({"w": np.ones(3, np.float32)}, state, params)
  # With lr=1.0 the first Adadelta step is -sqrt(eps)/sqrt((1-rho) g^2 + eps) * g.
  expected = -np.sqrt(1e-7) / np.sqrt(0.05 + 1e-7)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_adadelta_paper_values_decrease_loss(dataset):
  """The paper's optimiser (lr 1.0) lowers the loss through the sharded train step.

  (Per-kind loss decreases with plain optax are in test_losses.py.)
  """
  manifest, cache = dataset
  config = tiny_data.tiny_config(manifest, cache, flags="paper")
  recs = records.split_records(records.load_records(manifest, config))["train"]
  batch = next(pipeline.eval_batches(recs[:4], 4))
  batch = {"image": batch["image"], "mask": batch["mask"],
           "volume_ml": np.array([r["wmh_volume_ml"] for r in recs[:4]], np.float32),
           "severity": np.zeros(4, np.int32), "has_mask": np.ones(4, np.float32)}
  mesh = sharding.make_mesh()
  model = kinds.build_model(config.model)
  optimizer = train.make_optimizer(config.train)
  state = train.make_init(model, optimizer, mesh, tuple(config.data.shape))(0)
  step = train.make_train_step(model, config, optimizer, mesh)
  losses = []
  for _ in range(30):
    state, metrics = step(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("kind", ["joint", "severity"])  # joint: both the weak and strong heads
def test_one_bfloat16_step_matches_float32(kind):
  """One train step in bfloat16 compute against float32: same loss and gradient, within
  `bfloat16_rtol`; parameters, optimizer state and statistics stay float32.

  The step uses SGD with rate 1, so the parameter change is minus the gradient.
  The depth-1 body has 6 convolutions on every path (down, bottom, up blocks).
  """
  import test_learning  # pylint: disable=import-outside-toplevel
  task = test_learning._blob_task(4)  # pylint: disable=protected-access
  mesh = jax.make_mesh((1,), (sharding.DATA_AXIS,), devices=jax.devices()[:1])
  labels = [{"wmh_volume_ml": float(v), "has_mask": 1.0} for v in task["volume_ml"]]
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = test_learning._experiment_config(  # pylint: disable=protected-access
        kind, overrides={"model.dtype": dtype, "model.depth": 1})
    model = kinds.build_model(config.model, **train.head_inits(config, labels),
                               voxel_target=1e-3 / config.data.volume_scale_ml,
                               axis_name=sharding.DATA_AXIS)
    optimizer = optax.sgd(1.0)
    state = train.make_init(model, optimizer, mesh, test_learning.SHAPE)(0)
    before = jax.tree.map(np.asarray, state["params"])
    state, metrics = train.make_train_step(model, config, optimizer, mesh)(
        state, sharding.global_batch(task, mesh))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state)
               if np.issubdtype(leaf.dtype, np.floating)), dtype
    gradient = np.concatenate([(b - np.asarray(a)).ravel() for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(before), strict=True)])
    results[dtype] = float(metrics["loss"]), gradient
  (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
  convs = 6
  assert abs(loss16 - loss32) <= bfloat16_rtol(convs) * loss32, (loss16, loss32)
  error = np.linalg.norm(grad16 - grad32) / np.linalg.norm(grad32)
  assert error <= bfloat16_rtol(2 * convs), error


def test_on_device_augmentation_in_the_train_step(dataset):
  """The train step resamples an ``affine`` batch itself: same metrics as the host path."""
  manifest, cache = dataset
  mesh = jax.make_mesh((1,), (sharding.DATA_AXIS,), devices=jax.devices()[:1])
  metrics = {}
  for on_device in (False, True):
    config = tiny_data.tiny_config(manifest, cache)
    config.augment.update(on_device=on_device, rotate_deg=30.0, translate_fraction=0.1)
    recs = records.split_records(records.load_records(manifest, config))["train"]
    batch = next(pipeline.make_train_iterator(recs, config, 0, batch_size_per_process=4))
    assert ("affine" in batch) == on_device
    model = kinds.build_model(config.model, axis_name=sharding.DATA_AXIS)
    optimizer = optax.sgd(0.0)
    state = train.make_init(model, optimizer, mesh, tuple(config.data.shape))(0)
    _, metrics[on_device] = train.make_train_step(model, config, optimizer, mesh)(
        state, sharding.global_batch(batch, mesh))
  for key, value in metrics[False].items():  # interpolation rounding only (test_augment)
    np.testing.assert_allclose(float(metrics[True][key]), float(value), rtol=1e-4, err_msg=key)


@pytest.fixture(scope="module")
def one_epoch(dataset, tmp_path_factory, programs):
  """A finished 1-epoch run shared by the tests below: (final state, workdir)."""
  manifest, cache = dataset
  workdir = tmp_path_factory.mktemp("one_epoch") / "run"
  state, metrics = train.run(tiny_data.tiny_config(manifest, cache), workdir, programs)
  assert np.isfinite(metrics["val_icc"])
  return jax.tree.map(np.asarray, state), workdir


def test_timing_log_gives_throughput_of_the_compiled_step(one_epoch):
  """timing.jsonl: every interval's scans/s, voxels/s, TFLOP/s and MFU follow from its step
  time and the compiled step's cost; the session ends with a summary record."""
  _, workdir = one_epoch
  lines = [json.loads(line) for line in (workdir / "timing.jsonl").read_text().splitlines()]
  intervals = [r for r in lines if "step_time_s" in r]
  assert len(intervals) >= 2
  voxels = 16 * 16 * 8
  for record in intervals:
    assert record["scans_per_s"] == pytest.approx(4 / record["step_time_s"])
    assert record["voxels_per_s"] == pytest.approx(4 * voxels / record["step_time_s"])
    assert record["tflops_per_device"] > 0 and 0 < record["mfu"] < 1
  (summary,) = [r for r in lines if r.get("summary")]
  assert summary["peak"] == "measured CPU fp32 matmul" and summary["peak_tflops"] > 0
  assert summary["scans_per_s"] == pytest.approx(4 / summary["median_step_time_s"])
  # FLOPs per step are the same in every interval: TFLOP/s x time is constant.
  flops = [r["tflops_per_device"] * r["step_time_s"] for r in intervals]
  np.testing.assert_allclose(flops, flops[0], rtol=1e-9)


def test_val_predictions_are_stored_per_epoch_and_give_the_logged_icc(one_epoch):
  """val_predictions/step_<n>.json: the calibration set of predict's intervals; its
  volumes reproduce the validation ICC logged for that checkpoint."""
  _, workdir = one_epoch
  evals = logs.validation_records(workdir / "metrics.jsonl")
  assert evals
  for record in evals:
    stored = json.loads(checkpoint.val_predictions_path(workdir, record["step"]).read_text())
    assert stored["step"] == record["step"] and len(stored["scan_id"]) == len(
        stored["predicted_ml"]) == len(stored["annotated_ml"]) > 1
    icc = metrics.icc_2_1(np.array(stored["annotated_ml"]), np.array(stored["predicted_ml"]))
    assert icc == pytest.approx(record["val_icc"], rel=1e-6, abs=1e-6)


def test_step_peak_picks_the_arithmetic_of_the_compute_dtype():
  class Device:  # pylint: disable=too-few-public-methods
    def __init__(self, platform, device_kind):
      self.platform, self.device_kind = platform, device_kind
  h100 = Device("gpu", "NVIDIA H100 80GB HBM3")
  assert throughput.step_peak(h100, "bfloat16", 2) == ("NVIDIA H100 80GB HBM3 bf16 peak",
                                                       2 * 989.4)
  assert throughput.step_peak(h100, "float32", 1)[1] == 494.7  # XLA's default: TF32
  assert throughput.step_peak(Device("tpu", "TPU v4"), "float32", 4)[1] == 4 * 275.0
  assert throughput.step_peak(Device("gpu", "Some GPU"), "float32", 1)[1] is None
  cost = throughput.StepCost(batch_size=4, voxels_per_scan=1000, num_devices=2, flops=8e12,
                             peak_name="x", peak_tflops=20.0)
  assert cost.rates(2.0) == {"scans_per_s": 2.0, "voxels_per_s": 2000.0,
                             "tflops_per_device": 2.0, "mfu": 0.2}


def test_resume_matches_uninterrupted(dataset, one_epoch, tmp_path, programs):
  manifest, cache = dataset
  config = tiny_data.tiny_config(manifest, cache)
  config.train.num_epochs = 2
  full_state, _ = train.run(config, tmp_path / "full", programs)
  shutil.copytree(one_epoch[1], tmp_path / "split")
  resumed_state, _ = train.run(config, tmp_path / "split", programs)
  # Exact: the same program on the same machine and device count, run twice.
  _params_equal(full_state["params"], resumed_state["params"], atol=0)
  _params_equal(full_state["opt_state"], resumed_state["opt_state"], atol=0)
  _params_equal(full_state["readout"], resumed_state["readout"], atol=0)
  assert (tmp_path / "full" / "metrics.jsonl").read_text() == \
      (tmp_path / "split" / "metrics.jsonl").read_text()


def test_restore_for_inference_needs_only_workdir(one_epoch):
  state, workdir = one_epoch
  restored = checkpoint.restore_for_inference(workdir)
  assert restored.config.model.kind == "weak"
  assert restored.step == 3
  _params_equal(state["params"], restored.variables["params"], atol=0)


def test_non_finite_loss_stops_and_keeps_checkpoint(dataset, one_epoch, tmp_path, monkeypatch,
                                                    programs):
  manifest, cache = dataset
  shutil.copytree(one_epoch[1], tmp_path / "run")  # checkpoint at step 3
  config = tiny_data.tiny_config(manifest, cache)
  config.train.num_epochs = 2
  # The resumed run's second batch is step 5.
  monkeypatch.setattr(pipeline, "make_train_iterator",
                      poison.poisoning(pipeline.make_train_iterator, 2))
  with pytest.raises(TrainingError, match="non-finite loss nan at step 5; stopped. "
                     "Last good checkpoint: step 3"):
    train.run(config, tmp_path / "run", programs)
  restored = checkpoint.restore_for_inference(tmp_path / "run", "latest")
  assert restored.step == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.variables["params"]))


def test_four_devices_match_one(dataset, one_epoch, tmp_path):
  manifest, cache = dataset
  single = one_epoch[0]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "wmh_jax.main", "--config=tests/tiny_experiment.py",
       f"--config.data.manifest={manifest}", f"--config.data.cache_dir={cache}",
       f"--workdir={tmp_path / 'four'}", "--config.loader.worker_count=2", "--cpu_devices=4"],
      cwd=REPO, env=env, check=True, capture_output=True, text=True)
  # Quiet by default: our lines only, no library INFO records (absl's "I1201 ..."
  # prefix), no leaked Grain shared memory at exit.
  lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
  assert not [line for line in lines if re.match(r"I\d{4} ", line)], lines[:20]
  assert not [line for line in lines if "resource_tracker" in line or "leaked" in line]
  assert any(line.startswith("epoch 1 step 3: val_icc=") for line in lines)
  assert any(line.startswith("seed_0: median ") for line in lines)
  assert any(line.startswith("seed 0: final validation val_icc=") for line in lines)
  four = checkpoint.restore_for_inference(tmp_path / "four" / "seed_0", "latest")
  # 1 vs 4 devices: 3 Adam steps of lr <= 1.5e-4 (warm-up) whose directions differ by
  # ~float32_rtol(4 x 2048 voxels, sides=2) = 2e-3 relative: ~1e-6 (tests/tolerances.py).
  _params_equal(single["params"], four.variables["params"], atol=1e-5)


def _two_processes(manifest: Path, cache: Path, workdir: Path, out: Path,
                   args: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> list[dict]:
  """Runs tests/distributed_worker.py as 2 processes on loopback; returns their results.

  ``args[i]`` are process i's optional worker arguments (EPOCHS, SIGTERM_AT,
  PACE_S). Each result holds the worker's ``preempted`` and ``step`` and its
  final ``params`` (npz). Fails on a non-zero exit or a hang (120 s).
  """
  out.mkdir(parents=True, exist_ok=True)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # One compilation cache for the pair's launches: later launches load, not compile.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  workers = [subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "distributed_worker.py"), str(port), "2", str(i),
       str(manifest), str(cache), str(workdir), str(out / f"p{i}.npz"), *args[i]],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  try:
    outputs = [w.communicate(timeout=120)[0].decode() for w in workers]
  finally:
    for w in workers:
      w.kill()
  results = []
  for i, (w, output) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, output[-3000:]
    result = json.loads((out / f"p{i}.npz.json").read_text())
    results.append({**result, "params": np.load(out / f"p{i}.npz"), "output": output})
  return results


def test_two_processes_match_one(dataset, one_epoch, tmp_path):
  manifest, cache = dataset
  single = one_epoch[0]
  p0, p1 = (r["params"] for r in _two_processes(manifest, cache, tmp_path / "two", tmp_path))
  for key in p0.files:  # exact: both replicas apply the same all-reduced update
    np.testing.assert_array_equal(p0[key], p1[key])
  for key, leaf in zip(p0.files, jax.tree.leaves(single["params"]), strict=True):
    # Another reduction order, as in test_four_devices_match_one.
    np.testing.assert_allclose(p0[key], np.asarray(leaf), atol=1e-5, rtol=0)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(dataset, tmp_path):
  """Preemption is collective: one process gets SIGTERM, both save one step and exit 0.

  Then the resumed pair ends bitwise equal to an uninterrupted pair (same
  program, same 2-process topology, so the same reductions).
  """
  manifest, cache = dataset
  epochs, total = "4", 12  # 3 steps per epoch
  reference = _two_processes(manifest, cache, tmp_path / "ref", tmp_path / "ref_out",
                             ((epochs,), (epochs,)))
  # Only process 1 gets SIGTERM, when it takes its 4th batch (2 batches are
  # prefetched, so during step 2); 0.1 s per batch leaves the notice time to
  # reach process 0 before the last step.
  stopped = _two_processes(manifest, cache, tmp_path / "run", tmp_path / "stop_out",
                           ((epochs, "0", "0.1"), (epochs, "4", "0.1")))
  assert [r["preempted"] for r in stopped] == [True, True]
  step = stopped[0]["step"]
  assert stopped[1]["step"] == step and 2 <= step < total
  assert f"SIGTERM: saved step {step}" in stopped[0]["output"]
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved[-1] == step
  resumed = _two_processes(manifest, cache, tmp_path / "run", tmp_path / "resume_out",
                           ((epochs,), (epochs,)))
  assert [r["step"] for r in resumed] == [total, total]
  assert f"resumed {tmp_path / 'run'} at step {step}" in resumed[0]["output"]
  for mine, ref in zip(resumed, reference):
    for key in ref["params"].files:
      np.testing.assert_array_equal(mine["params"][key], ref["params"][key])


def test_every_loss_is_independent_of_the_device_count():
  """One step of each kind, has_mask differing across devices: 1 device == 4 devices."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(REPO / "tests" / "device_count_worker.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("ok ") == 4, result.stdout


def test_checkpoint_of_an_older_recipe_is_a_clear_error(one_epoch, tmp_path):
  shutil.copytree(one_epoch[1], tmp_path / "run")
  for path in (tmp_path / "run" / "checkpoints").glob("*/config/metadata"):
    stored = json.loads(path.read_text())
    del stored["model"]["pooled_norm"]
    path.write_text(json.dumps(stored))
  with pytest.raises(CheckpointError, match="older wmh-jax .*model.pooled_norm"):
    checkpoint.restore_for_inference(tmp_path / "run")


def test_head_inits_start_at_the_mean_volume_and_the_lesion_prior():
  config = tiny_data.tiny_config(Path("m.csv"), Path("c"))  # 16x16x8 at 1.5 mm, scale 0.05 mL
  recs = [{"wmh_volume_ml": 0.1, "has_mask": 1.0}, {"wmh_volume_ml": 0.3, "has_mask": 1.0},
          {"wmh_volume_ml": 5.0, "has_mask": 0.0}]
  inits = train.head_inits(config, recs)
  assert inits["volume_bias_init"] == pytest.approx((0.1 + 0.3 + 5.0) / 3 / 0.05)
  # Masked scans only: 0.2 mL of 2048 voxels of 3.375 mm³.
  fraction = 0.2 / (1.5 ** 3 / 1000) / 2048
  assert inits["seg_bias_init"] == pytest.approx(np.log(fraction / (1 - fraction)))
  config.model.seg_prior_init = False
  assert train.head_inits(config, recs)["seg_bias_init"] == 0.0


def test_refit_due_per_mode_and_only_with_a_volume_head():
  config = configs.get_config()
  assert config.train.refit_head == "epoch"
  assert [train.refit_due(config, s, 10) for s in (5, 10)] == [True, True]
  config.train.refit_head = "end"
  assert [train.refit_due(config, s, 10) for s in (5, 10)] == [False, True]
  config.train.refit_head = "none"
  assert not train.refit_due(config, 10, 10)
  config.train.refit_head = "epoch"
  config.model.kind = "strong"
  assert not train.refit_due(config, 10, 10)
  config.train.refit_head = "sometimes"
  with pytest.raises(ValueError, match="refit_head"):
    train.refit_due(config, 10, 10)


@pytest.mark.parametrize("readout", ["head", "counts"])
def test_refit_is_the_least_squares_readout_and_leaves_training_alone(dataset, tmp_path,
                                                                      programs, readout):
  manifest, cache = dataset
  config = tiny_data.tiny_config(manifest, cache)
  config.model.readout = readout
  config.model.readout_hidden = 8
  state, final = train.run(config, tmp_path / "refit", programs)
  config.train.refit_head = "none"
  plain, _ = train.run(config, tmp_path / "plain", programs)
  # Training never reads the fit: the same params and optimiser state, bit for bit.
  _params_equal(state["params"], plain["params"], atol=0)
  _params_equal(state["opt_state"], plain["opt_state"], atol=0)
  evals = [e for e in map(json.loads, (tmp_path / "refit" / "metrics.jsonl").read_text()
                          .splitlines()) if "val_score" in e]
  assert final["val_icc"] == evals[-1]["val_icc"]
  plain_evals = [e for e in map(json.loads, (tmp_path / "plain" / "metrics.jsonl").read_text()
                                .splitlines()) if "val_score" in e]
  # Every epoch also logs the trained Dense layer's validation: the run without a refit's.
  assert [e["trained_head_val_icc"] for e in evals] == [e["val_icc"] for e in plain_evals]
  # The stored fit is the ridge readout of the final body's pooled training features.
  splits = records.split_records(records.load_records(manifest, config))
  model = kinds.build_model(config.model, voxel_target=records.voxel_target(config))
  mesh = sharding.make_mesh()
  outputs = forward.run_batches(forward.make_forward(model, mesh),
                                  train.model_variables(state),
                                  pipeline.eval_batches(splits["train"], 4), mesh, keep_maps=False)
  target = np.array([r["wmh_volume_ml"] for r in splits["train"]]) / config.data.volume_scale_ml
  weights, bias = refit.RidgeReadout(refit.features_of(outputs), target).dense()
  fit = (state["readout"]["count_readout"] if readout == "counts"
         else state["readout"]["volume_head"]["dense"])
  assert len(weights) == (8 if readout == "counts" else outputs["pooled"].shape[1])
  assert float(fit["fitted"]) == 1.0
  # The same program on the same features: equal up to the float32 cast of the fit.
  np.testing.assert_allclose(np.asarray(fit["kernel"]), weights, rtol=float32_rtol(1, ops=2))
  assert float(fit["bias"]) == pytest.approx(bias, rel=float32_rtol(1, ops=2))


def test_program_cache_reuses_one_setting_across_seeds_only():
  config = tiny_data.tiny_config(Path("m.csv"), Path("c"))
  mesh = sharding.make_mesh()
  cache = train.ProgramCache()
  inits = {"volume_bias_init": 0.5}
  first = cache.get(config, inits, mesh, total_steps=6)
  config.seed = 7
  config.train.log_every_steps = 5  # a runtime field
  assert cache.get(config, inits, mesh, total_steps=6) is first
  longer = cache.get(config, inits, mesh, total_steps=12)
  assert longer is not first
  config.train.learning_rate = 0.5
  assert cache.get(config, inits, mesh, total_steps=12) is not longer
