"""analysis CLI: per-scan predictions, summary tables, figures and REPORT.md."""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest

import tiny_data
from tolerances import float32_rtol, network_terms
from wmh_jax import configs
from wmh_jax.data import cache, manifest, pipeline, records
from wmh_jax.errors import CheckpointError, WMHError
from wmh_jax.evaluation import attention, baselines, conformal, metrics, ood, stats
from wmh_jax.inference import restore
from wmh_jax.runtime import sharding
from wmh_jax.study import (analysis, figures, floors, probe, report, results, scans as scans_lib,
                           sweep as study_lib, tables as tables_lib)
from wmh_jax.training import logs, refit

TABLES = ("networks", "datasets", "icc", "icc_mean", "comparison", "baselines", "challenge",
          "confounders", "dice_vs_icc", "severity")
FIGURES = ("icc_per_dataset", "examples", "scatter", "bland_altman", "learning_curves")
INTENSITY, THRESHOLD = floors.BASELINES["intensity"], floors.BASELINES["threshold"]
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study_config", REPO / "experiments" / "study.py")
study_lib_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_lib_config)


def _read(path: Path) -> list[dict[str, str]]:
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def _float(cell: str) -> float:
  return math.nan if cell == "" else float(cell)


def tiny_study_config(local: Path, ext: Path, cache_dir: Path):
  """The study config with the tiny weak and strong experiments, 1 seed."""
  config = study_lib_config.get_config()
  tiny = Path(tiny_data.__file__).with_name("tiny_experiment.py")
  config.experiments = tuple(f"{kind}={tiny}:{kind}" for kind in ("weak", "strong"))
  config.seeds = (0,)
  config.data.manifest = str(local)
  config.data.external_manifests = str(ext)
  config.data.cache_dir = str(cache_dir)
  config.analysis.n_boot = 50
  return config


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
  """Weak and strong tiny runs (1 seed, 1 epoch) trained and analysed by the study command.

  Local data: 12 tiny scans (test split = "local"); external: 5 more scans in
  ``ext/manifest.csv`` (dataset "ext").
  """
  root = tmp_path_factory.mktemp("analysis")
  local = tiny_data.make_tiny_dataset(root / "local", n=12, seed=0)
  ext = tiny_data.make_tiny_dataset(root / "ext", n=5, seed=1)
  study_config = tiny_study_config(local, ext, root / "cache")
  config = study_lib.plan(study_config, root)[0].config
  for path in (local, ext):  # fill the cache in-process: no worker processes are spawned
    cache.preprocessed_records(manifest.read_manifest(path), records.preprocess_spec(config),
                               root / "cache", workers=1)
  out = root / "study"
  assert study_lib.run_study(study_config, root, out) == 0
  return {"root": root, "out": out, "config": config, "ext": ext,
          "study_config": study_config}


def test_study_runs_every_experiment_and_skips_finished_runs(study, capsys):
  summary = json.loads((study["root"] / "study.json").read_text())
  assert summary["analysed_seeds"] == [0]
  assert [(r["experiment"], r["seed"], r["status"]) for r in summary["runs"]] == [
      ("weak", 0, "trained"), ("strong", 0, "trained")]
  assert all(r["val"]["val_score"] == r["val"]["val_score"] for r in summary["runs"])
  runs = study_lib.plan(study["study_config"], study["root"])
  stamps = [(r.workdir / "final_metrics.json").stat().st_mtime_ns for r in runs]
  outcomes = study_lib.train_all(runs)
  assert [o.status for o in outcomes] == ["skipped", "skipped"]
  assert [o.metrics for o in outcomes] == [r["val"] for r in summary["runs"]]
  assert [(r.workdir / "final_metrics.json").stat().st_mtime_ns for r in runs] == stamps
  assert "[2/2] strong seed 0: finished earlier, skipped" in capsys.readouterr().out


def test_study_refuses_a_finished_run_with_another_config(study):
  run = study_lib.plan(study["study_config"], study["root"])[0]
  run.config.train.num_epochs = 2
  with pytest.raises(CheckpointError, match=r"different config \(train.num_epochs differ\)"):
    study_lib.finished_metrics(run)


