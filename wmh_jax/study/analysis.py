"""Study analysis: trained runs → per-scan predictions → tables, figures, REPORT.md.

Orchestration only: networks are restored by :mod:`wmh_jax.inference.restore`, test
sets resolved by :func:`wmh_jax.data.records.evaluation_sets`, each scan scored
by :mod:`wmh_jax.study.scans`, the baselines fitted by
:mod:`wmh_jax.study.floors`, the tables built by
:mod:`wmh_jax.study.tables` and the figures by
:mod:`wmh_jax.study.figures`; :mod:`wmh_jax.study.report` writes them out.
Usage and outputs: README.md, "Analysis".
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import tqdm
from absl import flags
from jax.sharding import Mesh

from wmh_jax.data import records
from wmh_jax.errors import WMHError
from wmh_jax.evaluation import conformal, ood
from wmh_jax.inference import restore
from wmh_jax.models import kinds
from wmh_jax.runtime import checkpoint, cli, fileio, sharding
from wmh_jax.study import (figures as figures_lib, floors as floors_lib, report, scans,
                           tables as tables_lib)


def predict_network(network: restore.Network, sets: dict[str, list[dict]], mesh: Mesh,
                    reference: ood.Reference | None = None, covariates: Sequence[str] = ()
                    ) -> list[dict]:
  """Per-scan rows (:func:`wmh_jax.study.scans.scan_row`, with ``ood_score`` from
  ``reference`` and the manifest ``covariates`` as ``cov_<name>``) of one network on each
  test set, in set and record order."""
  rows = []
  for dataset, recs in sets.items():
    for record, out in tqdm.tqdm(restore.predict_records(network, recs, mesh),
                                 total=len(recs), desc=f"{network.group} seed {network.seed} "
                                 f"{dataset}", unit="scan", file=sys.stderr, leave=False):
      row = scans.scan_row(network, dataset, record, out, reference)
      row.update({tables_lib.COVARIATE_PREFIX + name: record.get(name) for name in covariates})
      rows.append(row)
  return rows


def val_predictions(network: restore.Network, mesh: Mesh) -> dict | None:
  """The network's validation predictions: those its training stored for the restored
  checkpoint, else predicted now on its validation split (runs trained before they were
  stored). None for a model without a volume (severity)."""
  if network.val_predictions is not None:
    return network.val_predictions
  if not kinds.get(network.kind).predicts_volume:
    return None
  val = records.split_records(records.load_records(records.training_manifest(network.config),
                                                   network.config))["val"]
  rows = [scans.scan_row(network, "val", record, out)
          for record, out in restore.predict_records(network, val, mesh)]
  return {"scan_id": [r["scan_id"] for r in rows],
          "annotated_ml": [r["annotated_ml"] for r in rows],
          "predicted_ml": [r["predicted_ml"] for r in rows]}


def interval_calibrations(networks: Sequence[restore.Network], mesh: Mesh,
                          level: float = conformal.DEFAULT_LEVEL
                          ) -> dict[tuple[str, str], conformal.Calibration]:
  """(run, score) → the calibration of each volume run's seed ensemble, for every score."""
  stored = {n.name: val_predictions(n, mesh) for n in networks}
  result = {}
  for group, members in restore.group_networks(networks).items():
    for score in conformal.SCORES:
      calibration = conformal.ensemble_calibration([stored[m.name] for m in members], level,
                                                   score)
      if calibration is not None:
        result[(group, score)] = calibration
  return result


def ood_reference(network: restore.Network, mesh: Mesh) -> ood.Reference | None:
  """The network's training feature distribution (`evaluation.ood`): the one its training
  stored for the restored checkpoint, else fitted now on its training split (older runs).
  None for kinds without a volume head."""
  if not kinds.get(network.kind).volume_head:
    return None
  if network.ood_reference is not None:
    return network.ood_reference
  train = records.split_records(records.load_records(records.training_manifest(network.config),
                                                     network.config))["train"]
  return ood.Reference.fit(np.stack([out["pooled"] for _, out in
                                     restore.predict_records(network, train, mesh)]))


def store_calibration(network: restore.Network, mesh: Mesh) -> Path | None:
  """Writes the validation predictions and OOD reference of a run trained before training
  stored them (`train.write_val_predictions`'s file, for the restored checkpoint), so
  that predict gives it intervals (and, with a volume head, OOD scores). Returns the file,
  or None when the run has one already or predicts no volume."""
  if network.val_predictions is not None or not kinds.get(network.kind).predicts_volume:
    return None
  record = {"step": network.step, **val_predictions(network, mesh)}
  reference = ood_reference(network, mesh)
  if reference is not None:
    record["ood"] = reference.to_json()
  path = checkpoint.val_predictions_path(network.workdir, network.step)
  path.parent.mkdir(exist_ok=True)
  fileio.atomic_write_text(path, json.dumps(record))
  return path


def network_evaluation_sets(networks: Sequence[restore.Network],
                            datasets: Sequence[str] | None) -> list[dict[str, list[dict]]]:
  """:func:`wmh_jax.data.records.evaluation_sets` of each network, resolved once per
  data config.

  Raises:
    WMHError: a requested dataset that no run has.
  """
  cached: dict[str, dict[str, list[dict]]] = {}
  sets = []
  for network in networks:
    key = network.config.data.to_json(sort_keys=True)
    if key not in cached:
      cached[key] = records.evaluation_sets(network.config, datasets)
    sets.append(cached[key])
  missing = [d for d in datasets or [] if not any(d in s for s in sets)]
  if missing:
    raise WMHError(None, f"no run has the dataset(s) {missing}")
  return sets


