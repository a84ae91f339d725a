"""Reliability (issue #7): kill/resume exactness, corrupt and mismatched checkpoints,
a malformed-input corpus through the batch commands, determinism, non-finite
loss, plain-data files and atomic writes.

Training runs go through the real CLI (``python -m wmh_jax.main``) in
subprocesses that share one XLA compilation cache, so only the first run
compiles. Two interrupted lineages run side by side; the test process
watches their workdirs and signals them mid-run:

* ``reference``: uninterrupted, 3 epochs (9 steps, checkpoints at 3, 6, 9);
* ``stopped``: a ``--seeds=0,1`` sweep, SIGTERM during step 5, sent by the run itself
  when it takes batch 7 (``tests/poisoned_main.py``; no race with the test) (the sweep
  ends without starting seed 1); then resumed (seed 0) to the end;
* ``killed``: a NaN batch at step 5 (``tests/poisoned_main.py``) stops it; resumed
  and SIGKILLed once checkpoint 6 exists and step 7 is logged; checkpoint 6 is
  then truncated, and the last resume falls back to step 3 and runs to the end.

Both lineages must end bitwise equal to ``reference`` (so one seed gives one
result whatever the interruptions). The runs use a 1-level U-Net with the
``native`` convolution, which compiles fastest on CPU.

Covered elsewhere (not repeated here): 0 vs 2 loader workers give identical
batches (tests/test_pipeline.py::test_worker_count_does_not_change_batches);
1 vs 4 devices and 2 processes (tests/test_train.py); each bad scan kind
through ``nifti.load_image`` (tests/test_nifti.py).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import malformed
import tiny_data
from wmh_jax.data import cache, manifest, nifti, pipeline, records
from wmh_jax.errors import CheckpointError, ManifestError
from wmh_jax.inference import predict
from wmh_jax.models import kinds
from wmh_jax.runtime import checkpoint, sharding
from wmh_jax.training import logs, train

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 3  # 12 training scans of the 20-scan tiny dataset, batch 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
NAN_STEP = 5         # 1-based step whose batch is poisoned
SIGTERM_BATCH = 7    # the stopped run sends itself SIGTERM when taking this batch (step 5)
TIMEOUT_S = 600


# ---------------------------------------------------------------------------
# Shared data and CLI runs


@dataclasses.dataclass(frozen=True)
class Study:
  """The tiny dataset, its filled preprocessing cache and the CLI environment."""
  root: Path
  manifest: Path
  cache_dir: Path
  env: dict[str, str]

  def config(self) -> ml_collections.ConfigDict:
    """The config of the CLI runs: tests/tiny_experiment.py, 1-level native U-Net, 3 epochs."""
    config = tiny_data.tiny_config(self.manifest, self.cache_dir)
    config.model.conv_impl = "native"
    config.model.depth = 1
    config.train.num_epochs = EPOCHS
    return config


@dataclasses.dataclass
class Launch:
  """One ``python -m wmh_jax.main`` subprocess; ``run`` is its ``seed_0`` folder."""
  proc: subprocess.Popen
  run: Path
  log: Path

  def finish(self) -> tuple[int, str]:
    """Waits for the process; returns (exit status, combined stdout and stderr)."""
    rc = self.proc.wait(timeout=TIMEOUT_S)
    return rc, self.log.read_text()


@dataclasses.dataclass
class Runs:
  """What the CLI runs did (see the module docstring); runs are ``seed_0`` folders.

  ``status`` and ``output`` are keyed by leg: ``stopped``, ``stopped_resumed``,
  ``poisoned``, ``killed``, ``killed_resumed``. ``after`` holds each leg's
  finished checkpoint steps and logged steps when it ended.
  """
  reference: Path
  stopped: Path
  killed: Path
  status: dict[str, int]
  output: dict[str, str]
  after: dict[str, dict[str, list[int]]]
  term_sent_after_step: int | None   # last logged step when SIGTERM was sent
  poisoned_metrics: str              # metrics.jsonl when the NaN stopped the run
  poisoned_latest: checkpoint.RestoredRun
  killed_state_6: dict[str, Any]     # checkpoint 6 of the killed leg, before truncation


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
  """The 20-scan tiny dataset with its cache filled, and the environment of the CLI runs."""
  root = tmp_path_factory.mktemp("reliability")
  manifest_path = tiny_data.make_tiny_dataset(root / "data")
  # Test speed knobs, none of which changes what is tested: one compilation
  # cache for every run; cheap XLA optimisation (every run uses the same flags,
  # so runs stay bitwise comparable); and torch (the optional bench extra)
  # hidden, because tensorboardX imports it when installed (~4 s per run).
  xla_flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  no_torch = root / "no_torch" / "torch"
  no_torch.mkdir(parents=True)
  (no_torch / "__init__.py").write_text('raise ImportError("torch is hidden in this test")\n')
  python_path = os.pathsep.join(filter(None, [str(no_torch.parent),
                                              os.environ.get("PYTHONPATH")]))
  study = Study(root, manifest_path, root / "cache", {
      **os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": python_path,
      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip(),
      "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  # Fill the preprocessing cache in this process (no worker pool in every run).
  cache.preprocessed_records(manifest.read_manifest(manifest_path),
                             records.preprocess_spec(study.config()), study.cache_dir, workers=1)
  return study


def _launch(study: Study, name: str, *overrides: str, poison_step: int | None = None,
            sigterm_batch: int | None = None) -> Launch:
  """Starts ``python -m wmh_jax.main`` with the study's config in ``study.root / name``.

  With ``poison_step`` or ``sigterm_batch``, the CLI runs through
  ``tests/poisoned_main.py``: that training batch (1-based) is NaN, or taking
  that batch sends the process SIGTERM.
  """
  workdir = study.root / name
  log = study.root / f"{name}.{len(list(study.root.glob(f'{name}.*.log')))}.log"
  hooks = [f"--{flag}={value}" for flag, value in (("poison_step", poison_step),
                                                     ("sigterm_batch", sigterm_batch)) if value]
  entry = ["tests/poisoned_main.py", *hooks] if hooks else ["-m", "wmh_jax.main"]
  command = [sys.executable, *entry, "--config=tests/tiny_experiment.py",
             f"--config.data.manifest={study.manifest}",
             f"--config.data.cache_dir={study.cache_dir}",
             f"--config.train.num_epochs={EPOCHS}", "--config.model.conv_impl=native",
             "--config.model.depth=1", f"--workdir={workdir}", *overrides]
  with log.open("w") as out:
    proc = subprocess.Popen(command, cwd=REPO, env=study.env, stdout=out,
                            stderr=subprocess.STDOUT)
  return Launch(proc, workdir / "seed_0", log)


def _logged_steps(run: Path) -> list[int]:
  """Steps of the parseable metrics.jsonl records (a line may be mid-write)."""
  path = run / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:
      pass
  return steps


def _checkpoint_steps(run: Path) -> list[int]:
  """Finished checkpoint steps (Orbax renames a step's temp folder when done)."""
  folder = run / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _signal_when(launches: dict[str, tuple[Launch, int, Callable[[Path], bool]]]
                 ) -> dict[str, int]:
  """Sends each launch its signal as soon as its condition holds.

  Returns the last logged step at the moment each signal was sent (a launch
  that ended before its condition held is missing from the result).
  """
  sent: dict[str, int] = {}
  waiting = dict(launches)
  deadline = time.monotonic() + TIMEOUT_S
  while waiting and time.monotonic() < deadline:
    for name, (launch, signum, condition) in list(waiting.items()):
      if launch.proc.poll() is not None:
        del waiting[name]
      elif condition(launch.run):
        sent[name] = max(_logged_steps(launch.run))
        launch.proc.send_signal(signum)
        del waiting[name]
    time.sleep(0.01)
  return sent


def _corrupt(step_dir: Path, mode: str) -> None:
  """Damages one checkpoint step: truncates every array data file to half, or deletes them.

  Every data file (``d/`` folders), not one picked by size: which files a
  restore reads depends on the device count that wrote the step.
  """
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no array data files under {step_dir}"
  for path in files:
    if mode == "truncate":
      os.truncate(path, path.stat().st_size // 2)
    else:
      path.unlink()


@contextlib.contextmanager
def _reaped(study: Study) -> Iterator[Callable[..., Launch]]:
  """Yields :func:`_launch` for ``study``; kills what it started that still runs at exit."""
  started: list[Launch] = []

  def launch(name: str, *overrides: str, poison_step: int | None = None,
             sigterm_batch: int | None = None) -> Launch:
    started.append(_launch(study, name, *overrides, poison_step=poison_step,
                           sigterm_batch=sigterm_batch))
    return started[-1]

  try:
    yield launch
  finally:
    for leftover in (s for s in started if s.proc.poll() is None):
      leftover.proc.kill()
      leftover.proc.wait()


@pytest.fixture(scope="module")
def reference(study: Study) -> Path:
  """An uninterrupted CLI run (its compilations fill the shared XLA cache)."""
  with _reaped(study) as launch:
    run = launch("reference")
    rc, output = run.finish()
  assert rc == 0, output[-3000:]
  return run.run


@pytest.fixture(scope="module")
def runs(study: Study, reference: Path) -> Runs:
  """The interrupted lineages (module docstring), run once for the module."""
  with _reaped(study) as launch:
    return _run_lineages(launch, reference)


def _run_lineages(launch: Callable[..., Launch], reference: Path) -> Runs:
  """The ``stopped`` and ``killed`` lineages of the module docstring, side by side."""
  status, output, after = {}, {}, {}

  def finish(name: str, leg: Launch) -> None:
    status[name], output[name] = leg.finish()
    after[name] = {"checkpoints": _checkpoint_steps(leg.run), "logged": _logged_steps(leg.run)}

  # Phase 1: SIGTERM mid-epoch | a NaN loss at step 5.
  # SIGTERM must also end the sweep. It comes when the run takes batch
  # SIGTERM_BATCH: during step SIGTERM_BATCH - 2 (2 batches are prefetched), after
  # step SIGTERM_BATCH - 3 was logged (metrics are fetched every step here).
  stopped = launch("stopped", "--seeds=0,1", sigterm_batch=SIGTERM_BATCH)
  poisoned = launch("killed", poison_step=NAN_STEP)
  sent = {"stopped": SIGTERM_BATCH - 3}
  finish("stopped", stopped)
  finish("poisoned", poisoned)
  poisoned_metrics = (poisoned.run / "metrics.jsonl").read_text()
  poisoned_latest = checkpoint.restore_for_inference(poisoned.run, "latest")

  # Phase 2: resume the stopped run to the end | resume the NaN run and SIGKILL it.
  stopped_resumed = launch("stopped")
  killed = launch("killed")
  _signal_when({"killed": (killed, signal.SIGKILL, lambda run: 6 in _checkpoint_steps(run)
                           and max(_logged_steps(run)) >= 7)})
  finish("killed", killed)
  _, killed_state_6 = _restore_state(killed.run, 6)

  # Phase 3: truncate the killed run's newest checkpoint (6) and resume it to the end.
  _corrupt(killed.run / "checkpoints" / "6", "truncate")
  killed_resumed = launch("killed")
  finish("stopped_resumed", stopped_resumed)
  finish("killed_resumed", killed_resumed)
  return Runs(reference=reference, stopped=stopped.run, killed=killed.run, status=status,
              output=output, after=after, term_sent_after_step=sent.get("stopped"),
              poisoned_metrics=poisoned_metrics, poisoned_latest=poisoned_latest,
              killed_state_6=killed_state_6)


# ---------------------------------------------------------------------------
# Bitwise comparison of runs


@functools.lru_cache(maxsize=None)
def _restore_state(run: Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """The full train state (step, params, opt_state, batch_stats) of one checkpoint, on the host.

  Cached by (run, step): a written step does not change (the latest, step None,
  is only asked of finished runs; the corrupted step 6 is read before the damage).
  """
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(run / "checkpoints", options=options,
                             item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  return step, jax.tree.map(np.asarray, restored)


def _flat(state: dict[str, Any]) -> dict[str, np.ndarray]:
  """Leaves by path (``opt_state/1/e_g/body/...``), whatever the containers' types."""
  def name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
  return {"/".join(name(k) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree.leaves_with_path(state)}


def _assert_same_state(state: dict[str, Any], reference: dict[str, Any]) -> None:
  """Every leaf of two train states (step, params, opt_state, batch_stats, readout) is equal."""
  assert set(state) == {"step", "params", "opt_state", "batch_stats", "readout"}
  leaves, ref_leaves = _flat(state), _flat(reference)
  assert sorted(leaves) == sorted(ref_leaves)
  differ = [path for path, a in leaves.items()
            if a.dtype != ref_leaves[path].dtype or not np.array_equal(a, ref_leaves[path])]
  assert not differ, differ
  # Both optimiser moments per parameter leaf (Adam's mu and nu, or Adadelta's
  # accumulators) are part of the compared state, plus step counts.
  assert len(jax.tree.leaves(state["opt_state"])) >= 2 * len(jax.tree.leaves(state["params"]))


def _assert_same_run(run: Path, reference: Path) -> None:
  """Latest checkpoint (every state leaf), iterator state and logs are bitwise equal."""
  step, state = _restore_state(run)
  ref_step, ref_state = _restore_state(reference)
  assert step == ref_step == TOTAL_STEPS
  _assert_same_state(state, ref_state)
  iterator = f"checkpoints/{TOTAL_STEPS}/data_iter/process_0-of-1.json"
  for name in ("metrics.jsonl", "final_metrics.json", iterator):
    assert (run / name).read_bytes() == (reference / name).read_bytes(), name


# ---------------------------------------------------------------------------
# 1. Kill and resume


def test_sigterm_saves_a_final_checkpoint_then_resume_is_bitwise_exact(runs: Runs):
  assert runs.status["stopped"] == 0, runs.output["stopped"][-3000:]
  sent = runs.term_sent_after_step
  assert sent is not None, "the run ended before SIGTERM could be sent"
  latest = max(runs.after["stopped"]["checkpoints"])
  # Saved at the step in flight when the signal came (the next one at most) ...
  assert latest == max(runs.after["stopped"]["logged"]) and latest in (sent, sent + 1)
  # ... which is not an epoch end: the signal came after step 4 (epochs end at 3, 6, 9).
  assert latest % STEPS_PER_EPOCH != 0
  assert f"SIGTERM: saved step {latest}" in runs.output["stopped"]
  assert "seed 0: stopped by SIGTERM" in runs.output["stopped"]
  assert not (runs.stopped.parent / "seed_1").exists()  # the sweep ended there
  assert runs.status["stopped_resumed"] == 0, runs.output["stopped_resumed"][-3000:]
  assert f"resumed {runs.stopped} at step {latest}" in runs.output["stopped_resumed"]
  _assert_same_run(runs.stopped, runs.reference)


def test_sigkill_mid_run_leaves_exact_checkpoints(runs: Runs):
  assert runs.status["killed"] == -signal.SIGKILL, runs.output["killed"][-3000:]
  assert f"resumed {runs.killed} at step 3" in runs.output["killed"]
  at_kill = runs.after["killed"]
  assert max(at_kill["checkpoints"]) == 6
  assert max(at_kill["logged"]) > 6  # logged past the last checkpoint: resume drops them
  _, reference_6 = _restore_state(runs.reference, 6)
  _assert_same_state(runs.killed_state_6, reference_6)


def test_resume_after_sigkill_and_a_corrupt_latest_checkpoint_is_bitwise_exact(runs: Runs):
  output = runs.output["killed_resumed"]
  assert runs.status["killed_resumed"] == 0, output[-3000:]
  assert "checkpoint step 6 is corrupt (" in output
  assert "deleting corrupt checkpoint step 6; resuming from step 3" in output
  assert f"resumed {runs.killed} at step 3" in output
  _assert_same_run(runs.killed, runs.reference)


# ---------------------------------------------------------------------------
# 2. Corrupt and mismatched checkpoints


@pytest.mark.parametrize("mode", ["truncate", "delete"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, caplog, mode):
  run = tmp_path / "seed_0"
  shutil.copytree(reference, run)
  _corrupt(run / "checkpoints" / str(TOTAL_STEPS), mode)
  caplog.set_level(logging.WARNING)
  restored = checkpoint.restore_for_inference(run, "latest")
  assert restored.step == 2 * STEPS_PER_EPOCH
  warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
  assert len(warnings) == 1
  assert warnings[0].startswith(f"checkpoint step {TOTAL_STEPS} in {run} is corrupt (")
  assert "\n" not in warnings[0]
  _, good = _restore_state(reference, 2 * STEPS_PER_EPOCH)
  for a, b in zip(jax.tree.leaves(restored.variables["params"]), jax.tree.leaves(good["params"]),
                  strict=True):
    assert np.array_equal(a, b)


def _restore_latest(study: Study, config: ml_collections.ConfigDict, run: Path) -> dict | None:
  """``Checkpointer.restore_latest`` as :func:`train.run` calls it on resume.

  The abstract state comes from ``jax.eval_shape`` (nothing is compiled) and
  the data iterator is a fresh one over the run's training records.
  """
  model = kinds.build_model(config.model)
  optimizer = train.make_optimizer(config.train, total_steps=1)  # the state shape only
  shape = tuple(int(s) for s in config.data.shape)
  abstract = jax.eval_shape(train.make_init(model, optimizer, sharding.make_mesh(), shape),
                            config.seed)
  train_records = records.split_records(records.load_records(study.manifest, config))["train"]
  data_iter = pipeline.make_train_iterator(train_records, config, seed=config.seed,
                                           batch_size_per_process=config.train.batch_size)
  ckpt = checkpoint.Checkpointer(run, keep=config.train.checkpoint_keep)
  try:
    return ckpt.restore_latest(abstract, data_iter, config)
  finally:
    ckpt.close()


def test_matching_config_restores_the_latest_state(study, reference, tmp_path):
  run = tmp_path / "seed_0"
  shutil.copytree(reference, run)
  state = _restore_latest(study, study.config(), run)
  _, expected = _restore_state(reference)
  _assert_same_state(state, expected)
  assert int(state["step"]) == TOTAL_STEPS


@pytest.mark.parametrize("field, value", [
    ("model.kind", "strong"), ("model.base_filters", 4), ("model.depth", 2),
    ("train.optimizer", "adadelta"), ("model.norm", "group"), ("train.learning_rate", 0.5)])
def test_resume_with_a_mismatched_config_is_a_checkpoint_error(study, reference, tmp_path,
                                                                field, value):
  run = tmp_path / "seed_0"
  shutil.copytree(reference, run)
  config = study.config()
  section, name = field.split(".")
  old = config[section][name]
  config[section][name] = value
  with pytest.raises(CheckpointError) as err:
    _restore_latest(study, config, run)
  assert str(err.value) == (
      f"{run / 'checkpoints'}: checkpoint was trained with {field}={old!r} but the config "
      f"asks for {value!r}; use a fresh --workdir or the original config")
  assert _checkpoint_steps(run) == [3, 6, 9]


def test_no_restorable_checkpoint_is_a_checkpoint_error(study, reference, tmp_path, caplog):
  run = tmp_path / "seed_0"
  shutil.copytree(reference, run)
  for step in _checkpoint_steps(run):
    _corrupt(run / "checkpoints" / str(step), "delete")
  caplog.set_level(logging.WARNING)
  with pytest.raises(CheckpointError, match=r"no restorable checkpoint \(steps \[9, 6, 3\]"):
    _restore_latest(study, study.config(), run)
  assert _checkpoint_steps(run) == [3, 6, 9]  # nothing deleted
  warned = {r.getMessage().split(" is corrupt")[0] for r in caplog.records
            if "is corrupt" in r.getMessage()}
  assert warned == {f"checkpoint step {s}" for s in (3, 6, 9)}


# ---------------------------------------------------------------------------
# 3. The malformed-input corpus in the batch commands


@pytest.fixture(scope="module")
def corpus(study: Study) -> dict[str, Any]:
  """The malformed scans, label maps and manifests (tests/malformed.py)."""
  scans = malformed.write_scan_corpus(study.root / "corpus", study.manifest.parent /
                                      "s00_flair.nii.gz")
  manifests = malformed.write_manifest_corpus(study.root / "corpus_manifests",
                                              study.manifest.parent / "s00_flair.nii.gz")
  return {"scans": scans, "manifests": manifests}


@pytest.fixture
def unreadable(corpus, monkeypatch) -> None:
  """The unreadable case is chmod 000; root reads it anyway, so deny it here."""
  denied = malformed.unreadable_paths(corpus["scans"])
  real_access = os.access

  def access(path, mode, **kwargs):
    return False if os.fspath(path) in denied else real_access(path, mode, **kwargs)

  monkeypatch.setattr(os, "access", access)


def test_corpus_has_at_least_15_kinds(corpus):
  kinds = [c.kind for c in corpus["scans"]] + [c.kind for c in corpus["manifests"]]
  assert len(set(kinds)) == len(kinds) >= 15
  assert len(kinds) == 27


def _partial_files(folder: Path) -> list[str]:
  """Temp files (hidden or ``*.tmp``) anywhere under ``folder``."""
  return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.filterwarnings("ignore:pixdim")
def test_cache_reports_each_bad_scan_and_keeps_the_others(study, corpus, unreadable, tmp_path,
                                                          capsys):
  data = study.manifest.parent
  good = [{"subject_id": f"g{i}", "scan_id": f"good{i}",
           "image": str(data / f"s0{i}_flair.nii.gz"), "mask": str(data / f"s0{i}_wmh.nii.gz")}
          for i in (0, 1)]
  bad = [{"subject_id": c.kind, "scan_id": c.kind, "image": str(c.image),
          "mask": str(c.mask) if c.mask else ""} for c in corpus["scans"]]
  folder = tmp_path / "cache"
  spec = records.preprocess_spec(study.config())
  got, failures = cache.preprocessed_records([good[0], *bad, good[1]], spec, folder, workers=1)
  assert [r["scan_id"] for r in got] == ["good0", "good1"]
  assert len(failures) == len(corpus["scans"])
  for case, line in zip(corpus["scans"], failures):
    assert line.startswith(f"{case.culprit}: ") and case.reason in line, (case.kind, line)
    assert "\n" not in line
  reported = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("skipped ")]
  assert reported == [f"skipped {line}" for line in failures]
  assert sorted(os.listdir(folder)) == sorted(Path(r["path"]).name for r in got)
  for record in got:
    with np.load(record["path"], allow_pickle=False) as entry:
      assert entry["image"].shape == spec.shape and entry["mask"].shape == spec.shape


@pytest.mark.filterwarnings("ignore:pixdim")
def test_predict_reports_each_bad_scan_and_writes_the_others(reference, study, corpus,
                                                             unreadable, tmp_path, capsys):
  data = study.manifest.parent
  cases = [c for c in corpus["scans"] if c.mask is None and c.kind != "folder"]
  good = [str(data / "s01_flair.nii.gz"), str(data / "s02_flair.nii.gz")]
  paths = [good[0], *(str(c.image) for c in cases), good[1]]
  out = tmp_path / "preds"
  assert predict.main([f"--checkpoints={reference}", f"--out={out}", *paths]) == 1
  err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
  column = f"{reference.parent.name}_{reference.name}_volume_ml"
  with (out / predict.CSV_NAME).open() as f:
    rows = list(csv.DictReader(f))
  assert [r["path"] for r in rows] == paths
  folders = [item.folder for item in predict.collect_inputs(paths)]
  for row, folder in ((rows[0], folders[0]), (rows[-1], folders[-1])):
    assert row["status"] == "ok" and np.isfinite(float(row[column]))
    done = json.loads((out / folder / predict.DONE).read_text())
    assert sorted(os.listdir(out / folder)) == sorted([predict.DONE, *done["files"]])
  for case, row, folder in zip(cases, rows[1:-1], folders[1:-1]):
    assert case.reason in row["status"] and "\n" not in row["status"], (case.kind, row)
    assert row[column] == ""
    assert [line for line in err if line.startswith(f"{case.image}: ")] == \
        [f"{case.image}: {row['status']}"], case.kind
    assert not (out / folder).exists(), case.kind
  assert not _partial_files(out)


def test_bad_manifests_stop_training_data_and_predict_with_one_line(reference, study, corpus,
                                                                     tmp_path, capsys):
  good = str(study.manifest.parent / "s01_flair.nii.gz")
  for case in corpus["manifests"]:
    with pytest.raises(ManifestError) as err:
      records.load_records(case.path, study.config())
    assert str(err.value).startswith(f"{case.path}: {case.reason}"), case.kind
    assert "\n" not in str(err.value)
    out = tmp_path / case.kind
    assert predict.main([f"--checkpoints={reference}", f"--out={out}", good,
                         str(case.path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {err.value}", case.kind
    assert not out.exists()


# ---------------------------------------------------------------------------
# 4. Determinism


def test_same_seed_gives_identical_metrics_logs(runs: Runs):
  logs_ = [(run / "metrics.jsonl").read_bytes() for run in (runs.reference, runs.stopped,
                                                            runs.killed)]
  assert logs_[0] == logs_[1] == logs_[2]
  assert len(logs_[0].splitlines()) == TOTAL_STEPS + EPOCHS  # one per step and validation


# ---------------------------------------------------------------------------
# 5. Non-finite loss


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_a_clean_log(runs: Runs):
  assert runs.status["poisoned"] == 1
  assert (f"error: {runs.killed}: non-finite loss nan at step {NAN_STEP}; stopped. "
          "Last good checkpoint: step 3") in runs.output["poisoned"].splitlines()
  records_ = [json.loads(line) for line in runs.poisoned_metrics.splitlines()]
  assert [r["step"] for r in records_ if "epoch" not in r] == list(range(1, NAN_STEP))
  assert all(math.isfinite(v) for r in records_ for v in r.values())
  reference_lines = (runs.reference / "metrics.jsonl").read_text().splitlines()
  assert runs.poisoned_metrics.splitlines() == reference_lines[:len(records_)]
  assert runs.after["poisoned"]["checkpoints"] == [3]
  assert runs.poisoned_latest.step == 3
  _, good = _restore_state(runs.reference, 3)
  for a, b in zip(jax.tree.leaves(runs.poisoned_latest.variables["params"]),
                  jax.tree.leaves(good["params"]),
                  strict=True):
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# 6. Files: nothing unpickled, plain-data checkpoints, atomic writes


def _unpickle_scan(root: Path) -> dict:
  """``tests/unpickle_scan.py`` on ``root``, in a fresh interpreter (see its docstring)."""
  result = subprocess.run([sys.executable, str(REPO / "tests" / "unpickle_scan.py"), str(root)],
                          capture_output=True, text=True, timeout=120, check=True)
  return json.loads(result.stdout)


def test_package_never_unpickles(tmp_path):
  planted = tmp_path / "pkg"
  planted.mkdir()
  (planted / "bad.py").write_text("import pickle\nimport numpy as np\n"
                                  "x = np.load('a.npy', allow_pickle=True)\n")
  assert len(_unpickle_scan(planted)["offenders"]) == 2  # the scan does find offences
  found = _unpickle_scan(REPO / "wmh_jax")
  assert found["offenders"] == []
  assert found["np_loads"] >= 3  # the scan sees the cache readers (np.load's default: no pickles)


def _plain_kind(path: Path) -> str | None:
  """What a checkpoint file holds, if it is plain data: json, text, ocdbt or zstd."""
  raw = path.read_bytes()
  if raw.startswith(b"\x0c\xdb"):
    return "ocdbt"
  if raw.startswith(b"\x28\xb5\x2f\xfd"):
    return "zstd"
  if path.name == "commit_success.txt":
    return "text"
  try:
    json.loads(raw)
    return "json"
  except ValueError:
    return None


def test_checkpoints_and_config_are_plain_data(study, reference):
  for step in _checkpoint_steps(reference):
    folder = reference / "checkpoints" / str(step)
    kinds = {str(p.relative_to(folder)): _plain_kind(p) for p in folder.rglob("*") if p.is_file()}
    assert None not in kinds.values(), kinds
    assert kinds["config/metadata"] == kinds["data_iter/process_0-of-1.json"] == "json"
    stored = json.loads((folder / "config" / "metadata").read_text())
    config = study.config()
    assert stored == json.loads(config.to_json())
    assert ml_collections.ConfigDict(stored).model.to_dict() == config.model.to_dict()
  entry = next(study.cache_dir.glob("*.npz"))
  with np.load(entry, allow_pickle=False) as data:
    assert all(data[name].dtype != object for name in data.files)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_save_nifti_leaves_no_partial_file(tmp_path, monkeypatch, error):
  old = tmp_path / "map.nii.gz"
  nifti.save_nifti(old, np.ones((4, 4, 4), np.float32), np.eye(4))
  before = old.read_bytes()

  def broken_save(img, filename):
    Path(filename).write_bytes(b"\x1f\x8b half a file")
    raise error

  monkeypatch.setattr(nifti.nib, "save", broken_save)
  for target in (old, tmp_path / "new.nii"):
    with pytest.raises(type(error)):
      nifti.save_nifti(target, np.zeros((4, 4, 4), np.float32), np.eye(4))
  assert old.read_bytes() == before
  assert os.listdir(tmp_path) == ["map.nii.gz"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_write_manifest_leaves_no_partial_file(tmp_path, error):
  class Exploding:
    def __str__(self) -> str:
      raise error

  rows = [{"subject_id": "s1", "scan_id": "a", "image": str(tmp_path / "a.nii.gz")}]
  target = tmp_path / "manifest.csv"
  manifest.write_manifest(target, rows)
  before = target.read_bytes()
  for path in (target, tmp_path / "new.csv"):
    with pytest.raises(type(error)):
      manifest.write_manifest(path, rows + [{**rows[0], "scan_id": "b", "site": Exploding()}])
  assert target.read_bytes() == before
  assert os.listdir(tmp_path) == ["manifest.csv"]


def test_resumed_metrics_log_drops_torn_and_later_lines(tmp_path):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-write
  logs._truncate_after(path, 4)  # pylint: disable=protected-access  # MetricLogger's resume step
  assert path.read_text() == "\n".join(lines[:4]) + "\n"
  assert os.listdir(tmp_path) == ["metrics.jsonl"]
