"""The search CLI end to end: results, MLflow runs (sqlite and a real server), ray job submit,
resume after SIGINT, and bad input refused before Ray starts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cbdtune import parent_run, plan, search, tuning
from cbdtune.session import free_port
from cbdtune.space import load_space

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")
EXPERIMENT = "cbdtune-test"


def _search_cmd(tmp: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cbdtune.search", "--dataset", "gesture", "--space", SMOKE,
            "--num-samples", "2", "--storage", str(tmp / "ray"), "--results-dir",
            str(tmp / "results"), "--mlflow-uri", uri, "--experiment", EXPERIMENT,
            "--data-dir", os.environ["CBDTUNE_DATA_DIR"], "--refit-top", "0", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _runs(uri: str) -> tuple[list, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "no MLflow experiment was created"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cbdtune.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _check_outputs(tmp: Path, uri: str, n: int) -> pd.DataFrame:
    """n trials in the parquet, 1 parent + n nested finished runs with the searched params."""
    [out] = list((tmp / "results").glob("*/*/trials.parquet"))
    df = pd.read_parquet(out)
    assert len(df) == n and df["trial_id"].is_unique
    assert set(df["status"]) <= {"completed", "stopped"} and (df["status"] == "completed").any()
    assert (out.parent / "summary.md").read_text().startswith("# Search summary")
    assert (out.parent / "best_config.yaml").is_file()
    parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == n
    parent_id = parents[0].info.run_id
    assert {c.data.tags["cbdtune.trial_id"] for c in children} == set(df["trial_id"])
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["cbdtune.status"] in ("completed", "stopped")
        for key in ("model.mask_ratio", "model.bernstein_order", "loss.gamma"):
            assert key in child.data.params
        assert "val_accuracy" in child.data.metrics
        if child.data.tags["cbdtune.status"] == "completed":
            assert "test_accuracy" in child.data.metrics
    return df


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.ray
def test_search_smoke_against_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    """2-trial smoke search: parquet, summary, 1 parent + 2 nested runs read via MlflowClient;
    the best configuration refit with 2 seeds (``--ensemble top``: selection may hand over the
    baseline alone), registered, and its model, loaded in a fresh process by `cbdtune.predict`,
    reproduces the search's ensemble test accuracy exactly."""
    cmd = _search_cmd(tmp_path, mlflow_server, "--refit-top", "1", "--refit-seeds", "2",
                      "--ensemble", "top")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best trial" in proc.stdout and "test_accuracy" in proc.stdout
    _check_outputs(tmp_path, mlflow_server, 2)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    parents, children = _runs(mlflow_server)
    arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"config.yaml", "learning_curve.png", "spectrum_energy.png"} <= arts
    reported = parents[0].data.metrics["ensemble_test_accuracy"]
    [version] = client.search_model_versions("name='cbdtune-gesture'")
    assert version.run_id == parents[0].info.run_id
    [summary] = list((tmp_path / "results").glob("*/*/summary.md"))
    assert "## Refit on every training series, tested once" in summary.read_text()
    assert f"test accuracy {100 * reported:.2f}" in summary.read_text()
    contract = json.loads((summary.parent / "model" / "contract.json").read_text())
    assert len(contract["members"]) == 2
    assert {m["seed"] for m in contract["members"]} == {0, 1}
    out = subprocess.run(
        [sys.executable, "-m", "cbdtune.predict", "--model", "models:/cbdtune-gesture/latest",
         "--mlflow-uri", mlflow_server, "--input", "gesture",
         "--output", str(tmp_path / "pred.csv")], capture_output=True, text=True, env=_env(),
        timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n = len(pd.read_csv(tmp_path / "pred.csv"))
    assert n == 320
    assert out.stderr.strip() == f"accuracy: {reported:.4f} ({round(reported * n)}/{n})"


@pytest.mark.ray
def test_search_with_the_ridge_readout_hands_over_a_model_predict_reproduces(
        tmp_path: Path) -> None:
    """The default preset's classifier through Ray: trials select on the ridge path (probed by
    it), the refit is saved, and `cbdtune.predict` on the saved folder, in a fresh process,
    reproduces the ensemble's test accuracy (the head's fitted buffers travel with it)."""
    space = tmp_path / "ridge.yaml"
    space.write_text(Path(SMOKE).read_text() + "train.classifier: ridge\ntrain.probe: ridge\n"
                     "model.level_features: {type: categorical, choices: [true, false]}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _search_cmd(tmp_path, uri, "--refit-top", "1", "--refit-seeds", "1")
    cmd[cmd.index(SMOKE)] = str(space)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = _check_outputs(tmp_path, uri, 2)
    done = df[df["status"] == "completed"]
    assert (done["selected_stage"] == "ridge").all() and (done["val_accuracy"] > 0.3).all()
    [parent], _ = _runs(uri)
    reported = parent.data.metrics["ensemble_test_accuracy"]
    [model] = list((tmp_path / "results").glob("*/*/model"))
    out = subprocess.run(
        [sys.executable, "-m", "cbdtune.predict", "--model", str(model), "--input", "gesture",
         "--output", str(tmp_path / "pred.csv")], capture_output=True, text=True, env=_env(),
        timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.strip() == f"accuracy: {reported:.4f} ({round(reported * 320)}/320)"


@pytest.mark.ray
def test_search_two_objectives_smoke_lists_the_pareto_front(tmp_path: Path) -> None:
    """--metric val_accuracy,time_total_s: Optuna's multi-objective study; trials ranked by
    val_accuracy as before, and summary.md lists the Pareto front of both."""
    from cbdtune import results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _search_cmd(tmp_path, uri, "--metric", "val_accuracy,time_total_s")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = _check_outputs(tmp_path, uri, 2)
    [summary] = list((tmp_path / "results").glob("*/*/summary.md"))
    text = summary.read_text()
    assert "## Pareto front (val_accuracy (max), time_total_s (min))" in text
    front = results.pareto_front(df, {"val_accuracy": "max", "time_total_s": "min"})
    assert len(front) >= 1 and all(f"| {t} |" in text for t in front["trial_id"])
    best = results.best_trial(df, "val_accuracy", "max")
    assert front["val_accuracy"].max() == best["val_accuracy"]  # the top accuracy is on it
    assert f"# best trial {best['trial_id']}: val_accuracy=" in (
        summary.parent / "best_config.yaml").read_text()
    [parent], _ = _runs(uri)
    assert parent.data.params["metric"] == "val_accuracy,time_total_s"


@contextlib.contextmanager
def _ray_head(env: dict[str, str], log: Path) -> Iterator[int]:
    """A Ray head of this test's own on loopback (``ray start --head --block``); yields its
    dashboard port. Ending the ``--block`` command stops that head's processes and no other
    Ray's (``ray stop`` would stop every Ray on the machine: a user's searches included)."""
    port, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(log, "w") as out:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start in 180 s"
            time.sleep(0.5)
        yield dash
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()


@pytest.mark.ray
def test_search_ray_job_submit_succeeds(tmp_path: Path) -> None:
    """A Ray head on loopback + `ray job submit -- python -m cbdtune.search` SUCCEEDED."""
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with _ray_head(env, tmp_path / "head.log") as dash:
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
             *_search_cmd(tmp_path, uri)],  # the job runs `python -m cbdtune.search ...`
            capture_output=True, text=True, env=env, timeout=600)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "succeeded" in (job.stdout + job.stderr)
    df = _check_outputs(tmp_path, uri, 2)
    assert len(df) == 2


@pytest.mark.ray
def test_search_resume_after_sigint_no_duplicates(tmp_path: Path) -> None:
    """SIGINT after the first finished trial: exit 130, runs ended KILLED, the printed --resume
    command completes all trials with no duplicate runs; views and the study on the parent."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _search_cmd(tmp_path, uri, "--scheduler", "none", "--max-concurrent", "1")
    cmd[cmd.index("--num-samples") + 1] = "3"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 400
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        if (tmp_path / "mlflow.db").exists():
            try:
                _, children = _runs(uri)
            except Exception:  # the store is being created
                continue
            finished = sum(c.info.status == "FINISHED" for c in children)
            if finished >= 1:
                break
    first = (tmp_path / "first.log").read_text
    assert finished >= 1 and proc.poll() is None, first()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    out = first()
    assert proc.returncode == 130, out[-3000:]
    assert "trial 1/3 " in out  # the one-line progress, also when stdout is a file
    [resume] = [line.strip() for line in out.splitlines() if line.strip().endswith("--resume")]
    parents, children = _runs(uri)
    assert parents[0].info.status == "KILLED"
    assert parents[0].data.tags["cbdtune.reason"] == "interrupted (Ctrl-C)"
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    for child in children:
        if child.info.status == "KILLED":
            assert child.data.tags["cbdtune.reason"] == "interrupted; --resume continues it"
    [table] = list((tmp_path / "results").glob("*/*/trials.parquet"))
    assert "stopped" not in set(pd.read_parquet(table)["status"])  # Ctrl-C is not ASHA
    argv = shlex.split(resume)
    assert argv[:3] == ["python", "-m", "cbdtune.search"]
    resumed = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    df = _check_outputs(tmp_path, uri, 3)
    assert (df["status"] == "completed").all()
    [parent], children = _runs(uri)
    client = MlflowClient(uri)
    for child in children:  # a resumed trial continues its step count (it restarted at 1)
        epochs: dict[int, set[float]] = {}
        for m in client.get_metric_history(child.info.run_id, "epoch"):
            epochs.setdefault(m.step, set()).add(m.value)
        assert all(len(v) == 1 for v in epochs.values()), (child.info.run_id, epochs)
    assert parent.info.status == "FINISHED"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "views")}
    assert "views/optimization_history.png" in arts
    assert (tmp_path / "optuna.db").is_file()


# ---- bad input: refused before Ray starts -----------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("model.mask_ratoi: {type: float, low: 0.1, high: 0.5}", "unknown key"),
    ("model.mask_ratio: {type: float, low: 0.8, high: 0.2}", "must not exceed high"),
    ("model.mask_ratio: {type: float, low: 0.5, high: 1.0}", "expected a float in (0, 1)"),
    ("model.bernstein_order: {type: int, low: 0, high: 4}", "must be >= 1"),
    ("loss.w_freq_rec: {type: float, low: -0.5, high: 1.0}", "must be a finite number >= 0"),
    ("model.mask_ratio: [0.1, 0.5", "invalid YAML"),
])
def test_cli_bad_space_exits_nonzero_with_one_line(tmp_path: Path, capsys, text: str,
                                                   message: str) -> None:
    import ray

    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    code = search.cli(["--dataset", "gesture", "--space", str(path),
                       "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert str(path) in err
    assert not ray.is_initialized(), "Ray started before the space was validated"
    assert not (tmp_path / "r").exists()


def test_cli_unreachable_mlflow_uri_fails_at_start(tmp_path: Path, capsys) -> None:
    import ray

    code = search.cli(["--dataset", "gesture", "--space", "smoke", "--mlflow-uri",
                       f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot reach the MLflow server" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize("argv", [
    ["--metric", "test_accuracy"],
    ["--dataset", "gestur"],
    ["--num-samples", "0"],
    ["--space", "nonexistent"],
    ["--seed", "-1"],
    ["--cpus-per-worker", "nan"],
    ["--gpus-per-worker", "inf"],
    ["--time-budget", "90x"],
    ["--time-budget", "nan"],
    ["--mlflow-uri", "file:///tmp/mlruns"],
    ["--mlflow-uri", "ftp://host/store"],
])
def test_cli_bad_flags_exit_2(capsys, argv: list[str]) -> None:
    base = ["--dataset", "gesture", "--space", "smoke"]
    for i in range(0, len(argv), 2):
        if argv[i] in base:
            base[base.index(argv[i]) + 1] = argv[i + 1]
        else:
            base += argv[i:i + 2]
    assert search.cli(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_search_same_seed_same_trials() -> None:
    space = load_space("smoke")

    def suggestions(sampler: str, seed: int) -> list[dict]:
        s = tuning.make_searcher(space, sampler=sampler, seed=seed, metric="val_accuracy",
                                 mode="max", max_concurrent=8)
        s.set_search_properties("val_accuracy", "max",
                                tuning.param_space(search.SearchSettings(datasets=("gesture",)), None))
        return [s.suggest(f"t{i}")["train_loop_config"] for i in range(4)]

    for sampler in set(search.SAMPLERS) - {"grid"}:  # smoke has float ranges: no grid
        assert suggestions(sampler, 0) == suggestions(sampler, 0), sampler
        assert suggestions(sampler, 0) != suggestions(sampler, 1), sampler


def test_report_budget_covers_a_full_trial(tmp_path: Path) -> None:
    from cbdtune import reports

    space = load_space("smoke")
    cfg = space.base
    # smoke: 4 pretraining epochs probed every 2 -> 2 reports; 15 classifier epochs + stage end;
    # the final report.
    assert reports.report_budget(cfg) == 2 + 16 + 1
    both = cfg.replace({"train.classifier": "both"})
    assert reports.report_budget(both) == 2 + 2 * 16 + 1
    # ASHA's max_t for a space: searched epoch counts at their top, "both" when it is a choice
    path = tmp_path / "s.yaml"
    path.write_text("preset: smoke\ntrain.classifier: {type: categorical, choices: "
                    "[linear_probe, both]}\ntrain.classifier_epochs: {type: int, low: 5, "
                    "high: 20}\n")
    assert search.max_reports(cfg, load_space(str(path))) == 2 + 2 * 21 + 1


def _fake_tune_experiment(folder: Path) -> None:
    # Tuner.can_restore looks for exactly this file (ray/tune/impl/tuner_internal.py, _TUNER_PKL).
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")


def test_search_name_skips_a_taken_results_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    from cbdtune import results

    space = load_space("smoke")
    settings = search.SearchSettings(datasets=("gesture",))
    dataset_dir = tmp_path / "results" / "UWaveGestureLibrary"
    first = dataset_dir / "gesture-default"
    df = results.trials_frame([results.trial_row("a", {}, {"val_accuracy": 0.9}, "completed", "")])
    results.write(first, df, space, space.base, metric="val_accuracy", mode="max",
                  command="first", header={})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    # The Ray storage is empty (another machine, or ~/ray_results cleaned): the folder decides.
    name = plan.search_name(settings, str(tmp_path / "ray"), "default",
                               results_dir=dataset_dir)
    assert name == "gesture-default-2"
    results.write(dataset_dir / name, df, space, space.base, metric="val_accuracy", mode="max",
                  command="second", header={})
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_search_name_storage_or_results_take_a_name_resume_needs_storage(tmp_path: Path) -> None:
    root, dataset_dir = tmp_path / "ray", tmp_path / "results" / "X"
    _fake_tune_experiment(root / "s")
    (dataset_dir / "s-2").mkdir(parents=True)
    (dataset_dir / "s-2" / "summary.md").write_text("x")
    (dataset_dir / "s-3").mkdir()  # empty: free
    p = search.parser()

    def name(*flags: str) -> str:
        args = p.parse_args(["--dataset", "gesture", "--name", "s", *flags])
        settings = search.SearchSettings.from_args(args)
        return plan.search_name(settings, str(root), "smoke", results_dir=dataset_dir)

    assert name() == "s-3"
    assert name("--resume") == "s"  # s-2 has results only: nothing for Tune to restore
    assert name("--overwrite") == "s"
    assert name("--resume", "--overwrite") == "s"


def test_search_name_resume_without_storage_is_a_one_line_error(tmp_path: Path) -> None:
    settings = search.SearchSettings(datasets=("gesture",), resume=True)
    with pytest.raises(search.CbdtuneError, match="--resume: no search named gesture-smoke"):
        plan.search_name(settings, str(tmp_path / "ray"), "smoke", results_dir=tmp_path / "r")


def test_cli_read_only_storage_exits_2_before_ray(tmp_path: Path, capsys) -> None:
    import ray

    storage = tmp_path / "ray"
    storage.mkdir()
    storage.chmod(0o555)
    try:
        code = search.cli(["--dataset", "gesture", "--space", "smoke", "--storage", str(storage),
                           "--results-dir", str(tmp_path / "r"),
                           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    finally:
        storage.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is read-only" in err
    assert not ray.is_initialized()


def test_cli_truncated_mlflow_store_exits_2_before_ray(tmp_path: Path, capsys) -> None:
    import ray

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes([16, 0]) + bytes(10) + (50).to_bytes(4, "big")
                   + bytes(200))  # the header declares 50 pages of 4096 bytes: 232 are here
    code = search.cli(["--dataset", "gesture", "--space", "smoke", "--mlflow-uri",
                       f"sqlite:///{db}", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is truncated" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize(("text", "seconds"), [("90m", 5400), ("2h", 7200), ("3600s", 3600),
                                               ("45", 45), ("1.5h", 5400), (" 1d ", 86400)])
def test_parse_duration_units(text: str, seconds: float) -> None:
    assert search.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "-5m", "nan", "inf", "1h30m", "2 hours", "m"])
def test_parse_duration_rejects_with_one_line(text: str) -> None:
    with pytest.raises(search.CbdtuneError, match="expected a positive duration") as err:
        search.parse_duration(text)
    assert "\n" not in str(err.value)


def test_resume_command_pins_the_name_and_drops_overwrite() -> None:
    argv = ["--dataset", "gesture", "--space", "my space.yaml", "--overwrite", "--name", "old",
            "--num-samples", "4"]
    cmd = search.resume_command(argv, "gesture-smoke-2")
    assert cmd.endswith("--dataset gesture --space 'my space.yaml' --num-samples 4 "
                        "--name gesture-smoke-2 --resume")
    assert "--overwrite" not in cmd and "old" not in cmd
    assert search.resume_command(["--name=x", "--resume"], "x").endswith(" --name x --resume")


def test_shown_path_is_relative_inside_the_working_directory(tmp_path: Path,
                                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spaces").mkdir()
    inside = tmp_path / "spaces" / "s.yaml"
    assert search.shown_path(str(inside)) == "spaces/s.yaml"
    assert search.shown_path("smoke", inside) == "spaces/s.yaml"
    assert search.shown_path("smoke", "/elsewhere/smoke.yaml") == "smoke"
    assert search.shown_path("../data") == "../data"


def _write_state(folder: Path, session: str, statuses: dict[str, str]) -> None:
    """An experiment state file shaped like Ray 2.60's (TuneController.save_to_dir)."""
    import json

    trial_data = [[json.dumps({"trial_id": t, "status": st, "config": {}}), json.dumps({})]
                  for t, st in statuses.items()]
    (folder / f"experiment_state-{session}.json").write_text(
        json.dumps({"trial_data": trial_data, "runner_data": {}, "stats": {}}))


def test_persisted_trial_states_reads_the_newest_state_file(tmp_path: Path) -> None:
    _write_state(tmp_path, "2026-01-01_10-00-00", {"a": "RUNNING"})
    _write_state(tmp_path, "2026-01-02_09-00-00", {"a": "TERMINATED", "b": "PENDING"})
    assert search.persisted_trial_states(str(tmp_path)) == {"a": "TERMINATED", "b": "PENDING"}
    assert search.persisted_trial_states(str(tmp_path / "missing")) == {}


def test_rows_trust_the_persisted_state_over_the_last_result(tmp_path: Path) -> None:
    """After Ctrl-C Tune marks every trial TERMINATED in memory; the file says RUNNING."""
    from types import SimpleNamespace

    frame = pd.DataFrame({"training_iteration": [1, 2, 3], "val_accuracy": [0.5, None, 0.7]})

    def result(trial_id: str, last: dict) -> SimpleNamespace:
        return SimpleNamespace(metrics={"trial_id": trial_id, **last}, path=f"x/trial_{trial_id}",
                               error=None, config={"train_loop_config": {"model.mask_ratio": 0.5}},
                               metrics_dataframe=frame)

    grid = [result("a", {"final": 1, "val_accuracy": 0.8}),
            result("b", {"training_iteration": 3, "val_accuracy": 0.7})]
    rows, curves = tuning.trial_rows(grid, {"a": "TERMINATED", "b": "RUNNING"}, "val_accuracy")
    assert [r["status"] for r in rows] == ["completed", "unfinished"]
    assert "--resume" in rows[1]["reason"]
    assert curves["b"] == {1: 0.5, 3: 0.7}


# ---- views: the search as an Optuna study --------------------------------------------------------


COND_SPACE = """preset: smoke
model.use_cbd: {type: categorical, choices: [true, false]}
model.mask_ratio: {type: float, low: 0.3, high: 0.9}
model.bernstein_order: {type: int, low: 2, high: 8, when: {model.use_cbd: true}}
"""


def _cond_trials() -> pd.DataFrame:
    from cbdtune import results

    rows = []
    for i, (cbd, ratio, order, acc) in enumerate([(True, 0.4, 3, 0.80), (False, 0.5, None, 0.70),
                                                  (True, 0.6, 6, 0.85), (False, 0.8, None, 0.60),
                                                  (True, 0.7, 8, 0.75)]):
        params = {"model.use_cbd": cbd, "model.mask_ratio": ratio}
        if order is not None:
            params["model.bernstein_order"] = order
        rows.append(results.trial_row(f"t{i}", params, {"val_accuracy": acc, "final": 1},
                                      "completed", ""))
    rows.append(results.trial_row("s", {"model.use_cbd": False, "model.mask_ratio": 0.35},
                                  {"val_accuracy": 0.4}, "stopped", "ASHA"))
    rows.append(results.trial_row("e", {"model.use_cbd": True, "model.mask_ratio": 0.5,
                                        "model.bernstein_order": 4}, {}, "error", "boom"))
    rows.append(results.trial_row("u", {"model.use_cbd": True, "model.mask_ratio": 0.5,
                                        "model.bernstein_order": 4}, {}, "unfinished", "x"))
    return results.trials_frame(rows)


def test_views_export_study_states_values_and_conditional_params(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from cbdtune import views

    path = tmp_path / "cond.yaml"
    path.write_text(COND_SPACE)
    space = load_space(str(path))
    url = views.study_storage(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results")
    assert url == f"sqlite:///{tmp_path / 'optuna.db'}"
    curves = {"s": {1: 0.3, 2: 0.4}, "t0": {1: 0.6, 5: 0.8}}
    for _ in range(2):  # a second export (--resume) replaces the study, it does not append
        study = views.export_study(_cond_trials(), curves, space, storage=url, study_name="x",
                                   metric="val_accuracy", mode="max")
    by_id = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert set(by_id) == {"t0", "t1", "t2", "t3", "t4", "s", "e"}  # the unfinished one is not
    assert by_id["t0"].state == TrialState.COMPLETE and by_id["t0"].value == 0.80
    assert by_id["t0"].params["model.bernstein_order"] == 3
    assert "model.bernstein_order" not in by_id["t1"].params  # never sampled: NaN in the table
    assert by_id["s"].state == TrialState.PRUNED and by_id["s"].intermediate_values == {1: 0.3,
                                                                                       2: 0.4}
    assert by_id["e"].state == TrialState.FAIL
    assert study.best_trial.user_attrs["trial_id"] == "t2"
    import optuna  # what optuna-dashboard does with the URL the search prints

    loaded = optuna.load_study(study_name="x", storage=url)
    assert len(loaded.trials) == 7 and loaded.best_trial.user_attrs["trial_id"] == "t2"


def test_views_draw_optunas_four_figures(tmp_path: Path) -> None:
    from cbdtune import views

    path = tmp_path / "cond.yaml"
    path.write_text(COND_SPACE)
    study = views.export_study(_cond_trials(), {"t0": {1: 0.6, 2: 0.8}, "s": {1: 0.3}},
                               load_space(str(path)), storage=f"sqlite:///{tmp_path / 'o.db'}",
                               study_name="x", metric="val_accuracy", mode="max")
    figs = views.draw(study)
    assert set(figs) == set(views.VIEWS)
    for fig in figs.values():
        views.close(fig)


# ---- callbacks ---------------------------------------------------------------------------------


def _trial(trial_id: str, status: str, **last: object) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=trial_id, status=status, last_result=dict(last),
                           config={"train_loop_config": {"model.mask_ratio": 0.5}},
                           error_file=None)


def test_progress_line_counts_ended_trials_and_names_the_best() -> None:
    from cbdtune.callbacks import ProgressCallback

    done = _trial("ab12cd34", "TERMINATED", final=1, val_accuracy=0.8667, time_total_s=40.0)
    stopped = _trial("ee", "TERMINATED", final=0, val_accuracy=0.9, training_iteration=3)
    running = _trial("ff", "RUNNING")
    now = _trial("4c464057", "RUNNING", final=1, val_accuracy=0.8583, val_accuracy_se=0.021,
                 time_total_s=47.2)
    cb = ProgressCallback(16, "val_accuracy", "max")
    line = cb.line([done, stopped, running, now], now, "completed", "")
    assert line == ("trial 3/16 4c464057 completed val_accuracy 0.8583 ± 0.021 "
                    "(best 0.8667, trial ab12cd34) 47 s")
    line = cb.line([stopped], stopped, "stopped", "ASHA")
    assert line == "trial 1/16 ee stopped val_accuracy 0.9000 after 3 reports (none completed yet)"


def test_progress_prints_the_encoder_cache_note_a_trial_reports(capsys) -> None:
    from cbdtune.callbacks import ProgressCallback
    from cbdtune.encoder_cache import NOTE_KEY

    cb = ProgressCallback(4, "val_accuracy", "max")
    trial = _trial("ab12cd34", "RUNNING")
    cb.on_trial_result(1, [trial], trial, {"epoch": 1})
    note = "encoder cache r: entry 0123456789ab unreadable; removed, it will be rebuilt"
    cb.on_trial_result(2, [trial], trial, {"epoch": 2, NOTE_KEY: note})
    assert capsys.readouterr().out == f"trial ab12cd34: {note}\n"


def test_mlflow_callback_logs_best_so_far_and_reopens_a_resumed_run(tmp_path: Path) -> None:
    from cbdtune import tracking
    from cbdtune.callbacks import MLflowTrialCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "t")
    parent = c.create_run(exp).info.run_id
    cb = MLflowTrialCallback(uri, exp, parent, load_space("smoke").base)
    a = _trial("a", "RUNNING", final=1, val_accuracy=0.7, training_iteration=2)
    b = _trial("b", "RUNNING", training_iteration=1, val_accuracy=0.5)
    for t in (a, b):
        cb.on_trial_start(0, [a, b], t)
        cb.on_trial_result(0, [a, b], t, {**t.last_result, "stage": "probe"})
    cb.on_trial_complete(0, [a, b], a)
    a.status = "TERMINATED"
    history = c.get_metric_history(parent, "best_val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.7)]
    [run_a] = c.search_runs([exp], filter_string="tags.`cbdtune.trial_id` = 'a'")
    assert run_a.info.status == "FINISHED" and run_a.data.tags["cbdtune.status"] == "completed"
    tracking.end_open_runs(c, exp, parent, status="KILLED", reason="interrupted")
    resumed = MLflowTrialCallback(uri, exp, parent, load_space("smoke").base)
    resumed.on_trial_start(0, [a, b], b)  # finds b's run by its tag: no second run
    runs = c.search_runs([exp], filter_string="tags.`cbdtune.trial_id` = 'b'")
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    assert "cbdtune.reason" not in runs[0].data.tags


def test_scheduler_state_callback_restores_asha_rungs() -> None:
    """Tune 2.60 does not checkpoint the scheduler; the callback carries its rungs across."""
    import pickle

    from ray.tune.schedulers import ASHAScheduler

    from cbdtune.callbacks import SchedulerStateCallback

    def asha() -> ASHAScheduler:
        return ASHAScheduler(time_attr="training_iteration", metric="val_accuracy", mode="max",
                             max_t=27, grace_period=1, reduction_factor=3)

    before = asha()
    for i, acc in enumerate([0.5, 0.7, 0.6]):
        t = _trial(f"t{i}", "RUNNING")
        before.on_trial_add(None, t)
        before.on_trial_result(None, t, {"training_iteration": 3, "val_accuracy": acc})
    state = SchedulerStateCallback(before).get_state()
    # tuner.pkl pickles the TuneConfig and the callbacks together: one scheduler object
    after = asha()
    cb, sched = pickle.loads(pickle.dumps((SchedulerStateCallback(after), after)))
    assert cb.scheduler is sched
    cb.set_state(state)
    rungs = lambda s: [(m, dict(r)) for b in s._brackets for m, r in b._rungs]  # noqa: E731
    assert rungs(sched) == rungs(before) and any(r for _, r in rungs(sched))


# ---- the search's exits: every MLflow run ends, the --resume command is printed -----------------


def _fake_ray(monkeypatch, tmp_path: Path, outcome: BaseException | None,
              trials: pd.DataFrame | None = None) -> None:
    """Replace Ray (connect, Tune) by stubs: the plan and the MLflow parent run are real. The
    stub trial logs a nested run, then raises ``outcome`` or returns ``trials``."""
    from cbdtune import results

    def tune(the_plan: plan.SearchPlan, cluster: tuning.Cluster,
             parent: object) -> tuning.Tuned:
        from mlflow.tracking import MlflowClient

        MlflowClient(the_plan.uri).create_run(
            parent.experiment_id, tags={"mlflow.parentRunId": parent.run_id,  # type: ignore
                                        "cbdtune.trial_id": "t1"})
        if outcome is not None:
            raise outcome
        df = results.trials_frame([]) if trials is None else trials
        return tuning.Tuned(trials=df, curves={}, wall_s=1.0, started=time.perf_counter(),
                            interrupted=False)

    monkeypatch.setattr(tuning, "connect", lambda the_plan: tuning.Cluster("local", 1, {}))
    monkeypatch.setattr(tuning, "tune", tune)
    monkeypatch.setattr(parent_run, "_restorable", lambda path: True)


def _exit_cmd(tmp_path: Path) -> list[str]:
    (tmp_path / "data").symlink_to(os.environ["CBDTUNE_DATA_DIR"])
    return ["--dataset", "gesture", "--space", "smoke", "--data-dir", "data",
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", EXPERIMENT,
            "--results-dir", "results", "--storage", str(tmp_path / "ray"), "--refit-top", "0"]


@pytest.mark.parametrize(("outcome", "status"), [(KeyboardInterrupt(), "KILLED"),
                                                 (RuntimeError("boom\ndetails"), "FAILED")])
def test_search_exit_ends_every_mlflow_run(tmp_path: Path, monkeypatch, capsys,
                                           outcome: BaseException, status: str) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_ray(monkeypatch, tmp_path, outcome)
    argv = _exit_cmd(tmp_path)
    if status == "KILLED":
        assert search.cli(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="boom"):
            search.cli(argv)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [parent], [child] = _runs(uri)
    assert parent.info.status == status
    assert parent.data.tags["cbdtune.reason"] == ("interrupted (Ctrl-C)" if status == "KILLED"
                                                  else "boom")
    assert child.info.status == "KILLED"
    assert child.data.tags["cbdtune.reason"] == "interrupted; --resume continues it"
    err = capsys.readouterr().err
    assert err.rstrip().endswith(" ".join([*argv, "--name", "gesture-smoke", "--resume"]))


def test_parent_run_finishes_or_ends_killed_when_told_and_undoes_only_then(
        tmp_path: Path, monkeypatch) -> None:
    """ParentRun on a real plan: a block that returns ends FINISHED (exit 0, nothing undone);
    --resume reopens that run, and a block that calls interrupted() ends it KILLED (exit 130)
    after running the undo actions it registered (a registered model version withdrawn)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(parent_run, "_restorable", lambda path: False)
    argv = _exit_cmd(tmp_path)
    settings = search.SearchSettings.from_args(search.parser().parse_args(argv))
    the_plan = plan.make_plan(settings, argv)
    with pytest.raises(dataclasses.FrozenInstanceError):
        the_plan.name = "other"  # type: ignore[misc]
    undone: list[str] = []
    with parent_run.ParentRun(the_plan) as first:
        first.undo_unless_finished(lambda: undone.append("first"))
    assert first.exit_code == 0 and undone == []
    resumed = dataclasses.replace(the_plan, settings=dataclasses.replace(settings, resume=True))
    with parent_run.ParentRun(resumed) as again:
        again.undo_unless_finished(lambda: undone.append("again"))
        again.interrupted()
    assert again.run_id == first.run_id and again.exit_code == 130 and undone == ["again"]
    [parent], _ = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert parent.info.status == "KILLED"
    assert parent.data.tags["cbdtune.reason"] == "interrupted (Ctrl-C)"


def test_search_parent_run_has_space_dataset_and_no_absolute_path(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from cbdtune import tracking

    monkeypatch.chdir(tmp_path)
    _fake_ray(monkeypatch, tmp_path, None)
    assert search.cli(_exit_cmd(tmp_path)) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [parent], [child] = _runs(uri)
    assert parent.info.status == "FINISHED" and child.info.status == "KILLED"
    assert parent.data.params["space"] == "smoke"
    assert not [v for v in parent.data.params.values() if v.startswith(str(tmp_path))]
    client = tracking.client(uri)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "space")} == {
        "space/smoke.yaml"}
    [dataset] = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "UWaveGestureLibrary"
    assert dataset.dataset.digest == parent.data.tags["cbdtune.dataset_sha256"][:32]


def test_run_search_is_the_python_api_and_returns_what_the_search_left(tmp_path: Path,
                                                                        monkeypatch) -> None:
    """run_search(SearchSettings) without argparse: best trial, table, paths and run ids."""
    from cbdtune import results

    monkeypatch.chdir(tmp_path)
    _fake_ray(monkeypatch, tmp_path, None, trials=results.trials_frame([
        results.trial_row("a", {}, {"val_accuracy": 0.7, "final": 1}, "completed", ""),
        results.trial_row("b", {}, {"val_accuracy": 0.9, "final": 1}, "completed", ""),
        results.trial_row("c", {}, {"val_accuracy": 0.95}, "stopped", "ASHA")]))
    argv = _exit_cmd(tmp_path)
    settings = search.SearchSettings.from_args(search.parser().parse_args(argv))
    result = search.run_search(settings)  # no argv: the command is rebuilt from the settings
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [parent], _ = _runs(uri)
    assert (result.status, result.exit_code) == ("finished", 0)
    assert (result.best_trial, result.best_value) == ("b", 0.9)
    assert list(result.trials["trial_id"]) == ["a", "b", "c"]
    assert result.mlflow_run_id == parent.info.run_id and result.mlflow_uri == uri
    assert result.storage_path == f"{tmp_path / 'ray'}/gesture-smoke"
    assert result.results_dir == Path("results") / "UWaveGestureLibrary" / "gesture-smoke"
    assert (result.results_dir / "trials.parquet").is_file()
    command = parent.data.tags["cbdtune.command"]
    assert command.endswith(" " + " ".join(settings.to_argv()))
    assert "--data-dir data" in command and "--space smoke" in command


def test_a_time_budget_that_ran_out_is_not_an_interruption() -> None:
    """Fewer trials than asked: interrupted (exit 130, --resume) unless the budget ran out."""
    from cbdtune import results

    df = results.trials_frame([results.trial_row("a", {}, {"val_accuracy": 0.5, "final": 1},
                                                 "completed", "")])
    budget = search.SearchSettings(datasets=("gesture",), num_samples=4, time_budget="1m")
    assert not tuning.interrupted(budget, df, wall=61.0)
    assert tuning.interrupted(budget, df, wall=30.0)
    assert tuning.interrupted(search.SearchSettings(datasets=("gesture",), num_samples=4), df, 1e6)
    unfinished = results.trials_frame([results.trial_row("b", {}, {}, "unfinished", "x")])
    assert tuning.interrupted(budget, unfinished, wall=61.0)


# ---- Ctrl-C after the trials: refits and registration -----------------------------------------


@pytest.mark.ray
def test_search_ctrl_c_in_refit_or_registration_is_killed_and_resume_finishes(
        tmp_path: Path, monkeypatch) -> None:
    """A real SIGINT during the refits (Tune's handler used to swallow it), then Ctrl-C right
    after MLflow registered the version: each time exit 130, the parent KILLED, no registered
    version; a third --resume finishes with exactly one version."""
    import ray
    from mlflow.tracking import MlflowClient

    from cbdtune import refit, serving

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = search.SearchSettings(
        datasets=("gesture",), space=SMOKE, num_samples=1, refit_top=1, refit_seeds=1,
        scheduler="none", storage=str(tmp_path / "ray"), results_dir="results",
        mlflow_uri=uri, experiment=EXPERIMENT, name="cc", data_dir=os.environ["CBDTUNE_DATA_DIR"],
        ensemble="top")  # select may hand over MiniRocket alone: then no CBD refit runs
    real_refit, real_log_model = refit.run, serving.log_model

    def sigint_in_refit(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(20)  # KeyboardInterrupt lands here; before the fix, the refit went on
        return real_refit(*args, **kwargs)

    def ctrl_c_after_registering(*args, **kwargs):
        real_log_model(*args, **kwargs)
        raise KeyboardInterrupt

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def versions() -> list:
        return client.search_model_versions("name = 'cbdtune-gesture'")

    try:
        for i, fake in enumerate([("run", sigint_in_refit),
                                  ("log_model", ctrl_c_after_registering)]):
            with monkeypatch.context() as m:
                m.setattr(refit if fake[0] == "run" else serving, fake[0], fake[1])
                run = dataclasses.replace(settings, resume=i > 0)
                result = search.run_search(run, argv=run.to_argv())
            assert (result.status, result.exit_code) == ("interrupted", 130), fake[0]
            [parent], _ = _runs(uri)
            assert parent.info.status == "KILLED", fake[0]
            assert versions() == [], fake[0]
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        done = search.run_search(dataclasses.replace(settings, resume=True))
    finally:
        ray.shutdown()
    assert (done.status, done.exit_code) == ("finished", 0)
    [parent], _ = _runs(uri)
    assert parent.info.status == "FINISHED"
    assert len(versions()) == 1


# ---- more refusals before Ray starts ----------------------------------------------------------


def _no_ray(monkeypatch) -> None:
    """Starting or joining Ray fails the test."""
    from cbdtune import session

    def connect(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(session, "connect", connect)


def _small_cmd(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "gesture", "--space", "smoke", "--storage", str(tmp_path / "ray"),
            "--results-dir", str(tmp_path / "r"), "--mlflow-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


def test_cli_cv_folds_beyond_the_largest_class_exits_2_before_ray(tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """--cv-folds 200 on gesture used to run 15 folds while summary.md said 200."""
    _no_ray(monkeypatch)
    assert search.cli(_small_cmd(tmp_path, "--cv-folds", "200")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --cv-folds 200: UWaveGestureLibrary has at most 15 ")
    assert "pass --cv-folds 15 or fewer" in err


def test_cli_resume_of_an_unknown_search_exits_2_before_ray(tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    _no_ray(monkeypatch)
    assert search.cli(_small_cmd(tmp_path, "--name", "nope", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --resume: no search named nope in ")


def test_cli_read_only_encoder_cache_exits_2_before_ray(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    """<storage>/encoders read-only: one line, not a PermissionError in every trial."""
    _no_ray(monkeypatch)
    encoders = tmp_path / "ray" / "encoders"
    encoders.mkdir(parents=True)
    encoders.chmod(0o555)
    try:
        code = search.cli(_small_cmd(tmp_path))
    finally:
        encoders.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "encoders is read-only" in err and "--no-reuse" in err
    _no_ray(monkeypatch)
    encoders.chmod(0o555)
    try:  # --no-reuse needs no cache: it passes the checks and reaches Ray
        with pytest.raises(AssertionError, match="Ray was started"):
            search.cli(_small_cmd(tmp_path, "--no-reuse"))
    finally:
        encoders.chmod(0o755)


def test_fit_puts_back_pythons_sigint_handler_not_a_stale_one_of_tunes(monkeypatch) -> None:
    """A Tune handler left by an earlier run in this process is not what ``tuning.fit`` restores:
    after it, Ctrl-C raises KeyboardInterrupt again."""
    def stale(signum, frame) -> None:  # as Tune's, which only sets an event
        pass

    stale.__module__ = "ray.tune.tune"

    class Tuner:
        def fit(self) -> str:
            signal.signal(signal.SIGINT, stale)  # what Tune installs for its run
            return "done"

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, stale)
        assert tuning.fit(Tuner()) == "done"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        user = lambda signum, frame: None  # noqa: E731 - a handler the user set stays theirs
        signal.signal(signal.SIGINT, user)
        tuning.fit(Tuner())
        assert signal.getsignal(signal.SIGINT) is user
    finally:
        signal.signal(signal.SIGINT, previous)
