"""The search CLI end to end: results, MLflow runs (sqlite and a real server), ray job submit,
resume after SIGINT, and bad input refused before Ray starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cbdtune import search
from cbdtune.space import load_space

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "search_spaces" / "smoke.yaml")
EXPERIMENT = "cbdtune-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _search_cmd(tmp: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cbdtune.search", "--dataset", "gesture", "--space", SMOKE,
            "--num-samples", "2", "--storage", str(tmp / "ray"), "--results-dir",
            str(tmp / "results"), "--mlflow-uri", uri, "--experiment", EXPERIMENT,
            "--data-dir", os.environ["CBDTUNE_DATA_DIR"], *extra]


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
    port = _free_port()
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
    """2-trial smoke search: parquet, summary, 1 parent + 2 nested runs read via MlflowClient."""
    proc = subprocess.run(_search_cmd(tmp_path, mlflow_server), capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best trial" in proc.stdout and "test_accuracy" in proc.stdout
    _check_outputs(tmp_path, mlflow_server, 2)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    _, children = _runs(mlflow_server)
    arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"config.yaml", "learning_curve.png", "spectrum_energy.png"} <= arts


@pytest.mark.ray
def test_search_ray_job_submit_succeeds(tmp_path: Path) -> None:
    """`ray start --head` on loopback + `ray job submit -- python -m cbdtune.search` SUCCEEDED."""
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
             *_search_cmd(tmp_path, uri)],  # the job runs `python -m cbdtune.search ...`
            capture_output=True, text=True, env=env, timeout=600)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in (job.stdout + job.stderr)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
    df = _check_outputs(tmp_path, uri, 2)
    assert len(df) == 2


@pytest.mark.ray
def test_search_resume_after_sigint_no_duplicates(tmp_path: Path) -> None:
    """SIGINT after the first finished trial; --resume completes all trials, no duplicate runs."""
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
    assert proc.returncode != 0, out[-2000:]
    assert "--resume" in out
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(),
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    df = _check_outputs(tmp_path, uri, 3)
    assert (df["status"] == "completed").all()


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
                       f"http://127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot reach the MLflow server" in err
    assert not ray.is_initialized()


@pytest.mark.parametrize("argv", [
    ["--metric", "test_accuracy"],
    ["--dataset", "gestur"],
    ["--num-samples", "0"],
    ["--space", "nonexistent"],
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
        s = search.make_searcher(space, sampler=sampler, seed=seed, metric="val_accuracy",
                                 mode="max", max_concurrent=8)
        s.set_search_properties("val_accuracy", "max", {"train_loop_config": space.to_tune()})
        return [s.suggest(f"t{i}")["train_loop_config"] for i in range(4)]

    for sampler in search.SAMPLERS:
        assert suggestions(sampler, 0) == suggestions(sampler, 0), sampler
        assert suggestions(sampler, 0) != suggestions(sampler, 1), sampler


def test_expected_reports_covers_a_full_trial() -> None:
    space = load_space("smoke")
    cfg = space.base
    # smoke: 4 pretraining epochs probed every 2 -> 2 reports; 15 classifier epochs + stage end;
    # the final report.
    assert search.expected_reports(cfg) == 2 + 16 + 1
    both = cfg.replace({"train.classifier": "both"})
    assert search.expected_reports(both) == 2 + 2 * 16 + 1


def _fake_tune_experiment(folder: Path) -> None:
    # Tuner.can_restore looks for exactly this file (ray/tune/impl/tuner_internal.py, _TUNER_PKL).
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")


def test_search_name_skips_a_taken_results_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    from cbdtune import results

    space = load_space("smoke")
    args = search.parser().parse_args(["--dataset", "gesture"])
    dataset_dir = tmp_path / "results" / "UWaveGestureLibrary"
    first = dataset_dir / "gesture-default"
    df = results.trials_frame([results.trial_row("a", {}, {"val_accuracy": 0.9}, "completed", "")])
    results.write(first, df, space, space.base, metric="val_accuracy", mode="max",
                  command="first", header={})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    # The Ray storage is empty (another machine, or ~/ray_results cleaned): the folder decides.
    name = search._search_name(args, str(tmp_path / "ray"), "default", results_dir=dataset_dir)
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
        return search._search_name(args, str(root), "smoke", results_dir=dataset_dir)

    assert name() == "s-3"
    assert name("--resume") == "s"  # s-2 has results only: nothing for Tune to restore
    assert name("--overwrite") == "s"
    assert name("--resume", "--overwrite") == "s"


def test_search_name_resume_without_storage_is_a_one_line_error(tmp_path: Path) -> None:
    args = search.parser().parse_args(["--dataset", "gesture", "--resume"])
    with pytest.raises(search.CbdtuneError, match="--resume: no search named gesture-smoke"):
        search._search_name(args, str(tmp_path / "ray"), "smoke", results_dir=tmp_path / "r")