def test_config_comparison_ignores_runtime_removed_and_default_new_fields():
  stored = json.loads(configs.get_config("cpu").to_json())
  wanted = json.loads(configs.get_config("cpu").to_json())
  wanted["train"]["log_every_steps"] = 1        # runtime only
  wanted["loader"]["worker_count"] = 0          # runtime only
  stored["train"]["seeds"] = [0, 1, 2]          # a field removed since
  del stored["augment"]["domain"]               # a section added since, at its default
  assert configs.changed_fields(stored, wanted) == []
  wanted["augment"]["domain"]["enabled"] = True  # added since, not at its default
  wanted["model"]["norm"] = "instance"
  assert configs.changed_fields(stored, wanted) == ["augment.domain.enabled", "model.norm"]


def test_study_reports_a_failed_run_and_goes_on(study, tmp_path, capsys):
  broken = copy.deepcopy(study["study_config"])
  broken.seeds = (0, 1)
  runs = study_lib.plan(broken, study["root"])
  runs[1] = dataclasses.replace(runs[1], workdir=tmp_path / "weak_seed_1")
  runs[1].config.data.manifest = str(tmp_path / "missing.csv")
  outcomes = study_lib.train_all(runs[:2])
  assert [o.status for o in outcomes] == ["skipped", "failed"]
  assert "missing.csv" in outcomes[1].error
  assert "[2/2] weak seed 1: FAILED" in capsys.readouterr().out
  strong = study_lib.Outcome(runs[2], "skipped", 0.0, {})
  assert study_lib.common_seeds([*outcomes, strong]) == [0]


def test_study_config_files():
  config = study_lib_config.get_config("cpu")
  specs = study_lib.experiments(config)
  assert list(specs) == ["weak", "strong", "joint", "severity"]
  assert tuple(config.seeds) == (0, 1, 2)
  for name, spec in specs.items():
    experiment = configs.load_config_file(spec)
    assert experiment.model.kind == name and experiment.data.shape == (56, 64, 16)
  with pytest.raises(WMHError, match="not found"):
    configs.load_config_file(f"{REPO / 'experiments' / 'nope.py'}:cpu")
  with pytest.raises(WMHError, match=r"unknown config argument\(s\) \['gpu'\]"):
    configs.load_config_file(f"{REPO / 'experiments' / 'weak.py'}:gpu")
  for bad in (("weak.py",), ("a=x.py", "a=y.py")):
    config.experiments = bad
    with pytest.raises(WMHError, match="config.experiments"):
      study_lib.experiments(config)


def test_predictions_have_one_row_per_scan_run_and_dataset(study):
  rows = _read(study["out"] / "predictions.csv")
  config = study["config"]
  local_test = [r["scan_id"] for r in records.split_records(
      records.load_records(config.data.manifest, config))["test"]]
  external = [r["scan_id"] for r in manifest.read_manifest(study["ext"])]
  expected = [(run, dataset, scan) for run in ("weak", "strong", INTENSITY, THRESHOLD)
              for dataset, scans in (("local", local_test), ("ext", external)) for scan in scans]
  assert [(r["run"], r["dataset"], r["scan_id"]) for r in rows] == expected
  assert {r["kind"] for r in rows if r["run"] == "strong"} == {"strong"}
  assert {(r["kind"], r["seed"]) for r in rows if r["run"] in (INTENSITY, THRESHOLD)} == {
      ("baseline", "")}
  rows = [r for r in rows if r["kind"] != "baseline"]
  assert all(r["seed"] == "0" for r in rows)
  weak = [r for r in rows if r["kind"] == "weak"]
  strong = [r for r in rows if r["kind"] == "strong"]
  assert all(r["dice"] == r["attention_dice"] != "" for r in weak)  # weak: attention-map Dice
  assert all(r["attention_dice"] == "" and r["predicted_soft_ml"] != "" for r in strong)
  assert all(np.isfinite(_float(r[c])) for r in rows
             for c in ("annotated_ml", "predicted_ml", "dice", "challenge_dice", "lesion_f1"))


