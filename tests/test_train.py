"""``python -m cbdtune.train``: one trial from the command line, logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from cbdtune import train


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
