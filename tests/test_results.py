"""What a search leaves behind: the trial table, the best trial, the summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cbdtune import results
from cbdtune.space import load_space


def _df() -> pd.DataFrame:
    return results.trials_frame([
        results.trial_row("b", {"model.mask_ratio": 0.5, "model.bernstein_order": 4,
                                "loss.gamma": 0.2},
                          {"val_accuracy": 0.9, "val_loss": 0.30, "test_accuracy": 0.80},
                          "completed", ""),
        results.trial_row("a", {"model.mask_ratio": 0.6, "model.bernstein_order": 5,
                                "loss.gamma": 0.3},
                          {"val_accuracy": 0.9, "val_loss": 0.20, "test_accuracy": 0.70},
                          "completed", ""),
        results.trial_row("c", {"model.mask_ratio": 0.7, "model.bernstein_order": 6,
                                "loss.gamma": 0.4},
                          {"val_accuracy": 0.95}, "stopped", "ASHA"),
    ])


def test_best_trial_is_completed_and_ties_go_to_lower_val_loss() -> None:
    best = results.best_trial(_df(), "val_accuracy", "max")
    # "c" has the highest accuracy but was stopped early: it has no test score to deliver.
    assert best["trial_id"] == "a"


def test_importances_need_enough_completed_trials() -> None:
    imp = results.importances(_df(), load_space("smoke"), "val_accuracy", "max")
    assert isinstance(imp, str) and "at least 3 completed" in imp


def test_write_leaves_parquet_best_config_and_summary(tmp_path: Path) -> None:
    space = load_space("smoke")
    paths = results.write(tmp_path, _df(), space, space.base, metric="val_accuracy", mode="max",
                          command="python -m cbdtune.search --dataset gesture", header={"x": 1})
    assert len(pd.read_parquet(paths["trials"])) == 3
    assert "best trial a" in paths["best_config"].read_text()
    summary = paths["summary"].read_text()
    assert "python -m cbdtune.search --dataset gesture" in summary and "| a | completed |" in summary


def _completed(values: list[float]) -> pd.DataFrame:
    return results.trials_frame([
        results.trial_row(f"t{i}", {"model.mask_ratio": 0.4 + 0.1 * i,
                                    "model.bernstein_order": 2 + i, "loss.gamma": 0.1 + 0.1 * i},
                          {"val_accuracy": v}, "completed", "")
        for i, v in enumerate(values)])


def test_importances_with_equal_metrics_give_a_reason_not_a_crash(tmp_path: Path) -> None:
    # The efficiency benchmark hit this: fANOVA raised "zero total variance in all trees" (the
    # completed trials' metric had no variance) after the whole search had run.
    space = load_space("smoke")
    df = _completed([0.875] * 4)
    imp = results.importances(df, space, "val_accuracy", "max")
    assert isinstance(imp, str) and "no variance" in imp
    paths = results.write(tmp_path, df, space, space.base, metric="val_accuracy", mode="max",
                          command="cmd", header={})
    assert "no variance" in paths["summary"].read_text()


def test_importances_rank_the_varied_parameters() -> None:
    imp = results.importances(_completed([0.5, 0.6, 0.7, 0.9, 0.8]), load_space("smoke"),
                              "val_accuracy", "max")
    assert isinstance(imp, dict) and sum(imp.values()) == pytest.approx(1.0)
