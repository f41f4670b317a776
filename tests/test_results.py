"""What a search leaves behind: the trial table, the best trial, the summary."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from cbdtune import results
from cbdtune.config import CbdtuneError
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


def _write(folder: Path, df: pd.DataFrame) -> dict[str, Path]:
    space = load_space("smoke")
    return results.write(folder, df, space, space.base, metric="val_accuracy", mode="max",
                         command="python -m cbdtune.search --dataset gesture", header={"x": 1})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_crash_at_replace_leaves_old_files_and_no_temporaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, _df())
    before = _snapshot(tmp_path)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        _write(tmp_path, _df().iloc[:1])
    assert _snapshot(tmp_path) == before  # also: no .tmp file left behind


def test_write_error_while_rendering_replaces_nothing(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, _df())
    before = _snapshot(tmp_path)

    def broken(*args: object) -> str:
        raise RuntimeError("summary failed")

    monkeypatch.setattr(results, "_summary", broken)
    with pytest.raises(RuntimeError):
        _write(tmp_path, _df().iloc[:1])
    assert _snapshot(tmp_path) == before


def test_write_without_a_best_trial_removes_a_stale_best_config(tmp_path: Path) -> None:
    _write(tmp_path, _df())
    paths = _write(tmp_path, _df()[_df()["status"] != "completed"])
    assert "best_config" not in paths and not (tmp_path / "best_config.yaml").exists()


def test_atomic_write_bytes_replaces_and_keeps_umask_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a.md"
    results.atomic_write_bytes(path, b"old")
    results.atomic_write_bytes(path, "new ü".encode())
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in tmp_path.iterdir()] == ["a.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("where", ["itself", "a parent"])
def test_check_results_dir_refuses_a_file_with_one_line(tmp_path: Path, where: str) -> None:
    file = tmp_path / "results"
    file.write_text("not a folder")
    path = file if where == "itself" else file / "sub"
    with pytest.raises(CbdtuneError, match="is a file") as info:
        results.check_results_dir(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "pass a folder" in message


def test_check_results_dir_accepts_a_missing_folder_without_creating_it(tmp_path: Path) -> None:
    results.check_results_dir(tmp_path / "results" / "deep")
    assert list(tmp_path.iterdir()) == []


def test_pareto_front_of_two_objectives_in_the_summary(tmp_path: Path) -> None:
    """Completed trials no other beats on both objectives, best accuracy first; a stopped trial
    never is on it, however good its numbers."""
    df = results.trials_frame([
        results.trial_row(t, {}, {"val_accuracy": a, "time_total_s": s, "final": 1}, st, "")
        for t, a, s, st in (("a", 0.90, 10.0, "completed"), ("b", 0.80, 5.0, "completed"),
                            ("c", 0.95, 20.0, "completed"), ("d", 0.70, 6.0, "completed"),
                            ("e", 0.99, 1.0, "stopped"))])
    objectives = {"val_accuracy": "max", "time_total_s": "min"}
    assert list(results.pareto_front(df, objectives)["trial_id"]) == ["c", "a", "b"]
    text = results.pareto_section(df, objectives)
    assert "## Pareto front (val_accuracy (max), time_total_s (min))" in text
    assert "| c | 0.95 | 20 |" in text and "| d |" not in text and "| e |" not in text
    assert "no completed trial" in results.pareto_section(df.iloc[4:], objectives)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_search_level_views_follow_the_summary_rule(tmp_path: Path, n: int) -> None:
    """The parent run's importance figure and the other search-level views exist exactly when
    summary.md has importances (>= results.MIN_COMPLETED completed trials), and the figure's
    bars are summary.md's numbers; 2 completed trials once gave a figure while the summary
    said importance needs 3."""
    from cbdtune import views

    space = load_space("smoke")
    df = _completed([0.5, 0.6, 0.7, 0.9, 0.8][:n])
    study = views.export_study(df, {}, space, storage=f"sqlite:///{tmp_path / 'o.db'}",
                               study_name="s", metric="val_accuracy", mode="max")
    imp = results.importances(df, space, "val_accuracy", "max")
    figs = views.draw(study)
    try:
        enough = n >= results.MIN_COMPLETED
        assert isinstance(imp, dict) == enough
        assert set(views.SEARCH_LEVEL) & set(figs) == (set(views.SEARCH_LEVEL) if enough
                                                        else set())
        if enough:
            bars = figs["param_importances.png"].axes[0].patches
            assert sorted(b.get_width() for b in bars) == pytest.approx(sorted(imp.values()))
    finally:
        for fig in figs.values():
            views.close(fig)
