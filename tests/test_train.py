"""``python -m cbdtune.train``: one trial from the command line, logged to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from cbdtune import tracking, train
from cbdtune.config import CbdtuneError


def test_train_cli_in_process_prints_val_and_test(tmp_path: Path, capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = train.cli(["--dataset", "gesture", "--preset", "smoke", "--in-process",
                      "--set", "train.classifier_epochs=5", "--mlflow-uri", uri,
                      "--experiment", "train-test"])
    out = capsys.readouterr().out
    assert code == 0
    assert "val_accuracy" in out and "test_accuracy" in out and "completed" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("train-test").experiment_id])
    assert run.data.params["train.classifier_epochs"] == "5"
    assert "test_accuracy" in run.data.metrics and run.data.tags["cbdtune.status"] == "completed"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) > 5
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curve.png", "spectrum_energy.png"} <= arts


def test_train_in_process_logs_progress_lines_when_stderr_is_a_file(tmp_path: Path) -> None:
    """No tqdm bar without a terminal: ``> log 2>&1`` gets one line per tenth of a stage's epochs
    (here every epoch) while it runs, before the final table."""
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "cbdtune.train", "--dataset", "gesture",
                               "--preset", "smoke", "--in-process", "--no-mlflow",
                               "--set", "train.pretrain_epochs=2", "--set", "train.probe_epochs=1",
                               "--set", "train.classifier_epochs=2"],
                              stdout=out, stderr=subprocess.STDOUT, timeout=600)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    progress = [line.split(" loss=")[0].split(" cv_acc=")[0] for line in lines
                if line.startswith(("pretrain: epoch", "linear_probe: epoch"))]
    assert progress == ["pretrain: epoch 1/2", "pretrain: epoch 2/2",
                        "linear_probe: epoch 1/2", "linear_probe: epoch 2/2"], lines
    assert lines.index(next(x for x in lines if x.startswith("status"))) > lines.index(
        next(x for x in lines if x.startswith("linear_probe: epoch 2/2")))


def test_train_cli_bad_override_one_line(capsys) -> None:
    code = train.cli(["--dataset", "gesture", "--in-process", "--set", "model.mask_ratio=1.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("error: --set: model.mask_ratio: expected a float in (0, 1), but got 1.2")


def test_train_cli_config_file_and_unknown_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  bernstien_order: 4\n")
    code = train.cli(["--dataset", "gesture", "--in-process", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.bernstien_order: unknown key; did you mean model.bernstein_order" \
        in err and str(path) in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "model.mask_ratio=[0.1"], "--set model.mask_ratio=[0.1: the value of "
                                         "model.mask_ratio is not valid YAML"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--cpus-per-worker", "nan"], "--cpus-per-worker nan: must be a finite number >= 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1.0: must be a finite number >= 0"),
    (["--workers", "0"], "--workers 0: must be >= 1"),
    (["--mlflow-uri", "file:///tmp/mlruns"], "a file store"),
])
def test_train_cli_bad_input_one_line_before_ray(capsys, flags: list[str], message: str) -> None:
    import ray

    code = train.cli(["--dataset", "gesture", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not ray.is_initialized()


def test_train_cli_gpus_on_a_machine_without_cuda_refused(capsys, monkeypatch) -> None:
    """Ray would wait forever for a GPU this machine does not have (it hung 11 minutes)."""
    import ray
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = train.cli(["--dataset", "gesture", "--gpus-per-worker", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "this machine has no CUDA GPU" in err[0]
    assert not ray.is_initialized()


def test_check_cluster_gpus_refuses_more_gpus_than_the_cluster_has() -> None:
    train.check_cluster_gpus({"CPU": 8.0, "GPU": 2.0}, 2, 1.0)
    train.check_cluster_gpus({"CPU": 8.0}, 4, 0.0)
    with pytest.raises(CbdtuneError, match="need 3 GPU but the Ray cluster has 2"):
        train.check_cluster_gpus({"CPU": 8.0, "GPU": 2.0}, 3, 1.0)


def test_train_cli_read_only_store_refused(tmp_path: Path, capsys) -> None:
    db = tmp_path / "mlflow.db"
    tracking.client(f"sqlite:///{db}").search_experiments()
    db.chmod(0o444)
    capsys.readouterr()  # MLflow's own lines while it made the tables
    try:
        code = train.cli(["--dataset", "gesture", "--in-process", "--mlflow-uri",
                          f"sqlite:///{db}"])
    finally:
        db.chmod(0o644)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is read-only" in err[0]


@pytest.mark.ray
def test_train_cli_with_trainer_leaves_no_ray_results(tmp_path: Path) -> None:
    """The TorchTrainer's checkpoints go to a temporary folder, removed after the run."""
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "cbdtune.train", "--dataset", "gesture",
                           "--preset", "smoke", "--set", "train.classifier_epochs=2",
                           "--set", "train.pretrain_epochs=1", "--no-mlflow"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "val_accuracy" in proc.stdout
    assert not list((tmp_path / "ray_results").glob("train-*"))


def test_train_default_preset_is_the_default_search_spaces() -> None:
    """One story: ``cbdtune.train`` without --preset starts where a default search starts."""
    from cbdtune.config import load_yaml
    from cbdtune.space import resolve_path

    with resources.as_file(resolve_path("default")) as path:
        space_preset = load_yaml(path)["preset"]
    args = train.parser().parse_args(["--dataset", "gesture"])
    assert args.preset == space_preset == "default"
    text = " ".join(train.parser().format_help().split())
    assert "the default), paper" in text
