"""Whole datasets end to end at a tiny budget: train, hand over a model, predict every test series.

JapaneseVowels (UEA: 270 train / 370 test, 12 channels, 7..26 steps in train but up to 29 in
test) is the variable-length case: the model's length is the longest TRAINING series, and a
longer test series is cut (``pad``) by the loader and by ``cbdtune.predict`` alike, so the
accuracy a trial or a search reports is the one a user gets from the saved model.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cbdtune import predict
from cbdtune.config import preset
from cbdtune.data import Dataset, load_dataset
from cbdtune.pipeline import run_trial
from cbdtune.runtime import Runtime
from cbdtune.serving import save_model

REPO = Path(__file__).resolve().parents[1]
JV_TEST = 370  # JapaneseVowels test series
JV_LENGTH = 26  # its longest training series (the longest test series has 29 steps)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def jv_cfg(shared_data_dir: Path) -> Any:
    """The smoke preset on JapaneseVowels, 3-fold CV (a smaller budget than the preset's 5)."""
    return preset("smoke").replace({"data.dataset": "JapaneseVowels",
                                    "data.data_dir": str(shared_data_dir),
                                    "data.cv_folds": 3, "train.num_threads": 1})


@pytest.fixture(scope="module")
def jv(jv_cfg: Any) -> Dataset:
    return load_dataset(jv_cfg.data, seed=0, download=False)


def _jv_ts(shared_data_dir: Path) -> Path:
    return shared_data_dir / "UEA_JapaneseVowels" / "JapaneseVowels_TEST.ts"


def _predicted(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def _correct(rows: list[dict[str, str]]) -> int:
    return sum(row["label"] == row["true_label"] for row in rows)


def test_japanese_vowels_trial_then_predict_all_370(jv_cfg: Any, jv: Dataset, tmp_path: Path,
                                                    shared_data_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke trial on JapaneseVowels; its classifier saved and read back by `cbdtune.predict`
    from the raw TEST.ts (series up to 29 steps, cut to 26) and by dataset name: all 370 series
    get a label and the accuracy is the trial's test accuracy, exactly."""
    assert jv.seq_len == JV_LENGTH and len(jv.test) == JV_TEST
    result = run_trial(jv_cfg, jv, lambda _m, _s: None, rt=Runtime(device=torch.device("cpu")))
    assert result.status == "completed" and result.classifier is not None
    reported = result.metrics["test_accuracy"]
    assert reported > 1 / jv.n_classes  # it learned something: 9 classes, chance is 0.11
    cfg = jv_cfg.replace({"model.in_channels": jv.n_channels, "model.seq_len": jv.seq_len,
                          "model.num_classes": jv.n_classes})
    model_dir = save_model(tmp_path / "model", [(cfg, result.classifier.state_dict(), {})],
                           class_names=jv.class_names, dataset=jv.name)
    expected = f"accuracy: {reported:.4f} ({round(reported * JV_TEST)}/{JV_TEST})"
    for source in (str(_jv_ts(shared_data_dir)), "JapaneseVowels"):
        out = tmp_path / "pred.csv"
        code = predict.cli(["--model", str(model_dir), "--input", source,
                            "--data-dir", str(shared_data_dir), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 0, err
        rows = _predicted(out)
        assert len(rows) == JV_TEST
        assert _correct(rows) == round(reported * JV_TEST), source
        assert err.strip().splitlines()[-1] == expected, source


@pytest.mark.ray
def test_japanese_vowels_smoke_search_then_predict_all_370(tmp_path: Path,
                                                           shared_data_dir: Path) -> None:
    """A one-trial smoke search on JapaneseVowels through Ray, its best configuration refit and
    registered; `cbdtune.predict` in a fresh process on the saved model labels all 370 series
    of the raw TEST.ts with the accuracy the search reported."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", "JapaneseVowels",
           "--data-dir", str(shared_data_dir), "--space", "smoke", "--num-samples", "1",
           "--cv-folds", "3", "--refit-top", "1", "--refit-seeds", "1", "--no-baseline",
           "--storage", str(tmp_path / "ray"), "--results-dir", str(tmp_path / "results"),
           "--mlflow-uri", uri, "--experiment", "cbdtune-test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    [parent] = [r for r in MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("cbdtune-test").experiment_id])
        if r.data.tags.get("cbdtune.role") == "search"]
    reported = parent.data.metrics["ensemble_test_accuracy"]
    [model] = list((tmp_path / "results").glob("*/*/model"))
    out = tmp_path / "pred.csv"
    pred = subprocess.run(
        [sys.executable, "-m", "cbdtune.predict", "--model", str(model), "--input",
         str(_jv_ts(shared_data_dir)), "--output", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert pred.returncode == 0, pred.stderr[-2000:]
    rows = _predicted(out)
    assert len(rows) == JV_TEST
    assert _correct(rows) == round(reported * JV_TEST)
    assert pred.stderr.strip().splitlines()[-1] == (
        f"accuracy: {reported:.4f} ({round(reported * JV_TEST)}/{JV_TEST})")
