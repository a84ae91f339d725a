"""The study's summary tables, from the per-scan ``predictions.csv`` rows.

Every table is a :class:`wmh_jax.study.results.Table`; :func:`summarise` builds them
all, :func:`floor_table` compares networks with the baselines
(:mod:`wmh_jax.study.floors`) and :func:`networks_table` lists the
restored checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from wmh_jax.data import manifest, records
from wmh_jax.evaluation import conformal, metrics, ood, stats
from wmh_jax.inference import restore
from wmh_jax.models import kinds
from wmh_jax.study import floors as floors_lib
from wmh_jax.study.results import Table
from wmh_jax.study.scans import CHALLENGE

def group_rows(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
  """Rows grouped by the values of ``keys``, groups in order of first appearance."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return groups


def is_number(value: Any) -> bool:
  return value is not None and math.isfinite(float(value))


def _values(rows: Sequence[dict], column: str) -> np.ndarray:
  """``(n,)`` float64 of a column over ``rows`` (None → NaN)."""
  return np.array([math.nan if r.get(column) is None else float(r[column]) for r in rows],
                  np.float64)


def _mean(values: Sequence[float] | np.ndarray) -> float:
  """Mean of the finite values; NaN when there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def _agreement(fn: Callable, a: np.ndarray, b: np.ndarray) -> float:
  """``fn(a, b)`` (an ICC) over the scans where both are finite; NaN below 2 scans."""
  ok = np.isfinite(a) & np.isfinite(b)
  return float(fn(a[ok], b[ok])) if ok.sum() >= 2 else math.nan


def _icc_row(group: Sequence[dict], n_boot: int, seed: int) -> dict[str, Any]:
  annotated, predicted = _values(group, "annotated_ml"), _values(group, "predicted_ml")
  ok = np.isfinite(annotated) & np.isfinite(predicted)
  low = high = math.nan
  if ok.sum() >= 2:
    low, high = stats.bootstrap_ci(metrics.icc_2_1, annotated[ok], predicted[ok],
                                   n_boot=n_boot, seed=seed, vectorized=True)
  return {"n": int(ok.sum()),
          "icc_2_1": _agreement(metrics.icc_2_1, annotated, predicted),
          "icc_2_1_ci_low": low, "icc_2_1_ci_high": high,
          "icc_3_1": _agreement(metrics.icc_3_1, annotated, predicted),
          "icc_2_1_soft": _agreement(metrics.icc_2_1, annotated,
                                     _values(group, "predicted_soft_ml")),
          "mean_dice": _mean(_values(group, "dice")),
          "mean_attention_dice": _mean(_values(group, "attention_dice"))}


def _labels(kind: str) -> str | None:
  """What a row's model kind learns from (`wmh_jax.models.kinds.Kind.labels`: "volume" for
  weak labels, "mask" for strong ones, ...); None for a baseline row."""
  return kinds.get(kind).labels if kind in kinds.REGISTRY else None


def _rows_of(by_run: Mapping[tuple[str, str], list[dict]], run: str) -> list[dict]:
  """The rows of ``run`` in rows grouped by (run, kind)."""
  return next(rows for (name, _), rows in by_run.items() if name == run)


def icc_table(rows: Sequence[dict], n_boot: int, seed: int) -> Table:
  """ICC(2,1) (5–95 % bootstrap CI), ICC(3,1) and mean Dice per network and dataset.

  Severity models (no volume) are left out. ``icc_2_1_soft`` uses the soft
  (summed probability) volume of segmentation models.
  """
  table = []
  keys = ("run", "kind", "seed", "dataset")
  for (run, kind, seed_, dataset), group in group_rows(rows, keys).items():
    if _labels(kind) != "severity":
      table.append({"run": run, "kind": kind, "seed": seed_, "dataset": dataset,
                    **_icc_row(group, n_boot, seed)})
  columns = ["run", "kind", "seed", "dataset", "n", "icc_2_1", "icc_2_1_ci_low",
             "icc_2_1_ci_high", "icc_3_1", "icc_2_1_soft", "mean_dice", "mean_attention_dice"]
  return Table("icc", "Volume agreement and Dice per network (seed) and dataset", columns,
               table, note=f"CI: 5th–95th percentile of {n_boot} bootstrap resamples of "
               f"the scans (seed {seed}). Dice on the model grid; for weak networks the "
               "Dice is that of the thresholded attention map.")


def icc_mean_table(icc: Table) -> Table:
  """The per-network ICC table averaged over seeds (``icc_2_1_sd``: SD over seeds)."""
  table = []
  for (run, kind, dataset), group in group_rows(icc.rows, ("run", "kind", "dataset")).items():
    values = _values(group, "icc_2_1")
    table.append({"run": run, "kind": kind, "dataset": dataset, "seeds": len(group),
                  "icc_2_1": float(values.mean()),
                  "icc_2_1_sd": float(values.std(ddof=1)) if len(group) > 1 else math.nan,
                  "icc_3_1": float(_values(group, "icc_3_1").mean()),
                  "mean_dice": float(_values(group, "mean_dice").mean()),
                  "mean_attention_dice": float(_values(group, "mean_attention_dice").mean())})
  columns = ["run", "kind", "dataset", "seeds", "icc_2_1", "icc_2_1_sd", "icc_3_1",
             "mean_dice", "mean_attention_dice"]
  return Table("icc_mean", "Volume agreement and Dice, mean over seeds", columns, table)


def comparison_table(icc_mean: Table) -> Table:
  """Weak − strong seed-mean ICC(2,1) for every (weak run, strong run) pair and dataset."""
  by_run = group_rows(icc_mean.rows, ("run", "kind"))
  weak = [run for run, kind in by_run if _labels(kind) == "volume"]
  strong = [run for run, kind in by_run if _labels(kind) == "mask"]
  table = []
  for w in weak:
    for s in strong:
      strong_icc = {r["dataset"]: r["icc_2_1"] for r in _rows_of(by_run, s)}
      for r in _rows_of(by_run, w):
        if r["dataset"] in strong_icc:
          table.append({"dataset": r["dataset"], "weak_run": w, "strong_run": s,
                        "weak_icc_2_1": r["icc_2_1"], "strong_icc_2_1": strong_icc[r["dataset"]],
                        "difference": r["icc_2_1"] - strong_icc[r["dataset"]]})
  note = "" if table else "Needs at least one weak and one strong run on a common dataset."
  return Table("comparison", "Weak vs strong labels: ICC(2,1), mean over seeds",
               ["dataset", "weak_run", "strong_run", "weak_icc_2_1", "strong_icc_2_1",
                "difference"], table, note=note)


def domain_effect_table(icc_mean: Table, domain_runs: Collection[str]) -> Table:
  """With minus without domain randomisation: seed-mean ICC(2,1) and Dice per dataset.

  Pairs every run in ``domain_runs`` (trained with ``augment.domain.enabled``)
  with every run of the same kind trained without it. Empty when there is no
  such pair.
  """
  by_run = group_rows(icc_mean.rows, ("run", "kind"))
  table = []
  for (run, kind), mine in by_run.items():
    if run not in domain_runs:
      continue
    for (other, other_kind), theirs in by_run.items():
      if other_kind != kind or other in domain_runs:
        continue
      without = {r["dataset"]: r for r in theirs}
      for r in mine:
        if r["dataset"] in without:
          base = without[r["dataset"]]
          table.append({"dataset": r["dataset"], "kind": kind, "run": other,
                        "domain_run": run, "icc_2_1": base["icc_2_1"],
                        "domain_icc_2_1": r["icc_2_1"],
                        "icc_difference": r["icc_2_1"] - base["icc_2_1"],
                        "mean_dice": base["mean_dice"], "domain_mean_dice": r["mean_dice"]})
  return Table("domain_effect", "Domain randomisation: with minus without, mean over seeds",
               ["dataset", "kind", "run", "domain_run", "icc_2_1", "domain_icc_2_1",
                "icc_difference", "mean_dice", "domain_mean_dice"], table)


def challenge_table(rows: Sequence[dict]) -> Table:
  """Means of the challenge metrics per network and dataset (scans with a mask).

  Means are over the scans where a metric is finite (HD95 is NaN for an
  empty segmentation, AVD infinite for an empty reference); ``n`` counts the
  scans with a mask.
  """
  table = []
  keys = ("run", "kind", "seed", "dataset")
  for (run, kind, seed, dataset), group in group_rows(rows, keys).items():
    scored = [r for r in group if is_number(r.get("challenge_dice"))]
    if scored:
      table.append({"run": run, "kind": kind, "seed": seed, "dataset": dataset,
                    "n": len(scored), **{c: _mean(_values(scored, c)) for c in CHALLENGE.values()}})
  return Table("challenge", "WMH-challenge metrics of the model segmentations (means)",
               ["run", "kind", "seed", "dataset", "n", *CHALLENGE.values()], table,
               note="Weak networks are scored on their thresholded attention map.")


COVARIATE_PREFIX = "cov_"


def covariate_columns(group: Sequence[dict], covariates: Sequence[str]
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Regressors of the manifest covariates named in ``covariates`` over ``group``'s rows.

  A covariate whose every value parses as a number is one numeric column; any
  other is categorical, coded as one indicator per level but the first
  (sorted), named ``<name>=<level>``. Rows carry the values as
  ``cov_<name>`` (``analysis --covariates``).

  Returns:
    (name → (n,) values, notes on covariates left out: a missing value, one level).
  """
  columns, notes = {}, []
  for name in covariates:
    values = [r.get(COVARIATE_PREFIX + name) for r in group]
    if any(v is None or str(v).strip() == "" for v in values):
      notes.append(f"covariate {name!r} is missing for some scans: left out")
      continue
    try:
      columns[name] = np.array([float(v) for v in values])
      continue
    except ValueError:
      pass
    levels = sorted({str(v) for v in values})
    if len(levels) < 2:
      notes.append(f"covariate {name!r} has one level ({levels[0]!r}): left out")
      continue
    for level in levels[1:]:
      columns[f"{name}={level}"] = np.array([float(str(v) == level) for v in values])
  return columns, notes