def run_analysis(run_paths: Sequence[str | Path], out: str | Path,
                 datasets: Sequence[str] | None = None, n_boot: int = 1000,
                 boot_seed: int = 0, seeds: Collection[int] | None = None,
                 covariates: Sequence[str] = ()) -> dict[str, Path]:
  """Restores every run (only ``seeds``, if given), predicts every test set and
  writes the study to ``out``.

  Returns:
    Name → path of every written file (``predictions``, ``report``, tables
    as ``table:<name>``, figures as ``figure:<name>``).

  Raises:
    WMHError: unreadable runs (:func:`wmh_jax.inference.restore.load_networks`) or see
      :func:`network_evaluation_sets`.
  """
  mesh = sharding.make_mesh()
  networks = restore.load_networks(run_paths, mesh, seeds=seeds)
  sets = network_evaluation_sets(networks, datasets)
  floors = floors_lib.fit_floors(networks, sets)
  references = {n.name: ood_reference(n, mesh) for n in networks}
  rows = [row for network, mine in zip(networks, sets)
          for row in predict_network(network, mine, mesh, references[network.name],
                                     covariates)]
  rows += [row for floor in dict.fromkeys(floors.values())
           for row in floors_lib.baseline_rows(floor)]
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  written = {"predictions": out / "predictions.csv"}
  fileio.write_csv(written["predictions"], scans.present_columns(rows), rows)
  tables = {"networks": tables_lib.networks_table(networks),
            **tables_lib.summarise(rows, n_boot, boot_seed, covariates)}
  tables["baselines"] = tables_lib.floor_table(tables["icc_mean"], floors)
  tables["coverage"] = tables_lib.coverage_table(rows, interval_calibrations(networks, mesh))
  thresholds = {group: ood.ensemble_threshold([references[m.name] for m in members])
                for group, members in restore.group_networks(networks).items()
                if references[members[0].name] is not None}
  if thresholds:
    tables["ood"] = tables_lib.ood_table(rows, thresholds, records.LOCAL)
  domain_runs = {n.group for n in networks if n.config.augment.get("domain", {}).get("enabled")}
  if domain_runs:
    tables["domain_effect"] = tables_lib.domain_effect_table(tables["icc_mean"], domain_runs)
  for table in tables.values():
    written[f"table:{table.name}"] = report.write_table(out / "tables", table)[0]
  figures = figures_lib.write_figures(
      out, rows, tables["icc"], figures_lib.example_figure_data(networks, sets, mesh),
      figures_lib.learning_curves(networks))
  written.update({f"figure:{name}": path for name, path in figures.items()})
  written["report"] = report.write_report(out, tables, figures)
  return written


def define_flags(values: flags.FlagValues) -> None:
  """The command's flags (on its own ``FlagValues``: `runtime.cli.parse_command`)."""
  flags.DEFINE_string("runs", None, "comma-separated training workdirs (seed sweeps or single "
                      "runs)", required=True, flag_values=values)
  flags.DEFINE_string("out", None, "output folder (required unless --store_calibration)",
                      flag_values=values)
  flags.DEFINE_string("datasets", "", f"comma-separated test sets (default: all; e.g. "
                      f"{records.LOCAL},{','.join(records.EXTERNAL_DOMAINS)})",
                      flag_values=values)
  flags.DEFINE_string("seeds", "", "comma-separated seeds to analyse (default: every seed_* "
                      "run)", flag_values=values)
  flags.DEFINE_integer("n_boot", 1000, "bootstrap resamples per CI", flag_values=values)
  flags.DEFINE_integer("boot_seed", 0, "bootstrap seed", flag_values=values)
  flags.DEFINE_string("covariates", "", "comma-separated manifest columns added to the "
                      "confounder regression (numeric, or categorical such as sex or site)",
                      flag_values=values)
  flags.DEFINE_bool("store_calibration", False, "only store, in each older run (trained before "
                    "they were kept), its validation predictions and OOD reference for "
                    "predict's intervals and OOD flags; no report", flag_values=values)


def _seeds(flag: str) -> list[int] | None:
  try:
    return [int(s) for s in flag.split(",") if s] or None
  except ValueError:
    raise WMHError(None, f"--seeds={flag!r}: expected comma-separated integers") from None


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns the exit code (0 ok, 2 bad runs or datasets)."""
  args, _ = cli.parse_command(
      "python -m wmh_jax.analysis", "Evaluate trained runs on their test sets; write tables, "
      "figures, REPORT.md.", define_flags, argv)
  runs = [p for p in args.runs.split(",") if p]
  datasets = [d for d in args.datasets.split(",") if d] or None
  try:
    if not runs:
      raise WMHError(None, "--runs is empty")
    if args.out is None and not args.store_calibration:
      raise WMHError(None, "--out is required")
    seeds = _seeds(args.seeds)
    if args.store_calibration:
      mesh = sharding.make_mesh()
      for network in restore.load_networks(runs, mesh, seeds=seeds):
        path = store_calibration(network, mesh)
        print(f"{network.name}: " + (f"wrote {path}" if path else "nothing to store"))
      return 0
    covariates = [c for c in args.covariates.split(",") if c]
    written = run_analysis(runs, Path(args.out), datasets, args.n_boot, args.boot_seed, seeds,
                           covariates)
  except WMHError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"analysis: {len(written)} files under {args.out}; see {written['report']}", flush=True)
  return 0

