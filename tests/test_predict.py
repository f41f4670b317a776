"""``python -m cbdtune.predict``: a registered model applied to files, in a fresh process too."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cbdtune import predict
from cbdtune.config import DataConfig, preset
from cbdtune.data import Dataset, load_dataset
from cbdtune.model import CBDClassifier, build_head, build_model
from cbdtune.serving import CBDEnsemble, log_model, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on 2 busy cores these tiny models run ~10x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gesture(shared_data_dir: Path) -> Dataset:
    return load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir)), seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, gesture: Dataset) -> dict[str, Any]:
    """A two-member model saved, logged to a sqlite store and registered as ``cbdtune-test``."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("predict")
    members = []
    for seed in (0, 1):
        cfg = preset("smoke").replace({"model.in_channels": 3, "model.seq_len": 315,
                                       "model.num_classes": 8, "train.seed": seed})
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        clf = CBDClassifier(model, build_head(cfg.model, model.num_tokens))
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
        for _ in range(3):  # a few steps, so that predictions depend on the input
            loss = torch.nn.functional.cross_entropy(clf(torch.from_numpy(gesture.train.x[:32])),
                                                     torch.from_numpy(gesture.train.y[:32]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        members.append((cfg, clf.state_dict(), {"seed": seed}))
    model_dir = save_model(tmp / "model", members, class_names=gesture.class_names,
                           dataset=gesture.name)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("predict", artifact_location=str(tmp / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    log_model(uri, run_id, model_dir, registered_name="cbdtune-test",
              input_example=gesture.test.x[:2])
    ensemble = CBDEnsemble.load(model_dir)
    # Every 8th test series (40, 5 per class): a full pass over 320 costs seconds on 2 cores.
    proba = ensemble.predict_proba(gesture.test.x[::8])
    return {"uri": uri, "dir": model_dir, "tmp": tmp, "ensemble": ensemble, "proba": proba,
            "y": gesture.test.y[::8]}


@pytest.fixture(scope="module")
def subset_ts(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Path:
    """The UWave test file with its header and every 8th case (the ``store`` subset)."""
    lines = (shared_data_dir / "UWaveGestureLibrary" / "UWaveGestureLibrary_TEST.ts") \
        .read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("@data")) + 1
    path = tmp_path_factory.mktemp("ts") / "gesture_subset.ts"
    path.write_text("".join(lines[:start] + lines[start:][::8]))
    return path


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``predict.cli`` sets with ``setdefault``, set here so that it is undone after."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")


def run_predict(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m cbdtune.predict`` in a fresh interpreter (nothing imported from this one)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "cbdtune.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_models_uri_in_fresh_process_matches_in_process(store: dict[str, Any],
                                                                subset_ts: Path) -> None:
    proc = run_predict("--model", "models:/cbdtune-test/latest", "--mlflow-uri", store["uri"],
                       "--input", str(subset_ts), cwd=store["tmp"])
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(proc.stdout)
    names = store["ensemble"].class_names
    assert list(rows[0]) == ["index", "label", *(f"prob_{c}" for c in names), "true_label"]
    got = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
    np.testing.assert_allclose(got, store["proba"], atol=1e-7)
    predicted = store["proba"].argmax(axis=1)
    assert [r["label"] for r in rows] == [names[k] for k in predicted]
    assert [r["true_label"] for r in rows] == [names[k] for k in store["y"]]
    correct = int((predicted == store["y"]).sum())
    assert proc.stderr.strip() == f"accuracy: {correct / 40:.4f} ({correct}/40)"
    assert not (store["tmp"] / "mlruns").exists(), "predict must not create a local store"


def test_predict_dataset_name_gives_its_test_split(store: dict[str, Any], gesture: Dataset,
                                                   shared_data_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pred.csv"
    code = predict.cli(["--model", "models:/cbdtune-test/1", "--mlflow-uri", store["uri"],
                        "--input", "gesture", "--data-dir", str(shared_data_dir),
                        "--output", str(out)])
    assert code == 0
    rows = read_csv(out.read_text())
    names = store["ensemble"].class_names
    assert [r["true_label"] for r in rows] == [names[k] for k in gesture.test.y]
    got = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows[::8]])
    np.testing.assert_allclose(got, store["proba"], atol=1e-7)
    correct = sum(r["label"] == r["true_label"] for r in rows)
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"accuracy: {correct / 320:.4f} ({correct}/320)"


def test_predict_npy_with_raw_model_folder_has_no_true_label(store: dict[str, Any],
                                                             gesture: Dataset, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    path = tmp_path / "x.npy"
    np.save(path, gesture.test.x[:10, :, :300])  # shorter: padded with each channel's last value
    code = predict.cli(["--model", str(store["dir"]), "--input", str(path)])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    rows = read_csv(captured.out)
    assert len(rows) == 10 and "true_label" not in rows[0]
    expected = store["ensemble"].predict(gesture.test.x[:10, :, :300])
    assert [r["label"] for r in rows] == expected


def _bad_npy(tmp: Path, name: str, x: np.ndarray) -> str:
    np.save(tmp / name, x)
    return str(tmp / name)


@pytest.mark.parametrize("case, message", [
    ("channels", "2 channels, but the model takes 3"),
    ("nan", "channel 1, step 5 (0-based) is NaN or infinite"),
    ("too_long", "400 time steps, but the model takes at most 315"),
    ("missing", "missing.npy: file not found"),
    ("extension", "unsupported file type '.csv'"),
    ("no_model", "no such folder, and not a models:/ or runs:/ URI"),
])
def test_predict_bad_input_one_line_exit_2(case: str, message: str, store: dict[str, Any],
                                           tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    x = np.zeros((3, 3, 315), dtype=np.float32)
    x_nan = x.copy()
    x_nan[2, 1, 5] = np.nan
    inputs = {
        "channels": _bad_npy(tmp_path, "c.npy", x[:, :2]),
        "nan": _bad_npy(tmp_path, "n.npy", x_nan),
        "too_long": _bad_npy(tmp_path, "l.npy", np.zeros((3, 3, 400), dtype=np.float32)),
        "missing": str(tmp_path / "missing.npy"),
        "extension": str(tmp_path / "x.csv"),
        "no_model": _bad_npy(tmp_path, "ok.npy", x),
    }
    (tmp_path / "x.csv").write_text("1,2,3\n")
    model = str(tmp_path / "nowhere") if case == "no_model" else str(store["dir"])
    code = predict.cli(["--model", model, "--input", inputs[case]])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and captured.out == "", captured
    assert err[0].startswith("error: ") and message in err[0]


def test_predict_unknown_registered_model_one_line(store: dict[str, Any],
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """capfd, not capsys: MLflow's own log handlers write to the file descriptor."""
    code = predict.cli(["--model", "models:/cbdtune-nope/latest", "--mlflow-uri", store["uri"],
                        "--input", "gesture"])
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and captured.out == "", captured
    assert err[0].startswith("error: --model models:/cbdtune-nope/latest: not found in ")
    assert "registered models there: cbdtune-test" in err[0]