def confounder_table(rows: Sequence[dict], covariates: Sequence[str] = ()) -> Table:
  """Paper §2.4: OLS of annotated on predicted volume, without/with confounders.

  For every weak network on the local test set: the confounder volumes its
  scans all carry (:data:`manifest.CONFOUNDER_COLUMNS` and the total
  intracranial volume ``tiv_ml``), plus the manifest ``covariates`` named
  (:func:`covariate_columns`: numeric, or categorical as indicators).
  ``r_<name>`` is the Pearson r of the annotated volume with each regressor,
  ``p_<name>`` its coefficient's p-value in the full model.
  """
  table, notes, names = [], [], []
  weak_local = [r for r in rows if _labels(r["kind"]) == "volume"
                and r["dataset"] == records.LOCAL]
  for (run, seed), group in group_rows(weak_local, ("run", "seed")).items():
    group = [r for r in group if is_number(r["annotated_ml"]) and is_number(r["predicted_ml"])]
    present = [c for c in (*manifest.CONFOUNDER_COLUMNS, "tiv_ml")
               if all(is_number(r.get(c)) for r in group)]
    confounders = {c: _values(group, c) for c in present}
    extra, skipped = covariate_columns(group, covariates)
    confounders.update(extra)
    notes += [f"{run} seed {seed}: {note}" for note in skipped]
    if not confounders or len(group) < len(confounders) + 3:
      notes.append(f"{run} seed {seed}: " + ("no confounder volumes in the manifest" if not
                   confounders else f"{len(group)} scans are too few for {len(confounders)} "
                   "confounders"))
      continue
    names += [c for c in confounders if c not in names]
    annotated = _values(group, "annotated_ml")
    fit = stats.confounder_regression(annotated, _values(group, "predicted_ml"), confounders)
    pearson = stats.pearson_with_confounders(annotated, confounders)
    table.append({"run": run, "seed": seed,
                  **{k: v for k, v in fit.items() if k != "confounder_p"},
                  **{f"r_{c}": pearson[c] for c in confounders},
                  **{f"p_{c}": fit["confounder_p"][c] for c in confounders}})
  columns = (["run", "seed", "n", "r2_base", "r2_full", "coef_base", "coef_full", "p_base",
              "p_full", "f_confounders", "p_f_confounders", "df_confounders"]
             + [f"r_{c}" for c in names] + [f"p_{c}" for c in names])
  note = "; ".join(notes) or ("" if table else "No weak run on the local test set.")
  return Table("confounders", "Weak networks, local test set: annotated ~ predicted "
               "(+ confounders)", columns, table, note=note)


