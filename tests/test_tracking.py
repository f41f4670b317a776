"""MLflow helpers: the store checks, batch logging, dataset inputs, ending runs a search left
RUNNING; and that ``import cbdtune.train`` stays free of Ray Tune."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbdtune import tracking
from cbdtune.config import CbdtuneError
from cbdtune.data import Dataset, Split


def _store(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.client(uri).search_experiments()  # creates the tables
    return uri, db


def _dataset() -> Dataset:
    rng = np.random.default_rng(0)
    split = Split(rng.normal(size=(6, 2, 8)), np.array([0, 1, 0, 1, 0, 1]))
    return Dataset(name="Toy", train=split, val=split, test=split, class_names=["a", "b"],
                   source="Toy archive (Doe 2020), https://example.org/toy.zip",
                   location="/data/Toy", val_origin="carved")


@pytest.mark.parametrize(("uri", "message"), [
    ("file:///tmp/mlruns", "a file store; MLflow 3.17 no longer opens one"),
    ("mlruns", "a file store"),
    ("ftp://host/store", "unsupported scheme ftp://"),
])
def test_check_tracking_uri_rejects_file_stores_and_unknown_schemes(uri: str,
                                                                    message: str) -> None:
    with pytest.raises(CbdtuneError, match=message) as err:
        tracking.check_tracking_uri(uri)
    assert "\n" not in str(err.value)


def test_check_tracking_uri_rejects_a_truncated_store(tmp_path: Path) -> None:
    uri, db = _store(tmp_path)
    data = db.read_bytes()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CbdtuneError, match="is truncated"):
        tracking.check_tracking_uri(f"sqlite:///{cut}")
    tracking.check_tracking_uri(uri, writable=True)  # the whole file passes


def test_check_tracking_uri_rejects_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    bad = tmp_path / "mlflow.db"
    bad.write_text("not a database\n" * 20)
    with pytest.raises(CbdtuneError, match="is not a SQLite database"):
        tracking.check_tracking_uri(f"sqlite:///{bad}")


def test_check_tracking_uri_read_only_store_refused_for_writing_only(tmp_path: Path) -> None:
    uri, db = _store(tmp_path)
    db.chmod(0o444)
    try:
        with pytest.raises(CbdtuneError, match="is read-only"):
            tracking.check_tracking_uri(uri, writable=True)
        tracking.check_tracking_uri(uri)  # cbdtune.predict only reads
    finally:
        db.chmod(0o644)


def test_check_tracking_uri_read_only_folder_for_a_new_store(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CbdtuneError, match="is read-only"):
            tracking.check_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}", writable=True)
    finally:
        folder.chmod(0o755)


def test_log_params_and_metrics_beyond_one_batch(tmp_path: Path) -> None:
    """MLflow's own log_batch chunking carries more than 100 params and 1000 metrics."""
    uri, _ = _store(tmp_path)
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "t")).info.run_id
    tracking.log_params(c, run_id, {f"p{i}": i for i in range(250)})
    tracking.log_metrics(c, run_id, {f"m{i}": float(i) for i in range(1200)}, step=3)
    data = c.get_run(run_id).data
    assert len(data.params) == 250 and len(data.metrics) == 1200


def test_log_dataset_names_the_source_and_hashes_the_training_arrays(tmp_path: Path) -> None:
    uri, _ = _store(tmp_path)
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "t")).info.run_id
    data = _dataset()
    digest = tracking.log_dataset(c, run_id, data)
    [logged] = c.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "Toy" and logged.dataset.digest == digest[:32]
    assert "https://example.org/toy.zip" in logged.dataset.source
    assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
    assert tracking.dataset_digest(data) == digest  # the same arrays, the same hash
    shifted = Dataset(name="Toy", train=Split(data.train.x + 1, data.train.y), val=data.val,
                      test=data.test, class_names=data.class_names, source=data.source,
                      location=data.location, val_origin="carved")
    assert tracking.dataset_digest(shifted) != digest


