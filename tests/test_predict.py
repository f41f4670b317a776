"""``python -m cbdtune.predict``: a registered model applied to files, in a fresh process too."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    ("missing", "missing.npy: file not found"),
    ("extension", "unsupported file type '.csv'"),
    ("no_model", "no such folder, and not a models:/ or runs:/ URI"),
    ("empty", "e.npy: not a plain .npy array"),
    ("times_1e20", "series 1: channel 0, step 0 (0-based) is 1e+20, too large for float32"),
    ("value_1e39", "series 2: channel 1, step 7 (0-based) is 1e+39, too large for float32 "
                   "(beyond float32's maximum"),
    ("complex", "holds complex numbers; the model takes real series"),
    ("ts_1e39", "channel 2, value 3: 1e+39 is too large for float32"),
])
def test_predict_bad_input_one_line_exit_2(case: str, message: str, store: dict[str, Any],
                                           subset_ts: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    x = np.zeros((3, 3, 315), dtype=np.float32)
    x_nan = x.copy()
    x_nan[2, 1, 5] = np.nan
    ones = np.ones((3, 3, 315))
    scaled, huge = ones.copy(), ones.copy()
    scaled[1] *= 1e20  # finite in float32 too, but its squares are not (instance norm)
    huge[2, 1, 7] = 1e39  # finite in float64 only
    (tmp_path / "e.npy").write_bytes(b"")
    lines = subset_ts.read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith("@data")) + 1
    channels = lines[first].split(":")
    values = channels[1].split(",")
    values[2] = "1e39"
    lines[first] = ":".join([channels[0], ",".join(values), *channels[2:]])
    (tmp_path / "big.ts").write_text("".join(lines))
    inputs = {
        "channels": _bad_npy(tmp_path, "c.npy", x[:, :2]),
        "nan": _bad_npy(tmp_path, "n.npy", x_nan),
        "missing": str(tmp_path / "missing.npy"),
        "extension": str(tmp_path / "x.csv"),
        "no_model": _bad_npy(tmp_path, "ok.npy", x),
        "empty": str(tmp_path / "e.npy"),
        "times_1e20": _bad_npy(tmp_path, "s.npy", scaled),
        "value_1e39": _bad_npy(tmp_path, "h.npy", huge),
        "complex": _bad_npy(tmp_path, "j.npy", ones + 1j),
        "ts_1e39": str(tmp_path / "big.ts"),
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


@pytest.fixture(scope="module")
def resample_store(store: dict[str, Any], gesture: Dataset) -> dict[str, Any]:
    """A one-member model with ``length_policy: resample``, registered as ``cbdtune-resample``
    in ``store``'s tracking store."""
    from mlflow import MlflowClient

    cfg = preset("smoke").replace({"model.in_channels": 3, "model.seq_len": 315,
                                   "model.num_classes": 8, "data.length_policy": "resample"})
    torch.manual_seed(2)
    model = build_model(cfg.model)
    clf = CBDClassifier(model, build_head(cfg.model, model.num_tokens))
    model_dir = save_model(store["tmp"] / "resample", [(cfg, clf.state_dict(), {})],
                           class_names=gesture.class_names, dataset=gesture.name)
    client = MlflowClient(store["uri"])
    run_id = client.create_run(client.get_experiment_by_name("predict").experiment_id) \
        .info.run_id
    log_model(store["uri"], run_id, model_dir, registered_name="cbdtune-resample",
              input_example=gesture.test.x[:2])
    return {"dir": model_dir, "name": "cbdtune-resample"}


@pytest.mark.parametrize("policy", ["pad", "resample"])
def test_served_model_fits_lengths_as_the_cli_does(policy: str, store: dict[str, Any],
                                                   resample_store: dict[str, Any],
                                                   gesture: Dataset, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A shorter and a longer series through the MLflow pyfunc model and ``cbdtune.predict``:
    the same labels and probabilities, and what the contract's policy says (pad: a longer
    series is cut to its first L steps)."""
    import mlflow

    from cbdtune.data._lengths import to_length

    name, folder = (("cbdtune-test", store["dir"]) if policy == "pad"
                    else (resample_store["name"], resample_store["dir"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    served = mlflow.pyfunc.load_model(f"models:/{name}/latest")
    ensemble = CBDEnsemble.load(folder)
    long = np.concatenate([gesture.test.x[:4], gesture.test.x[4:8, :, :100]], axis=2)  # 415
    for x in (gesture.test.x[:4, :, :200], long):
        np.save(tmp_path / "x.npy", x)
        assert predict.cli(["--model", str(folder), "--input", str(tmp_path / "x.npy")]) == 0
        rows = read_csv(capsys.readouterr().out)
        frame = served.predict(x)
        assert [r["label"] for r in rows] == list(frame["label"])
        cli_proba = np.array([[float(r[f"prob_{c}"]) for c in ensemble.class_names]
                              for r in rows])
        np.testing.assert_allclose(cli_proba, frame.drop(columns="label").to_numpy(),
                                   rtol=1e-6, atol=1e-8)
        fitted = np.stack([to_length(case, 315, policy) for case in x])  # type: ignore[arg-type]
        np.testing.assert_array_equal(frame.drop(columns="label").to_numpy(),
                                      ensemble.predict_proba(fitted))
    if policy == "pad":
        np.testing.assert_array_equal(ensemble.predict_proba(long),
                                      ensemble.predict_proba(gesture.test.x[:4]))


def test_refit_test_accuracy_equals_predict_on_the_saved_model(gesture: Dataset,
                                                               shared_data_dir: Path,
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    """One precision: a refit scores test as the saved model does, bit for bit, even where bf16
    autocast is available for training (forced on here, as on a bf16 machine)."""
    from cbdtune import pipeline, refit, runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    cfg = preset("smoke").replace({"data.dataset": "gesture", "data.data_dir":
                                   str(shared_data_dir), "train.pretrain_epochs": 1,
                                   "train.amp": True, "train.device": "cpu"})
    metrics, clf, proba = pipeline.refit_trial(cfg, gesture, stage="linear_probe", epochs=2)
    resolved = dataclasses.replace(cfg, model=clf.model.cfg)  # as the worker hands it over
    folder = save_model(tmp_path / "model", [(resolved, clf.state_dict(), {})],
                        class_names=gesture.class_names, dataset=gesture.name)
    np.testing.assert_array_equal(proba.astype(np.float64),
                                  CBDEnsemble.load(folder).predict_proba(gesture.test.x))
    scored = refit.score_saved_model(folder, gesture.test.x, gesture.test.y)
    assert scored == metrics["test_accuracy"]
    assert predict.cli(["--model", str(folder), "--input", "gesture", "--data-dir",
                        str(shared_data_dir)]) == 0
    correct = round(metrics["test_accuracy"] * 320)
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"accuracy: {correct / 320:.4f} ({correct}/320)"