def dice_vs_icc_table(icc: Table) -> Table:
  """Pearson/Spearman of mean Dice vs ICC(2,1) across networks, per dataset.

  Baselines are left out. Scope ``all`` pools every network with a Dice; with several model kinds,
  each kind also gets its own row. Needs at least 3 networks, else n/a.
  """
  table = []
  for (dataset,), group in group_rows(icc.rows, ("dataset",)).items():
    group = [r for r in group if r["kind"] != floors_lib.BASELINE_KIND and is_number(r["mean_dice"])
             and is_number(r["icc_2_1"])]
    kinds = list(dict.fromkeys(r["kind"] for r in group))
    for scope in ["all"] + (kinds if len(kinds) > 1 else []):
      nets = [r for r in group if scope in ("all", r["kind"])]
      row = {"dataset": dataset, "scope": scope, "networks": len(nets)}
      if len(nets) >= 3:
        row.update(stats.correlation(_values(nets, "mean_dice"), _values(nets, "icc_2_1")))
      table.append(row)
  return Table("dice_vs_icc", "Segmentation (mean Dice) vs volume (ICC(2,1)) across networks",
               ["dataset", "scope", "networks", "pearson_r", "pearson_p", "spearman_rho",
                "spearman_p"], table, note="n/a: fewer than 3 networks.")


