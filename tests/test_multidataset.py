"""A multi-dataset search (``--dataset gesture,fm``): the list parsed and refused, the aggregate a
trial reports, the per-dataset table of the summary, and one Ray search end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cbdtune import reports, results, search
from cbdtune.config import ConfigError
from cbdtune.settings import SearchSettings
from cbdtune.space import load_space

EXPERIMENT = "cbdtune-multi-test"


# ---- settings: the list, its refusals, the scheduler ------------------------------------------


def test_the_command_line_splits_a_comma_list_and_the_settings_take_a_tuple() -> None:
    p = search.parser()
    multi = SearchSettings.from_args(p.parse_args(["--dataset", "gesture, awr,fm"]))
    assert multi.datasets == ("gesture", "awr", "fm")
    assert multi.scheduler == "none"  # one report per trial: nothing for ASHA to compare
    assert multi == SearchSettings(datasets=("gesture", "awr", "fm"))
    single = SearchSettings(datasets=("gesture",))
    assert single.datasets == ("gesture",) and single.scheduler == "asha"
    assert SearchSettings(datasets="gesture") == single  # a single str is one name
    assert SearchSettings(datasets=("gesture", "fm"), scheduler="none").scheduler == "none"
    assert SearchSettings(datasets=("gesture",), scheduler="none").scheduler == "none"
    with pytest.raises(TypeError):  # keyword-only
        SearchSettings("gesture")  # type: ignore[misc]


def test_the_derived_scheduler_round_trips_through_the_command_line() -> None:
    p = search.parser()
    for settings in (SearchSettings(datasets=("gesture", "fm"), num_samples=2),
                     SearchSettings(datasets=("gesture",)),
                     SearchSettings(datasets=("gesture",), scheduler="none")):
        argv = settings.to_argv()
        assert SearchSettings.from_args(p.parse_args(argv)) == settings
    assert SearchSettings(datasets=("gesture", "fm")).to_argv()[:2] == ["--dataset", "gesture,fm"]
    assert "--scheduler" not in SearchSettings(datasets=("gesture", "fm")).to_argv()
    assert "--scheduler" not in SearchSettings(datasets=("gesture",)).to_argv()
    assert "--scheduler" in SearchSettings(datasets=("gesture",), scheduler="none").to_argv()


@pytest.mark.parametrize(("datasets", "kwargs", "message"), [
    (("gesture", "fm", "gesture"), {}, "datasets (--dataset) gesture,fm,gesture: gesture given "
                                       "more than once"),
    (("gesture", "", "fm"), {}, "an empty name in the list"),
    (("gesture", " "), {}, "an empty name in the list"),
    ((" ",), {}, "datasets (--dataset): must not be empty"),
    ("gesture,fm", {}, "one name per item"),
    (("gesture", 3), {}, "expected a tuple of strings"),
    (("gesture", "fm"), {"scheduler": "asha"}, "scheduler (--scheduler) asha: a multi-dataset "
                                               "trial reports once"),
])
def test_settings_refuse_a_bad_list_in_one_line(datasets: Any, kwargs: dict[str, Any],
                                                message: str) -> None:
    with pytest.raises(ConfigError) as err:
        SearchSettings(datasets=datasets, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("dataset", "message"), [
    ("gesture,nosuch", "unknown dataset 'nosuch'"),
    ("gesture,uwave", "gesture and uwave are one dataset (UWaveGestureLibrary); name it once"),
    ("gesture,fm", "scheduler (--scheduler) asha"),
])
def test_cli_refuses_a_bad_list_before_ray(tmp_path: Path, capsys, dataset: str,
                                           message: str) -> None:
    import ray

    argv = ["--dataset", dataset, "--space", "smoke", "--results-dir", str(tmp_path / "r"),
            "--storage", str(tmp_path / "ray"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if dataset == "gesture,fm":
        argv += ["--scheduler", "asha"]
    assert search.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()


# ---- the aggregate a trial reports --------------------------------------------------------------


def _final(acc: float, se: float, test: float, **extra: Any) -> dict[str, Any]:
    return {reports.STAGE: reports.FINAL_STAGE, reports.FINAL: 1, reports.DIVERGED: 0,
            reports.VAL_ACCURACY: acc, reports.VAL_ACCURACY_SE: se, reports.VAL_LOSS: 1 - acc,
            reports.VAL_F1: acc - 0.05, reports.TEST_ACCURACY: test, reports.TEST_F1: test,
            reports.SELECTED_STAGE: "linear_probe", reports.SELECTED_EPOCH: 7,
            reports.ENCODER_REUSED: 0, reports.ENCODER_KEY: "k", **extra}


def test_the_aggregate_is_the_mean_of_the_datasets_estimates() -> None:
    agg = reports.aggregate({"gesture": _final(0.9, 0.03, 0.85),
                             "awr": _final(0.6, 0.04, 0.5, **{reports.SELECTED_STAGE: "fine_tune"}),
                             "fm": _final(0.3, 0.0, 0.2)})
    assert agg[reports.VAL_ACCURACY] == pytest.approx(0.6)
    assert agg[reports.VAL_ACCURACY_SE] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 3)
    assert agg[reports.TEST_ACCURACY] == pytest.approx((0.85 + 0.5 + 0.2) / 3)
    assert agg[reports.VAL_LOSS] == pytest.approx(0.4)
    assert reports.is_final(agg) and not reports.is_diverged(agg)
    assert agg["gesture.val_accuracy"] == 0.9 and agg["fm.val_accuracy_se"] == 0.0
    assert agg["awr.selected_stage"] == "fine_tune" and agg["awr.selected_epoch"] == 7
    assert agg["fm.test_accuracy"] == 0.2 and agg["gesture.encoder_key"] == "k"
    assert reports.SELECTED_STAGE not in agg  # each dataset selects its own stage
    assert agg[reports.ENCODER_REUSED] == 0


def test_a_dataset_that_diverged_or_failed_zeroes_the_trial_with_its_reason() -> None:
    from cbdtune.worker import _final_of

    diverged = {reports.STAGE: reports.FINAL_STAGE, reports.FINAL: 1, reports.DIVERGED: 1,
                reports.REASON: "loss became NaN at epoch 3", reports.VAL_ACCURACY: 0.0}
    raised: Future = Future()
    raised.set_exception(RuntimeError("Training failed\nValueError: out of memory"))
    done: Future = Future()
    done.set_result({"final": _final(0.9, 0.02, 0.8)})
    agg = reports.aggregate({"gesture": _final_of(done), "fm": _final_of(raised),
                             "awr": diverged})
    assert agg[reports.VAL_ACCURACY] == 0.0 and reports.is_diverged(agg)
    assert agg[reports.REASON] == ("fm: failed: ValueError: out of memory; "
                                   "awr: loss became NaN at epoch 3")
    assert agg["gesture.val_accuracy"] == 0.9 and agg["fm.diverged"] == 1
    assert reports.VAL_ACCURACY_SE not in agg and reports.TEST_ACCURACY not in agg
    from cbdtune.tracking import trial_status

    assert trial_status(agg) == ("diverged", agg[reports.REASON])


# ---- the per-dataset table and the mean ranks ---------------------------------------------------


def _rows() -> pd.DataFrame:
    """Trial a wins the aggregate; b is gesture's own best, c is fm's; d diverged on fm."""
    finals = {"a": (_final(0.80, 0.02, 0.78), _final(0.60, 0.03, 0.55)),
              "b": (_final(0.90, 0.01, 0.88), _final(0.40, 0.05, 0.45)),
              "c": (_final(0.50, 0.04, 0.52), _final(0.65, 0.02, 0.60)),
              "d": (_final(0.95, 0.01, 0.93), {reports.FINAL: 1, reports.DIVERGED: 1,
                                               reports.REASON: "nan"})}
    rows = []
    for trial, (gesture, fm) in finals.items():
        agg = reports.aggregate({"gesture": gesture, "fm": fm})
        status = "diverged" if reports.is_diverged(agg) else "completed"
        rows.append(results.trial_row(trial, {"model.mask_ratio": 0.5}, agg, status,
                                      agg.get(reports.REASON, ""), ("gesture", "fm")))
    return results.trials_frame(rows)


def test_trial_rows_carry_each_datasets_columns() -> None:
    df = _rows()
    for col in ("gesture.val_accuracy", "fm.val_accuracy_se", "fm.test_accuracy",
                "gesture.selected_stage", "gesture.selected_epoch", "fm.diverged"):
        assert col in df, col
    assert list(df["val_accuracy"].round(4)) == [0.7, 0.65, 0.575, 0.0]
    assert results.best_trial(df, "val_accuracy", "max")["trial_id"] == "a"


def test_per_dataset_table_winner_against_each_datasets_own_best() -> None:
    table = results.per_dataset_table(_rows(), ("gesture", "fm"), "val_accuracy", "max")
    gesture, fm = (r for _, r in table.iterrows())
    # gesture's own best: d (0.95) ran gesture to the end although fm diverged
    assert (gesture["dataset"], gesture["own_best_trial"]) == ("gesture", "d")
    assert (gesture["winner_cv"], gesture["winner_test"]) == (0.80, 0.78)
    assert (gesture["own_best_cv"], gesture["own_best_test"]) == (0.95, 0.93)
    assert (fm["own_best_trial"], fm["own_best_cv"], fm["own_best_cv_se"]) == ("c", 0.65, 0.02)
    assert (fm["winner_cv"], fm["winner_cv_se"], fm["winner_test"]) == (0.60, 0.03, 0.55)


def test_mean_ranks_over_the_completed_trials() -> None:
    ranks = results.mean_ranks(_rows(), ("gesture", "fm"), "val_accuracy", "max")
    assert list(ranks["trial_id"]) == ["a", "b", "c"]  # best aggregate first; d diverged
    assert list(ranks["rank.gesture"]) == [2, 1, 3] and list(ranks["rank.fm"]) == [2, 3, 1]
    assert list(ranks["mean_rank"]) == [2.0, 2.0, 2.0]


def test_summary_has_the_per_dataset_section_and_best_config_reloads(tmp_path: Path) -> None:
    space = load_space("smoke")
    base = space.base.replace({"data.dataset": "gesture,fm"})
    df = _rows()
    results.write(tmp_path, df, space, base, metric="val_accuracy", mode="max", command="c",
                  header={}, datasets=("gesture", "fm"))
    text = (tmp_path / "summary.md").read_text()
    assert "## Per dataset" in text
    assert "| gesture | 80.00 ± 2.00 | 78.00 | `d` | 95.00 ± 1.00 | 93.00 |" in text
    assert "| fm | 60.00 ± 3.00 | 55.00 | `c` | 65.00 ± 2.00 | 60.00 |" in text
    assert "| trial_id | val_accuracy | rank.gesture | rank.fm | mean_rank |" in text
    saved = pd.read_parquet(tmp_path / "trials.parquet")
    assert {"gesture.val_accuracy", "fm.test_accuracy"} <= set(saved.columns)
    # the refit hint: the winner's config is a space a single-dataset search takes
    winner = load_space(str(tmp_path / "best_config.yaml"))
    assert not winner.params
    assert winner.base.replace({"data.dataset": "gesture"}).model.mask_ratio == 0.5
    single = results.write(tmp_path / "one", df, space, base, metric="val_accuracy", mode="max",
                           command="c", header={})
    assert "## Per dataset" not in single["summary"].read_text()


# ---- one Ray search over two datasets -----------------------------------------------------------


TINY = """preset: smoke
train.pretrain_epochs: 2
train.probe_every: 2
train.probe_epochs: 1
train.classifier_epochs: 3
model.mask_ratio: {type: float, low: 0.4, high: 0.9}
"""


@pytest.mark.ray
def test_multi_dataset_search_reports_each_dataset_and_their_mean(tmp_path: Path) -> None:
    """gesture and fm in one trial: one aggregate val_accuracy (their mean), each dataset's
    metrics on the trial's MLflow run and in trials.parquet, the summary's per-dataset table."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", "gesture,fm", "--space",
           str(space), "--num-samples", "1", "--refit-top", "1", "--cv-folds", "2",
           "--storage", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "results"),
           "--mlflow-uri", uri, "--experiment", EXPERIMENT]
    # a few minutes on an idle 2-core machine; 14 min under load
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no refit or model: refit and registry are per dataset" in proc.stdout
    [table] = list((tmp_path / "results" / "gesture+fm").glob("*/trials.parquet"))
    [row] = pd.read_parquet(table).to_dict("records")
    assert row["status"] == "completed", row
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("cbdtune.role") == "search"]
    [trial] = [r for r in runs if "cbdtune.trial_id" in r.data.tags]
    m = trial.data.metrics
    for slug in ("gesture", "fm"):
        for key in ("val_accuracy", "val_accuracy_se", "test_accuracy", "selected_epoch"):
            assert f"{slug}.{key}" in m, (slug, key, sorted(m))
            assert row[f"{slug}.{key}"] == pytest.approx(m[f"{slug}.{key}"])
        assert row[f"{slug}.selected_stage"] == "linear_probe"
    assert m["val_accuracy"] == pytest.approx((m["gesture.val_accuracy"]
                                               + m["fm.val_accuracy"]) / 2)
    history = client.get_metric_history(trial.info.run_id, "val_accuracy")
    assert len(history) == 1  # one report per trial
    assert parent.data.params["dataset"] == "gesture+fm"
    assert parent.data.params["scheduler"] == "none"
    assert {t for t in parent.data.tags if t.startswith("cbdtune.dataset_sha256.")} == {
        "cbdtune.dataset_sha256.gesture", "cbdtune.dataset_sha256.fm"}
    summary = (table.parent / "summary.md").read_text()
    assert "## Per dataset" in summary
    for slug in ("gesture", "fm"):
        cv = f"{100 * row[f'{slug}.val_accuracy']:.2f}"
        assert f"| {slug} | {cv} ± " in summary