def test_icc_and_dice_tables_equal_recomputation_from_csv(study):
  rows = _read(study["out"] / "predictions.csv")
  table = _read(study["out"] / "tables" / "icc.csv")
  assert [(t["run"], t["dataset"]) for t in table] == [
      (run, dataset) for run in ("weak", "strong", INTENSITY, THRESHOLD)
      for dataset in ("local", "ext")]
  for t in table:
    mine = [r for r in rows if (r["run"], r["seed"], r["dataset"]) == (t["run"], t["seed"],
                                                                        t["dataset"])]
    annotated = np.array([_float(r["annotated_ml"]) for r in mine])
    predicted = np.array([_float(r["predicted_ml"]) for r in mine])
    assert int(t["n"]) == len(mine)
    np.testing.assert_allclose(_float(t["icc_2_1"]), metrics.icc_2_1(annotated, predicted),
                               rtol=1e-12)
    np.testing.assert_allclose(_float(t["icc_3_1"]), metrics.icc_3_1(annotated, predicted),
                               rtol=1e-12)
    low, high = stats.bootstrap_ci(metrics.icc_2_1, annotated, predicted, n_boot=50, seed=0,
                                   vectorized=True)
    np.testing.assert_allclose([_float(t["icc_2_1_ci_low"]), _float(t["icc_2_1_ci_high"])],
                               [low, high], rtol=1e-12)
    np.testing.assert_allclose(_float(t["mean_dice"]),
                               np.mean([_float(r["dice"]) for r in mine]), rtol=1e-12)
  comparison = _read(study["out"] / "tables" / "comparison.csv")
  icc = {(t["run"], t["dataset"]): _float(t["icc_2_1"]) for t in table}
  for c in comparison:
    np.testing.assert_allclose(_float(c["difference"]),
                               icc[("weak", c["dataset"])] - icc[("strong", c["dataset"])])


def test_baseline_rows_equal_baselines_fitted_on_the_training_split(study):
  rows = _read(study["out"] / "predictions.csv")
  config = study["config"]
  splits = records.split_records(records.load_records(config.data.manifest, config))
  regression = baselines.IntensityVolumeRegression().fit(splits["train"])
  threshold = baselines.ThresholdSegmentation().fit(splits["train"])
  assert threshold.threshold is not None and regression.n_train == len(splits["train"])
  for dataset, recs in (("local", splits["test"]),
                        ("ext", records.load_records(study["ext"], config, assign=False))):
    mine = {run: [r for r in rows if (r["run"], r["dataset"]) == (run, dataset)]
            for run in (INTENSITY, THRESHOLD)}
    np.testing.assert_allclose([_float(r["predicted_ml"]) for r in mine[INTENSITY]],
                               regression.predict(recs), rtol=1e-12)
    predicted = list(threshold.predict(recs))
    np.testing.assert_allclose([_float(r["predicted_ml"]) for r in mine[THRESHOLD]],
                               [p.volume_ml for p in predicted], rtol=1e-12)
    np.testing.assert_allclose([_float(r["dice"]) for r in mine[THRESHOLD]],
                               [p.dice for p in predicted], rtol=1e-12)
    assert all(r["dice"] == "" for r in mine[INTENSITY])
    assert all(r["challenge_dice"] != "" for r in mine[THRESHOLD])


def test_per_scan_values_match_the_predict_cli_path(study):
  """Volume and Dice of one scan per run, recomputed through restore.predict_image."""
  rows = _read(study["out"] / "predictions.csv")
  config = study["config"]
  record = records.load_records(study["ext"], config, assign=False)[0]
  loaded = pipeline.load_record(record)
  mesh = sharding.make_mesh()
  for model in restore.load_networks([str(study["root"] / k) for k in ("weak", "strong")], mesh):
    out = restore.predict_image(model, loaded["image"][..., 0], mesh)
    if model.kind == "weak":
      count = attention.predicted_voxels(out["volume_ml"], model.spec.spacing_mm)
      seg = attention.threshold_to_volume(out["attention"], count)
    else:
      seg = out["seg_prob"] > 0.5
    row = next(r for r in rows if (r["run"], r["dataset"], r["scan_id"]) ==
               (model.group, "ext", record["scan_id"]))
    # Two float32 evaluations of the network (the analysis' batches, this single
    # image): the reduction rule over the network's path (tests/tolerances.py).
    n_terms = network_terms(model.variables["params"], int(np.prod(model.spec.shape)))
    np.testing.assert_allclose(_float(row["predicted_ml"]), out["volume_ml"],
                               rtol=float32_rtol(n_terms, sides=2))
    assert _float(row["dice"]) == pytest.approx(metrics.dice(loaded["mask"][..., 0], seg))
    assert _float(row["annotated_ml"]) == pytest.approx(record["wmh_volume_ml"])