def _beats(network: float | None, baseline: float | None) -> str | None:
  """``yes`` when the network's value is higher, ``no`` when not, None when either is missing."""
  if not (is_number(network) and is_number(baseline)):
    return None
  return "yes" if network > baseline else "no"


def floor_table(icc_mean: Table, floors: Mapping[str, floors_lib.Floor]) -> Table:
  """Does each network beat its baselines? Per dataset and network run, seed means.

  ICC(2,1) against both baselines; mean Dice, for networks with a
  segmentation head (`Kind.segmentation_head`), against the intensity
  threshold.

  Args:
    icc_mean: the seed-mean table (:func:`icc_mean_table`), baselines included.
    floors: network run name → its baselines (:func:`fit_floors`).
  """
  by_run = {(r["run"], r["dataset"]): r for r in icc_mean.rows}
  table = []
  for (dataset,), group in group_rows(icc_mean.rows, ("dataset",)).items():
    for network in (r for r in group if r["run"] in floors):
      runs = floors[network["run"]].runs
      intensity = by_run.get((runs["intensity"], dataset), {})
      threshold = by_run.get((runs["threshold"], dataset), {})
      row = {"dataset": dataset, "run": network["run"], "kind": network["kind"],
             "icc_2_1": network["icc_2_1"], "intensity_icc_2_1": intensity.get("icc_2_1"),
             "beats_intensity_icc": _beats(network["icc_2_1"], intensity.get("icc_2_1")),
             "threshold_icc_2_1": threshold.get("icc_2_1"),
             "beats_threshold_icc": _beats(network["icc_2_1"], threshold.get("icc_2_1"))}
      if _labels(network["kind"]) and kinds.get(network["kind"]).segmentation_head:
        row.update({"mean_dice": network["mean_dice"], "threshold_dice": threshold.get("mean_dice"),
                    "beats_threshold_dice": _beats(network["mean_dice"],
                                                   threshold.get("mean_dice"))})
      table.append(row)
  fits = [f"`{floor.runs[method]}`: {model.describe()}"
          for floor in dict.fromkeys(floors.values())
          for method, model in (("intensity", floor.regression), ("threshold", floor.threshold))]
  return Table("baselines", "Does each network beat the non-deep baselines? (mean over seeds)",
               ["dataset", "run", "kind", "icc_2_1", "intensity_icc_2_1", "beats_intensity_icc",
                "threshold_icc_2_1", "beats_threshold_icc", "mean_dice", "threshold_dice",
                "beats_threshold_dice"], table,
               note="yes: the network's value is higher than the baseline's. Dice only for "
               "networks with a segmentation head. " + "; ".join(fits) + ".")


