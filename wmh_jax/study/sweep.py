"""One command for the whole study: train every experiment x seed, then analyse.

Usage::

  python -m wmh_jax.study --config=experiments/study.py:cpu [--workdir=runs/study]
      [--out=<workdir>/report] [--config.seeds=0,1] [--config.data.manifest=my.csv]

Runs go to ``<workdir>/<experiment>/seed_<n>`` (the layout of ``wmh_jax.main
--seeds``), so each experiment folder is a seed sweep that
``python -m wmh_jax.analysis`` reads. The report (:func:`wmh_jax.study.analysis.run_analysis`:
``predictions.csv``, ``tables/``, ``figures/``, ``REPORT.md``) goes to ``--out``.

Resumable: a finished run (``final_metrics.json`` written and the stored config
equal to the one asked for) is skipped, an interrupted one resumes from its
latest checkpoint, and the analysis is redone (minutes). A run that fails
(e.g. a non-finite loss) is reported and the others go on; the analysis then
uses the seeds that finished in every experiment, so that experiments are
compared on the same seeds, and the command exits with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from absl import app, flags

from wmh_jax import configs
from wmh_jax.errors import CheckpointError, WMHError
from wmh_jax.runtime import checkpoint, cli, fileio
from wmh_jax.study import analysis
from wmh_jax.training import train

DATA_OVERRIDES = ("manifest", "external_manifests", "cohort_dir", "cache_dir")


@dataclasses.dataclass(frozen=True)
class Run:
  """One experiment x seed of the study."""
  experiment: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: Path


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What happened to one run: ``status`` is trained, skipped or failed."""
  run: Run
  status: str
  seconds: float
  metrics: dict[str, float]
  error: str = ""


def experiments(study: ml_collections.ConfigDict) -> dict[str, str]:
  """``study.experiments`` (``"name=path.py[:arg]"`` strings) as name → spec, in order.

  Raises:
    WMHError: an entry without a name, or a name given twice.
  """
  specs: dict[str, str] = {}
  for entry in study.experiments:
    name, sep, spec = entry.partition("=")
    if not sep or not name or not spec:
      raise WMHError(None, f"config.experiments entry {entry!r}: expected 'name=path.py[:arg]'")
    if name in specs:
      raise WMHError(None, f"config.experiments names {name!r} twice")
    specs[name] = spec
  return specs


def plan(study: ml_collections.ConfigDict, workdir: str | Path) -> list[Run]:
  """Every experiment x seed, in config order, with the study's data overrides."""
  runs = []
  for name, spec in experiments(study).items():
    for seed in study.seeds:
      config = configs.load_config_file(spec)
      for field in DATA_OVERRIDES:
        if study.data[field]:
          config.data[field] = study.data[field]
      config.seed = int(seed)
      runs.append(Run(name, int(seed), config, Path(workdir) / name / f"seed_{seed}"))
  return runs