def test_tables_figures_and_report_are_written(study):
  out = study["out"]
  for name in TABLES:
    assert (out / "tables" / f"{name}.csv").stat().st_size > 0
    assert (out / "tables" / f"{name}.md").read_text().startswith("## ")
  for name in FIGURES:
    data = (out / "figures" / f"{name}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
  text = (out / "REPORT.md").read_text()
  for needle in ("local", "ext", "figures/icc_per_dataset.png", "figures/examples.png",
                 "figures/learning_curves.png", "Weak run `weak` vs strong run `strong`",
                 "## Baselines (the floor)", "`baseline: intensity threshold`: threshold "):
    assert needle in text
  icc_mean = {(t["run"], t["dataset"]): t for t in _read(out / "tables" / "icc_mean.csv")}
  icc = {key: _float(t["icc_2_1"]) for key, t in icc_mean.items()}
  assert f"ext {icc[('weak', 'ext')] - icc[('strong', 'ext')]:+.3f}" in text
  floor = _read(out / "tables" / "baselines.csv")
  assert [(r["dataset"], r["run"]) for r in floor] == [
      (dataset, run) for dataset in ("local", "ext") for run in ("weak", "strong")]
  for r in floor:
    for method, run in (("intensity", INTENSITY), ("threshold", THRESHOLD)):
      beats = icc[(r["run"], r["dataset"])] > icc[(run, r["dataset"])]
      assert r[f"beats_{method}_icc"] == ("yes" if beats else "no")
    dice = _float(icc_mean[(r["run"], r["dataset"])]["mean_dice"])
    threshold_dice = _float(icc_mean[(THRESHOLD, r["dataset"])]["mean_dice"])
    assert r["beats_threshold_dice"] == ("" if r["kind"] == "weak" else
                                         "yes" if dice > threshold_dice else "no")
    assert f"| {r['dataset']} | {r['run']} | {r['kind']} | " in text


def test_coverage_table_recomputes_from_stored_calibration_and_predictions(study):
  """tables/coverage.csv: each run's interval (calibrated on the validation predictions its
  training stored) checked against predictions.csv, for every score and test set."""
  out = study["out"]
  rows = {(r["run"], r["dataset"], r["score"]): r for r in _read(out / "tables" / "coverage.csv")}
  assert set(rows) == {(run, dataset, score) for run in ("weak", "strong")
                       for dataset in ("local", "ext") for score in conformal.SCORES}
  predictions = _read(out / "predictions.csv")
  for run in ("weak", "strong"):
    restored = restore.load_networks([study["root"] / run], sharding.make_mesh())
    calibration_sets = [n.val_predictions for n in restored]
    for score in conformal.SCORES:
      calibration = conformal.ensemble_calibration(calibration_sets, 0.9, score)
      for dataset in ("local", "ext"):
        mine = [r for r in predictions if r["run"] == run and r["dataset"] == dataset]
        covered, width = conformal.coverage(calibration, [_float(r["annotated_ml"]) for r in mine],
                                            [_float(r["predicted_ml"]) for r in mine])
        row = rows[(run, dataset, score)]
        assert _float(row["coverage"]) == pytest.approx(covered)
        assert _float(row["mean_width_ml"]) == pytest.approx(width)
        assert int(row["calibration_scans"]) == calibration.n > 0
  assert "## Volume intervals" in (out / "REPORT.md").read_text()


def test_ood_table_recomputes_from_predictions_and_stored_thresholds(study):
  out = study["out"]
  restored = restore.load_networks([study["root"] / "weak"], sharding.make_mesh())
  threshold = float(np.mean([n.ood_reference.threshold for n in restored]))
  predictions = [r for r in _read(out / "predictions.csv") if r["run"] == "weak"]
  scores = {d: np.array([_float(r["ood_score"]) for r in predictions if r["dataset"] == d])
            for d in ("local", "ext")}
  assert all(np.isfinite(s).all() and (s >= 0).all() for s in scores.values())
  assert not any(r["ood_score"] for r in _read(out / "predictions.csv") if r["run"] == "strong")
  rows = {r["dataset"]: r for r in _read(out / "tables" / "ood.csv")}
  assert {r["run"] for r in _read(out / "tables" / "ood.csv")} == {"weak"}
  for dataset, score in scores.items():
    assert _float(rows[dataset]["flagged_share"]) == pytest.approx(np.mean(score > threshold))
  assert _float(rows["ext"]["auroc_vs_local"]) == pytest.approx(
      ood.auroc(scores["local"], scores["ext"]))
  assert "## Out-of-distribution scans" in (out / "REPORT.md").read_text()


def test_learning_curves_equal_the_metrics_logs(study):
  loaded = restore.load_networks([study["root"] / k for k in ("weak", "strong")],
                                  sharding.make_mesh())
  curves = figures.learning_curves(loaded)
  assert [(c.run, c.seed, c.metric) for c in curves] == [("weak", 0, "val_icc"),
                                                          ("strong", 0, "val_dice")]
  for curve in curves:
    lines = (study["root"] / curve.run / "seed_0" / "metrics.jsonl").read_text().splitlines()
    evals = [record for record in map(json.loads, lines) if "val_score" in record]
    assert evals and curve.steps.tolist() == [e["step"] for e in evals]
    assert curve.values.tolist() == [e[curve.metric] for e in evals]


def test_validation_records_skip_training_and_torn_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n'
                  '{"step": 2, "epoch": 1, "val_icc": 0.25, "val_dice": 0.5, "val_score": 0.25}\n'
                  '{"step": 3, "loss": 1.0}\n'
                  '{"step": 4, "epoch": 2, "val_icc": 0.5, "val_dice": 0.75, "val_score": 0.5}\n'
                  '{"step": 5, "epo')
  evals = logs.validation_records(path)
  assert [(e["step"], e["val_icc"], e["val_dice"]) for e in evals] == [(2, 0.25, 0.5),
                                                                        (4, 0.5, 0.75)]
  assert logs.validation_records(tmp_path / "missing.jsonl") == []
  curves = [results.Curve("joint", "joint", 0, metric, np.array([2, 4]),
                         np.array([e[metric] for e in evals])) for metric in ("val_icc",
                                                                               "val_dice")]
  png = report.learning_curves_figure(curves, tmp_path / "curves.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summarise_confounders_correlation_and_severity():
  """Synthetic rows: 3 weak seeds with confounders, a severity run."""
  rng = np.random.default_rng(0)
  annotated = rng.uniform(1, 20, 12)
  confounders = {c: rng.uniform(5, 50, 12) for c in ("ventricle_ml", "white_matter_ml",
                                                      "csf_ml")}
  rows = []
  for seed in range(3):
    predicted = annotated + rng.normal(0, 1 + seed, 12)
    dice = rng.uniform(0, 0.3, 12)
    rows += [{"run": "weak", "kind": "weak", "seed": seed, "dataset": "local",
              "scan_id": f"s{i}", "annotated_ml": annotated[i], "predicted_ml": predicted[i],
              "dice": dice[i], **{c: v[i] for c, v in confounders.items()}} for i in range(12)]
  truth = np.arange(12) % 5
  rows += [{"run": "sev", "kind": "severity", "seed": 0, "dataset": "local", "scan_id": f"s{i}",
            "annotated_ml": annotated[i], "predicted_ml": math.nan, "severity": int(truth[i]),
            "predicted_severity": int(min(truth[i] + i % 2, 4))} for i in range(12)]
  tables = tables_lib.summarise(rows, n_boot=20, seed=0)

  fit = tables["confounders"].rows[2]
  weak2 = [r for r in rows if r["seed"] == 2 and r["kind"] == "weak"]
  expected = stats.confounder_regression(
      annotated, np.array([r["predicted_ml"] for r in weak2]), confounders)
  assert (fit["seed"], fit["n"]) == (2, 12)
  assert fit["r2_full"] == pytest.approx(expected["r2_full"])
  assert fit["p_csf_ml"] == pytest.approx(expected["confounder_p"]["csf_ml"])
  assert fit["r_ventricle_ml"] == pytest.approx(
      stats.pearson_with_confounders(annotated, confounders)["ventricle_ml"])

  icc = tables["icc"].rows
  assert [r["run"] for r in icc] == ["weak"] * 3  # no volume ICC for the severity run
  corr = tables["dice_vs_icc"].rows[0]
  expected = stats.correlation(np.array([r["mean_dice"] for r in icc]),
                               np.array([r["icc_2_1"] for r in icc]))
  assert (corr["networks"], corr["pearson_r"]) == (3, pytest.approx(expected["pearson_r"]))

  severity = tables["severity"].rows[0]
  predicted_class = np.array([min(t + i % 2, 4) for i, t in enumerate(truth)], np.float64)
  assert severity["icc_2_1"] == pytest.approx(metrics.icc_2_1(truth, predicted_class))
  assert severity["accuracy"] == pytest.approx(np.mean(truth == predicted_class))
  assert tables["comparison"].rows == [] and tables["comparison"].note


def test_confounder_regression_adds_tiv_and_named_manifest_covariates():
  """``tiv_ml`` joins the confounder volumes; ``--covariates`` adds manifest columns: numeric
  ones as they are, categorical ones as indicators of every level but the first."""
  import statsmodels.api as sm  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  n = 30
  annotated = rng.uniform(1, 20, n)
  predicted = annotated + rng.normal(0, 2, n)
  tiv = rng.uniform(1200, 1600, n)
  age = rng.uniform(50, 90, n)
  site = np.array(["A", "B", "C"])[np.arange(n) % 3]
  rows = [{"run": "weak", "kind": "weak", "seed": 0, "dataset": "local", "scan_id": f"s{i}",
           "annotated_ml": annotated[i], "predicted_ml": predicted[i], "tiv_ml": tiv[i],
           "cov_age": f"{age[i]:.6f}", "cov_site": site[i], "cov_sex": "F",
           "cov_bmi": "" if i == 0 else "25"} for i in range(n)]
  table = tables_lib.confounder_table(rows, ["age", "site", "sex", "bmi"])
  (fit,) = table.rows
  design = np.column_stack([np.ones(n), predicted, tiv, np.round(age, 6), site == "B", site == "C"])
  full = sm.OLS(annotated, design.astype(float)).fit()
  assert fit["r2_full"] == pytest.approx(full.rsquared)
  for name, index in (("tiv_ml", 2), ("age", 3), ("site=B", 4), ("site=C", 5)):
    assert fit[f"p_{name}"] == pytest.approx(full.pvalues[index], rel=1e-6)
  assert fit["df_confounders"] == 4
  assert "'sex' has one level" in table.note and "'bmi' is missing" in table.note
  assert "p_site=C" in table.columns and "p_sex" not in table.columns


def test_tiv_is_the_intracranial_volume_of_the_cached_record(study):
  predictions = _read(study["out"] / "predictions.csv")
  local = {r["scan_id"]: r for r in records.split_records(records.load_records(
      Path(study["config"].data.manifest), study["config"]))["test"]}
  voxel_ml = records.voxel_ml(study["config"])
  for row in (r for r in predictions if r["dataset"] == "local" and r["run"] == "weak"):
    brain = pipeline.load_record(local[row["scan_id"]])["brain"]
    assert _float(row["tiv_ml"]) == pytest.approx(brain.sum() * voxel_ml)


def test_floor_table_and_report_say_which_networks_beat_the_baselines(tmp_path):
  """Synthetic rows: weak (2 seeds) and strong networks, both baselines, one dataset."""
  rng = np.random.default_rng(0)
  annotated = rng.uniform(1, 20, 10)

  def rows(run: str, kind: str, seed: int | None, noise_ml: float, dice: float) -> list[dict]:
    predicted = annotated + rng.normal(0, noise_ml, 10)
    return [{"run": run, "kind": kind, "seed": seed, "dataset": "local", "scan_id": f"s{i}",
             "annotated_ml": annotated[i], "predicted_ml": predicted[i], "dice": dice}
            for i in range(10)]

  all_rows = (rows("weak", "weak", 0, 0.1, 0.1) + rows("weak", "weak", 1, 0.2, 0.1)
              + rows("strong", "strong", 0, 20.0, 0.6) + rows(INTENSITY, "baseline", None, 2.0,
                                                              math.nan)
              + rows(THRESHOLD, "baseline", None, 4.0, 0.3))
  tables = tables_lib.summarise(all_rows, n_boot=20, seed=0)
  assert tables["dice_vs_icc"].rows[0]["networks"] == 3  # 3 seeds; the baselines left out
  floor = floors.Floor(dict(floors.BASELINES), baselines.IntensityVolumeRegression(),
                         baselines.ThresholdSegmentation(), sets={})
  table = tables_lib.floor_table(tables["icc_mean"], {"weak": floor, "strong": floor})
  icc = {r["run"]: r["icc_2_1"] for r in tables["icc_mean"].rows}
  assert icc["weak"] > icc[INTENSITY] > icc[THRESHOLD] > icc["strong"]
  assert [(r["run"], r["beats_intensity_icc"], r["beats_threshold_icc"],
           r.get("beats_threshold_dice")) for r in table.rows] == [
      ("weak", "yes", "yes", None), ("strong", "no", "no", "yes")]
  assert table.rows[1]["threshold_dice"] == pytest.approx(0.3)
  assert "`baseline: intensity threshold`: not fitted" in table.note
  text = report.write_report(tmp_path, {**tables, "baselines": table}, {}).read_text()
  section = text.split("## Baselines (the floor)")[1].split("\n## ")[0]
  assert "| local | weak | weak | " in section and "| yes | n/a | n/a | n/a |" in section
  assert "| local | strong | strong | " in section and "| no | 0.600 | 0.300 | yes |" in section


def test_segmentation_metrics_drop_other_pathology_from_challenge_dice():
  labels = np.zeros((6, 6, 3), int)
  labels[1:3, 1:3, 1] = 1
  labels[4:6, 4:6, 1] = 2
  seg = labels > 0  # covers the WMH and the other-pathology region
  reference = scans_lib.Reference(labels, np.eye(4), (1.0, 1.0, 1.0))
  row = scans_lib.segmentation_metrics({"seg": seg}, reference)
  assert row["dice"] == pytest.approx(2 * 4 / (4 + 8))
  assert row["challenge_dice"] == pytest.approx(1.0)
  assert math.isnan(scans_lib.segmentation_metrics({"seg": seg}, None)["dice"])


def test_dataset_names_and_errors(study, tmp_path):
  assert records.dataset_name(Path("a/wmhseg/manifest.csv")) == "wmhseg"
  assert records.dataset_name(Path("lists/msseg.csv")) == "msseg"
  config = copy.deepcopy(study["config"])
  config.data.external_manifests = f"{study['ext']},{study['root'] / 'x' / 'ext.csv'}"
  with pytest.raises(WMHError, match="'ext' is taken"):
    records.external_manifests(config)
  assert analysis.main([f"--runs={tmp_path / 'nothing'}", f"--out={tmp_path / 'o'}"]) == 2
  assert analysis.main([f"--runs={study['root'] / 'weak'}", f"--out={tmp_path / 'o'}",
                        "--datasets=nope"]) == 2
  for bad_seeds in ("--seeds=7", "--seeds=zero"):
    assert analysis.main([f"--runs={study['root'] / 'weak'}", f"--out={tmp_path / 'o'}",
                          bad_seeds]) == 2


def test_analysis_cli_with_datasets_and_seeds(study, tmp_path):
  assert analysis.main([f"--runs={study['root'] / 'weak'}", f"--out={tmp_path}",
                        "--datasets=ext", "--seeds=0", "--n_boot=10"]) == 0
  rows = _read(tmp_path / "predictions.csv")
  assert {(r["run"], r["seed"], r["dataset"]) for r in rows} == {
      ("weak", "0", "ext"), (INTENSITY, "", "ext"), (THRESHOLD, "", "ext")}
  assert len(rows) == 15


def test_report_says_when_no_network_measures_volume():
  columns = ["dataset", "weak_run", "strong_run", "weak_icc_2_1", "strong_icc_2_1", "difference"]

  def lines(weak_icc: float, strong_icc: float) -> str:
    rows = [dict(zip(columns, ("local", "w", "s", weak_icc, strong_icc,
                               weak_icc - strong_icc))),
            dict(zip(columns, ("ext", "w", "s", weak_icc / 2, math.nan, math.nan)))]
    return "\n".join(report.comparison_lines(results.Table("comparison", "t", columns, rows)))

  both_poor = lines(0.02, 0.0)
  assert "Run `w` does not measure WMH volume here" in both_poor
  assert "highest 0.020, on local" in both_poor
  assert "Run `s` does not measure" in both_poor and "say nothing about weak vs" in both_poor
  one_poor = lines(0.9, 0.3)
  assert "Run `s` does not measure" in one_poor and "Run `w`" not in one_poor.split("\n", 1)[1]
  assert "say nothing" not in one_poor
  assert "does not measure" not in lines(0.9, 0.8)


def test_domain_effect_pairs_each_randomised_run_with_its_kind_without_it():
  def row(run, kind, dataset, icc, dice):
    return {"run": run, "kind": kind, "dataset": dataset, "icc_2_1": icc, "mean_dice": dice}
  icc_mean = results.Table("icc_mean", "", [], [
      row("weak", "weak", "local", 0.6, 0.1), row("weak", "weak", "msles", 0.4, 0.1),
      row("weak_dr", "weak", "local", 0.5, 0.2), row("weak_dr", "weak", "msles", 0.7, 0.3),
      row("strong", "strong", "local", 0.9, 0.5), row("strong_dr", "strong", "local", 0.8, 0.4)])
  table = tables_lib.domain_effect_table(icc_mean, {"weak_dr", "strong_dr"})
  got = [(r["dataset"], r["kind"], r["run"], r["domain_run"], round(r["icc_difference"], 12))
         for r in table.rows]
  assert got == [("local", "weak", "weak", "weak_dr", -0.1),
                 ("msles", "weak", "weak", "weak_dr", 0.3),
                 ("local", "strong", "strong", "strong_dr", -0.1)]
  assert table.rows[1]["domain_mean_dice"] == 0.3
  assert tables_lib.domain_effect_table(icc_mean, set()).rows == []


def test_probe_fits_every_readout_on_the_frozen_body(study, capsys):
  weak = study_lib.plan(study["study_config"], study["root"])[0]
  assert weak.config.model.kind == "weak"
  result = probe.probe(weak.workdir, datasets=["ext"], hidden=8, untrained=True)
  fitted = (*probe.READOUTS, *(probe.UNTRAINED + r for r in probe.READOUTS))
  assert set(result) == {"network", *fitted, *(f"{r} ridge" for r in fitted)}
  for row in ("network", *fitted):
    assert set(result[row]) == {"train", "val", "ext"}
    assert all(-1.0 <= v <= 1.0 for v in result[row].values()), result[row]
  # The network row is the analysis's own ICC of the same scans.
  predictions = [r for r in _read(study["out"] / "predictions.csv")
                 if r["run"] == "weak" and r["dataset"] == "ext"]
  assert result["network"]["ext"] == pytest.approx(metrics.icc_2_1(
      [float(r["annotated_ml"]) for r in predictions],
      [float(r["predicted_ml"]) for r in predictions]), rel=1e-6)
  assert all(result[f"{r} ridge"]["train"] in refit.RIDGES for r in probe.READOUTS)
  table = probe.format_table(result)
  assert table.splitlines()[0] == "| readout | train | val | ext | ridge |"
  assert len(table.splitlines()) == 2 + 1 + 2 * len(probe.READOUTS)
  # The freshly initialised body gives other features, hence other fits.
  assert any(result[r] != result[probe.UNTRAINED + r] for r in probe.READOUTS)


def test_store_calibration_backfills_an_older_run(study, tmp_path, capsys):
  """A run trained before validation predictions were stored gets them (and its OOD
  reference) from ``analysis --store_calibration``, equal to what analysis computes."""
  old = tmp_path / "weak"
  shutil.copytree(study["root"] / "weak", old)
  shutil.rmtree(old / "seed_0" / "val_predictions")
  mesh = sharding.make_mesh()
  (before,) = restore.load_networks([old], mesh)
  assert before.val_predictions is None and before.ood_reference is None
  assert analysis.main([f"--runs={old}", "--store_calibration"]) == 0
  assert "wrote" in capsys.readouterr().out
  (after,) = restore.load_networks([old], mesh)
  (original,) = restore.load_networks([study["root"] / "weak"], mesh)
  assert after.val_predictions["scan_id"] == original.val_predictions["scan_id"]
  np.testing.assert_allclose(after.val_predictions["predicted_ml"],
                             original.val_predictions["predicted_ml"], rtol=1e-5, atol=1e-6)
  assert after.ood_reference.threshold > 0
  assert analysis.main([f"--runs={old}", "--store_calibration"]) == 0
  assert "nothing to store" in capsys.readouterr().out
  assert analysis.main([f"--runs={old}"]) == 2