def coverage_table(rows: Sequence[dict],
                   calibrations: Mapping[tuple[str, str], conformal.Calibration]) -> Table:
  """Split-conformal interval coverage per network run, score and test set.

  Args:
    rows: ``predictions.csv`` rows; a run's prediction of a scan is the mean
      over its seeds (the ensemble predict reports).
    calibrations: (run, score) → calibration on that run's validation scans.
  """
  table = []
  for (run, score), calibration in calibrations.items():
    mine = [r for r in rows if r["run"] == run and is_number(r.get("predicted_ml"))]
    for (dataset,), group in group_rows(mine, ("dataset",)).items():
      scans = group_rows(group, ("scan_id",))
      annotated = [g[0]["annotated_ml"] for g in scans.values()]
      predicted = [_mean([r["predicted_ml"] for r in g]) for g in scans.values()]
      covered, width = conformal.coverage(calibration, annotated, predicted)
      table.append({"run": run, "dataset": dataset, "score": score,
                    "nominal": calibration.level, "coverage": covered, "mean_width_ml": width,
                    "scans": len(annotated), "calibration_scans": calibration.n})
  return Table("coverage", "Split-conformal volume intervals: coverage on each test set",
               ["run", "dataset", "score", "nominal", "coverage", "mean_width_ml", "scans",
                "calibration_scans"], table,
               note="Calibrated on each run's validation scans (the local domain). The "
               "guarantee (coverage >= nominal) holds for scans exchangeable with those; "
               "the external domains come from other scanners, where it need not. score "
               "'log': relative intervals (|log1p(y) - log1p(p)|); 'absolute': one width in "
               "mL. predict reports the 'log' interval.")