def test_end_open_runs_ends_only_running_children_of_the_parent(tmp_path: Path) -> None:
    uri, _ = _store(tmp_path)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "t")
    parent = c.create_run(exp).info.run_id
    other = c.create_run(exp).info.run_id

    def child(of: str) -> str:
        return c.create_run(exp, tags={tracking.PARENT_TAG: of}).info.run_id

    running, done, foreign = child(parent), child(parent), child(other)
    c.set_terminated(done, status="FINISHED")
    ended = tracking.end_open_runs(c, exp, parent, status="KILLED", reason="interrupted")
    assert ended == [running]
    run = c.get_run(running)
    assert run.info.status == "KILLED" and run.data.tags["cbdtune.reason"] == "interrupted"
    assert c.get_run(done).info.status == "FINISHED"
    assert c.get_run(foreign).info.status == "RUNNING"
    tracking.reopen_run(c, running)  # --resume
    run = c.get_run(running)
    assert run.info.status == "RUNNING" and "cbdtune.reason" not in run.data.tags


def test_trial_status_of_a_stopped_trial_names_both_causes() -> None:
    status, reason = tracking.trial_status({"training_iteration": 6, "final": 0})
    assert status == "stopped" and "after 6 reports" in reason and "--time-budget" in reason


def test_import_train_does_not_import_ray_tune() -> None:
    """``python -m cbdtune.train --help`` and ``--in-process`` never pay for Ray Tune."""
    code = "import cbdtune.train, sys; assert 'ray.tune' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tracking_imports_no_callback_and_no_ray() -> None:
    """callbacks.py imports tracking.py, never the other way round (no import cycle)."""
    code = ("import sys, cbdtune.tracking; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m == 'cbdtune.callbacks'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
    assert not hasattr(tracking, "MLflowTrialCallback")


def test_every_mlflow_tag_name_is_written_only_in_tracking() -> None:
    """A tag name is a constant of tracking.py; a quoted copy elsewhere is a rename waiting to
    break a query (the parent run's role is written by the search, queried here)."""
    names = {v for k, v in vars(tracking).items() if k.endswith("_TAG") and isinstance(v, str)}
    assert {"cbdtune.role", "cbdtune.reason", "cbdtune.command", "cbdtune.status"} <= names
    package = Path(tracking.__file__).parent
    names -= {f"cbdtune.{m.stem}" for m in package.glob("*.py")}  # cbdtune.search: also a module
    for module in sorted(package.glob("*.py")):
        if module.name == "tracking.py":
            continue
        text = module.read_text()
        quoted = [n for n in names if f'"{n}"' in text or f"'{n}'" in text or f"`{n}`" in text]
        assert not quoted, f"{module.name} spells out {quoted}; use the tracking constants"


def test_end_orphaned_searches_ends_only_runs_of_dead_drivers_on_this_host(tmp_path: Path) -> None:
    """A driver killed outright runs no ``finally``; the next search ends its runs."""
    import os
    import socket

    uri, _ = _store(tmp_path)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "t")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()

    def parent(driver: str) -> str:
        return c.create_run(exp, tags={"cbdtune.role": "search",
                                       tracking.DRIVER_TAG: driver}).info.run_id

    dead, live, remote = parent(f"{host}:{gone}"), parent(f"{host}:{os.getpid()}"), parent(
        f"not-{host}:{gone}")
    trial = c.create_run(exp, tags={tracking.PARENT_TAG: dead}).info.run_id
    assert tracking.end_orphaned_searches(c, exp) == [dead]
    assert c.get_run(dead).info.status == "FAILED"
    assert f"pid {gone}" in c.get_run(dead).data.tags["cbdtune.reason"]
    assert c.get_run(trial).info.status == "KILLED"
    assert {c.get_run(r).info.status for r in (live, remote)} == {"RUNNING"}