def _sections(config: ml_collections.ConfigDict) -> dict:
  """Top-level config sections as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json(sort_keys=True))


def finished_metrics(run: Run) -> dict[str, float] | None:
  """The final validation metrics of a finished run, None if it has not finished.

  Raises:
    CheckpointError: the run finished with a different config than ``run.config``.
  """
  final = run.workdir / "final_metrics.json"
  if not final.exists():
    return None
  stored = checkpoint.stored_config(run.workdir)
  changed = configs.changed_fields(stored, _sections(run.config))
  if changed:
    raise CheckpointError(run.workdir, f"finished with a different config ({', '.join(changed)} "
                          "differ); use a fresh --workdir or the original config")
  return json.loads(final.read_text())


def _eta(done: Sequence[float], remaining: int) -> str:
  if not done:
    return "?"
  return f"{sum(done) / len(done) * remaining / 60:.0f} min"


def train_all(runs: Sequence[Run]) -> list[Outcome]:
  """Trains each run that has not finished; prints one progress line per run."""
  outcomes: list[Outcome] = []
  trained_seconds: list[float] = []
  start = time.perf_counter()
  programs = train.ProgramCache()  # runs that differ only in seed share one compiled step
  for index, run in enumerate(runs, 1):
    label = f"[{index}/{len(runs)}] {run.experiment} seed {run.seed}"
    began = time.perf_counter()
    try:
      metrics = finished_metrics(run)
      if metrics is not None:
        outcomes.append(Outcome(run, "skipped", 0.0, metrics))
        print(f"{label}: finished earlier, skipped", flush=True)
        continue
      print(f"{label}: training in {run.workdir} (elapsed "
            f"{(began - start) / 60:.0f} min, about {_eta(trained_seconds, len(runs) - index + 1)}"
            " left)", flush=True)
      metrics = train.train_and_evaluate(run.config, run.workdir, programs)
    except WMHError as err:
      outcomes.append(Outcome(run, "failed", time.perf_counter() - began, {}, str(err)))
      print(f"{label}: FAILED: {err}", flush=True)
      continue
    seconds = time.perf_counter() - began
    if metrics.get("preempted"):
      raise SystemExit(f"{label}: stopped by SIGTERM after a checkpoint; run the same "
                       "command again to resume")
    trained_seconds.append(seconds)
    outcomes.append(Outcome(run, "trained", seconds, metrics))
    print(f"{label}: done in {seconds / 60:.1f} min, validation " + ", ".join(
        f"{k}={v:.3f}" for k, v in sorted(metrics.items())), flush=True)
  return outcomes


def common_seeds(outcomes: Sequence[Outcome]) -> list[int]:
  """Seeds that finished (trained or skipped) in every experiment."""
  experiments = {o.run.experiment for o in outcomes}
  return sorted(seed for seed in {o.run.seed for o in outcomes}
                if all(any(o.run.experiment == e and o.run.seed == seed and o.status != "failed"
                           for o in outcomes) for e in experiments))


def write_summary(path: Path, outcomes: Sequence[Outcome], seeds: Sequence[int]) -> None:
  """``study.json``: each run's status, time and validation metrics."""
  runs = [{"experiment": o.run.experiment, "seed": o.run.seed, "workdir": str(o.run.workdir),
           "status": o.status, "train_seconds": round(o.seconds, 1), "val": o.metrics,
           "error": o.error} for o in outcomes]
  fileio.atomic_write_text(path, json.dumps({"analysed_seeds": list(seeds), "runs": runs},
                                            indent=2))


def run_study(study: ml_collections.ConfigDict, workdir: str | Path,
              out: str | Path | None = None) -> int:
  """Trains, analyses and reports; returns the exit status (0 ok, 1 a run failed).

  Raises:
    WMHError: a bad experiment config, a finished run with another config, no
      seed that finished everywhere, or an analysis error.
  """
  workdir = Path(workdir)
  out = Path(out) if out else workdir / "report"
  outcomes = train_all(plan(study, workdir))
  seeds = common_seeds(outcomes)
  workdir.mkdir(parents=True, exist_ok=True)
  write_summary(workdir / "study.json", outcomes, seeds)
  failed = [o for o in outcomes if o.status == "failed"]
  if not seeds:
    raise WMHError(workdir, "no seed finished in every experiment; see study.json")
  print(f"analysis of seeds {seeds} -> {out}", flush=True)
  datasets = [d for d in study.analysis.datasets.split(",") if d] or None
  written = analysis.run_analysis([workdir / name for name in experiments(study)], out,
                                  datasets, study.analysis.n_boot, study.analysis.boot_seed,
                                  seeds)
  print(f"study: report {written['report']}", flush=True)
  for o in failed:
    print(f"study: {o.run.experiment} seed {o.run.seed} failed and was left out: {o.error}",
          file=sys.stderr, flush=True)
  return 1 if failed else 0


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Study config (experiments/study.py[:cpu]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "runs/study", "Folder of the runs (<experiment>/seed_<n>).")
  flags.DEFINE_string("out", None, "Report folder (default <workdir>/report).")
  flags.mark_flags_as_required(["config"])
  cli.define_runtime_flags(cpu_devices=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.start_from_flags()
  try:
    code = run_study(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.out)
  except WMHError as err:
    sys.exit(f"error: {err}")
  sys.exit(code)