def ood_table(rows: Sequence[dict], thresholds: Mapping[str, float], local: str) -> Table:
  """The out-of-distribution score (`evaluation.ood`) per network run and test set.

  Per scan, the mean score over a run's seeds; flagged above the run's
  threshold (mean over seeds of the 99th percentile of its training scans'
  scores).
  AUROC: how well the score separates the set's scans from the ``local`` test
  scans (0.5: not at all). Median |error|: of the flagged and unflagged scans.

  Args:
    rows: ``predictions.csv`` rows (those with ``ood_score`` count).
    thresholds: run → flag threshold.
    local: the in-distribution test set's name.
  """
  table = []
  for run, threshold in thresholds.items():
    mine = [r for r in rows if r["run"] == run and is_number(r.get("ood_score"))]
    per_set = {}
    for (dataset,), group in group_rows(mine, ("dataset",)).items():
      scans = group_rows(group, ("scan_id",)).values()
      score = np.array([_mean([r["ood_score"] for r in g]) for g in scans])
      error = np.array([abs(_mean([r["predicted_ml"] for r in g]) - g[0]["annotated_ml"])
                        for g in scans])
      per_set[dataset] = score, error
    for dataset, (score, error) in per_set.items():
      flagged = score > threshold
      table.append({
          "run": run, "dataset": dataset, "scans": len(score),
          "median_score": float(np.median(score)), "flagged_share": float(flagged.mean()),
          "auroc_vs_local": (None if dataset == local or local not in per_set
                             else ood.auroc(per_set[local][0], score)),
          "median_abs_error_flagged_ml": float(np.median(error[flagged])) if flagged.any()
          else None,
          "median_abs_error_unflagged_ml": float(np.median(error[~flagged]))
          if (~flagged).any() else None})
  return Table("ood", "Out-of-distribution score: separation from the local test set, and "
               "the volume errors of flagged scans",
               ["run", "dataset", "scans", "median_score", "flagged_share", "auroc_vs_local",
                "median_abs_error_flagged_ml", "median_abs_error_unflagged_ml"], table,
               note="Score: squared Mahalanobis distance / channels of the volume head's "
               "pooled features from their training-scan distribution (Ledoit-Wolf shrunk "
               "covariance; ~1 on training scans). Flag: above the 99th percentile of the "
               "run's training scans. Strong and severity runs have no volume head, no score.")


def severity_table(rows: Sequence[dict]) -> Table:
  """Severity pilot: ICC(2,1) and accuracy of predicted vs true class (0–4)."""
  table = []
  severity = [r for r in rows if _labels(r["kind"]) == "severity"]
  for (run, seed, dataset), group in group_rows(severity, ("run", "seed", "dataset")).items():
    truth, pred = _values(group, "severity"), _values(group, "predicted_severity")
    ok = np.isfinite(truth)
    table.append({"run": run, "seed": seed, "dataset": dataset, "n": int(ok.sum()),
                  "icc_2_1": _agreement(metrics.icc_2_1, truth, pred),
                  "accuracy": float(np.mean(truth[ok] == pred[ok])) if ok.any() else math.nan})
  return Table("severity", "Severity pilot: predicted vs true severity class",
               ["run", "seed", "dataset", "n", "icc_2_1", "accuracy"], table,
               note="" if table else "No severity run was given.")


def datasets_table(rows: Sequence[dict]) -> Table:
  """Scans per dataset and network: all, with an annotated volume, with a Dice."""
  table = []
  for (dataset, run, seed), group in group_rows(rows, ("dataset", "run", "seed")).items():
    table.append({"dataset": dataset, "run": run, "seed": seed, "scans": len(group),
                  "annotated_volume": sum(is_number(r["annotated_ml"]) for r in group),
                  "dice_scored": sum(is_number(r.get("dice")) for r in group)})
  return Table("datasets", "Test sets", ["dataset", "run", "seed", "scans", "annotated_volume",
                                         "dice_scored"], table)


def summarise(rows: Sequence[dict], n_boot: int = 1000, seed: int = 0,
              covariates: Sequence[str] = ()) -> dict[str, Table]:
  """Every summary table of the study from the per-scan rows (name → table); ``covariates``
  are manifest columns added to the confounder regression (:func:`confounder_table`)."""
  icc = icc_table(rows, n_boot, seed)
  icc_mean = icc_mean_table(icc)
  tables = [datasets_table(rows), icc, icc_mean, comparison_table(icc_mean),
            challenge_table(rows), confounder_table(rows, covariates), dice_vs_icc_table(icc),
            severity_table(rows)]
  return {table.name: table for table in tables}


def networks_table(networks: Sequence[restore.Network]) -> Table:
  """Which checkpoint of which run was analysed.

  Workdirs are written relative to the current directory, so a committed
  report names no folder of the machine that made it.
  """
  return Table("networks", "Networks (best checkpoint of each seed)",
               ["run", "kind", "seed", "step", "workdir"],
               [{"run": n.group, "kind": n.kind, "seed": n.seed, "step": n.step,
                 "workdir": os.path.relpath(n.workdir)} for n in networks])

