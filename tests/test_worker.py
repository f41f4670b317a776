"""The Ray Train worker: same numbers as in-process, data-parallel, resume after a crash."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle

from cbdtune import session, worker
from cbdtune.config import DataConfig, preset
from cbdtune.data import load_dataset
from cbdtune.pipeline import run_trial

# Test-only worker functions below are shipped to Ray workers by value (tests/ is not a package).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    # a private Ray: plain ray.init() joins one another process runs on this machine (a search)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": session.TRAIN_POLL_ENV})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gesture():
    return load_dataset(DataConfig(dataset="gesture"), seed=0)


def _cfg(**over: Any):
    # One thread on both paths: the Ray worker gets 1 CPU, and thread count changes float sums.
    return preset("smoke").replace({"train.num_threads": 1, "train.classifier_epochs": 6, **over})


def _fit(cfg, data, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    trainer = worker.make_trainer(cfg, data_ref=ray.put(data), name="t",
                                  storage_path=str(tmp_path), **kwargs)
    result = trainer.fit()
    assert result.error is None, result.error
    return result.return_value


@pytest.fixture(scope="module")
def one_worker(ray_local, gesture, tmp_path_factory) -> dict[str, Any]:
    return _fit(_cfg(), gesture, tmp_path_factory.mktemp("one"))


def test_worker_matches_in_process(one_worker, gesture) -> None:
    """TorchTrainer with one CPU worker gives the in-process metrics for the same seed."""
    reports: list[dict[str, Any]] = []
    local = run_trial(_cfg(), gesture, lambda m, s: reports.append(m)).metrics
    assert one_worker["status"] == "completed"
    final = one_worker["final"]
    for key in ("val_accuracy", "test_accuracy", "test_f1", "selected_epoch"):
        assert final[key] == local[key], key
    remote_pre = [m for m in one_worker["history"] if m["stage"] == "pretrain"]
    local_pre = [m for m in reports if m["stage"] == "pretrain"]
    assert len(remote_pre) == len(local_pre)
    for a, b in zip(remote_pre, local_pre, strict=True):
        assert math.isclose(a["loss.total"], b["loss.total"], rel_tol=1e-5)


def test_worker_two_workers_agree_with_one(one_worker, gesture, tmp_path: Path) -> None:
    """Two data-parallel workers (same global batch) train like one.

    Tolerance: the last pretraining loss within 25% (the workers see other masks and batch
    orders), and validation accuracy within 0.25 (6 of 24 validation series).
    """
    two = _fit(_cfg(), gesture, tmp_path, workers=2)
    assert two["status"] == "completed"
    last = [[m for m in r["history"] if m["stage"] == "pretrain"][-1]["loss.total"]
            for r in (one_worker, two)]
    assert abs(last[0] - last[1]) <= 0.25 * last[0]
    assert abs(one_worker["final"]["val_accuracy"] - two["final"]["val_accuracy"]) <= 0.25


def crash_once_fn(loop_config: dict[str, Any]) -> Any:
    """``train_fn_per_worker``, but the first attempt dies right after its first checkpoint.

    Each attempt appends one line to ``loop_config["log"]``: the checkpoint epoch it started
    from, the pretraining epochs it reported and the ``training_iteration`` of each report.
    """
    import ray.train
    import torch

    log = Path(loop_config["log"])
    attempt = len(log.read_text().splitlines()) if log.exists() else 0
    resumed_from = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / session.CHECKPOINT_FILE, weights_only=True)
            resumed_from = int(state["epoch"])
    reported: list[int] = []
    iterations: list[int] = []

    def record() -> None:
        with log.open("a") as f:
            f.write(json.dumps({"resumed_from": resumed_from, "epochs": reported,
                                "iterations": iterations}) + "\n")

    real_report = ray.train.report

    def report(metrics: dict[str, Any], checkpoint: Any = None, **kw: Any) -> None:
        real_report(metrics, checkpoint=checkpoint, **kw)
        iterations.append(metrics["training_iteration"])
        if metrics.get("stage") == "pretrain":
            reported.append(int(metrics["epoch"]))
        if attempt == 0 and checkpoint is not None:
            record()
            raise RuntimeError("injected worker crash after the first checkpoint")

    ray.train.report = report  # the worker looks it up at call time
    try:
        out = worker.train_fn_per_worker(loop_config)
    finally:
        ray.train.report = real_report
    record()
    return out


def test_worker_resumes_from_checkpoint_after_crash(ray_local, gesture, tmp_path: Path) -> None:
    cfg = _cfg(**{"train.pretrain_epochs": 6, "train.classifier_epochs": 2})
    log = tmp_path / "attempts.jsonl"
    trainer = worker.make_trainer(cfg, data_ref=ray.put(gesture), name="crash",
                                  storage_path=str(tmp_path), max_failures=1,
                                  train_fn=crash_once_fn)
    trainer.train_loop_config["log"] = str(log)
    result = trainer.fit()
    assert result.error is None, result.error
    attempts = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(attempts) == 2, attempts
    assert attempts[0] == {"resumed_from": None, "epochs": [2], "iterations": [1]}
    second = attempts[1]
    assert second["resumed_from"] == 2, "the retry did not load the checkpoint"
    assert second["epochs"][0] == 4, "the retry started from epoch 0"
    # the retry's reports continue the trial's count (ASHA's time attribute), not restart at 1
    assert second["iterations"] == list(range(2, 2 + len(second["iterations"])))
    assert result.return_value["status"] == "completed" and result.return_value["resumed"]


_LISTENERS = """
import json, time
import ray
import psutil  # Ray ships it (ray/thirdparty_files), on sys.path once ray is imported
from cbdtune.session import connect
connect(None)
time.sleep(5)  # the dashboard agent and the metrics exporter come up after ray.init returns
me = psutil.Process()
found = []
for proc in [me, *me.children(recursive=True)]:
    try:
        found += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(found))
"""


@pytest.mark.ray
def test_connect_local_ray_listens_on_loopback_only() -> None:
    """A search's own Ray (no address): no server of it binds 0.0.0.0, :: or the machine's
    address, the metrics export port and the dashboard agent included."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    out = subprocess.run([sys.executable, "-c", _LISTENERS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(listeners) >= 5, listeners  # gcs, raylet, dashboard, its agent, metrics
    open_ = [entry for entry in listeners
             if entry[1].removeprefix("::ffff:") not in ("127.0.0.1", "::1")]
    assert not open_, f"listening beyond loopback: {open_}"


def test_cache_notes_send_a_rebuilt_entry_with_the_next_report_once(tmp_path: Path) -> None:
    """The rebuild warning reaches the trial's result (the search prints it), not only the
    worker's log in Ray's session folder."""
    import hashlib

    import torch

    from cbdtune import encoder_cache as ec

    cache = ec.EncoderCache(str(tmp_path))
    inputs = {"format": ec.FORMAT_VERSION, "stands_for": "a pretraining key's inputs"}
    key = hashlib.sha256(ec._canonical(inputs)).hexdigest()
    cache.put(key, {"model": {"w": torch.zeros(3)}}, {"inputs": inputs, "reports": [],
                                                      "source": "s/t0"})
    (tmp_path / ec.ENCODERS / key / ec.ENCODER_FILE).write_bytes(b"cut short")
    sent: list[dict[str, Any]] = []
    with session.cache_notes() as notes:
        report = session.Reporter([], {}, rank=1, send=lambda m, **kw: sent.append(m),
                                  notes=notes)
        assert cache.get(key) is None  # found broken, removed
        report({"epoch": 1}, None)
        report({"epoch": 2}, None)
    note = sent[0][ec.NOTE_KEY]
    assert key[:12] in note and "rebuilt" in note and "\n" not in note
    assert ec.NOTE_KEY not in sent[1]
    assert cache.get(key) is None and notes == []  # outside the block: nothing collected


def test_trial_settings_in_trial_only_for_one_cpu_worker() -> None:
    """One CPU worker runs in the Tune trial and reserves its CPUs there; DDP or a GPU goes
    through a TorchTrainer, whose workers reserve them (the trial reserves none)."""
    one = session.TrialSettings(workers=1, cpus_per_worker=2.0, gpus_per_worker=0.0,
                                max_failures=0, storage_path=None, encoder_cache=None)
    assert one.in_trial and one.trial_resources() == {"cpu": 2.0}
    for other in ({"workers": 2}, {"gpus_per_worker": 0.25}):
        run = dataclasses.replace(one, **other)
        assert not run.in_trial and run.trial_resources() == {"cpu": 0.0}, other


def test_max_concurrent_above_what_fits_is_lowered_for_trials_that_reserve_cpus() -> None:
    """Trials of one CPU worker reserve their CPUs: a --max-concurrent above the trials that fit
    runs as many as fit; a TorchTrainer's trials (they reserve none), --allow-autoscale and a
    --max-concurrent that fits are kept as given."""
    from cbdtune import tuning
    from cbdtune.settings import SearchSettings

    st = SearchSettings(datasets=("gesture",), max_concurrent=8, num_samples=16)
    assert tuning.trials_at_once(st, 2, 1, multi=False) == 2
    assert tuning.trials_at_once(dataclasses.replace(st, max_concurrent=2), 2, 1,
                                 multi=False) == 2
    assert tuning.trials_at_once(dataclasses.replace(st, max_concurrent=0), 2, 1,
                                 multi=False) == 2
    for kept in ({"allow_autoscale": True}, {"workers_per_trial": 2}):
        assert tuning.trials_at_once(dataclasses.replace(st, **kept), 2, 1, multi=False) == 8
    assert tuning.trials_at_once(st, 2, 3, multi=True) == 8


def _ray_workers(root: int) -> set[int]:
    """The Python worker processes (``default_worker.py``, retitled ``ray::...``) under
    ``root`` now, from /proc; not the raylet, whose command line names ``default_worker.py``."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for pid in kids.get(todo.pop(), []):
            todo.append(pid)
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if Path(cmd.split("\0")[0]).name == "raylet":
                continue
            if (cmd.startswith("ray::") and "Agent" not in cmd) or "default_worker.py" in cmd:
                found.add(pid)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes in /proc")
def test_search_starts_one_process_per_trial_and_no_pool_warning(tmp_path: Path) -> None:
    """A 2-trial search and 2 refits: no raylet "N PYTHON worker processes have been started"
    warning, and at most one Python worker process per trial and per refit beyond Ray's
    prestarted ones. Through a TorchTrainer each trial started 8 and each refit 7
    (benchmarks/workers.py), and the warning came at 8."""
    import os
    import subprocess
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", "gesture", "--space", "smoke",
           "--num-samples", "2", "--refit-top", "1", "--refit-seeds", "2", "--ensemble", "top",
           "--storage", str(tmp_path / "ray"),
           "--results-dir", str(tmp_path / "results"),
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    log = tmp_path / "search.log"
    seen: set[int] = set()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _ray_workers(proc.pid)
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "worker processes have been started" not in text, text[-3000:]
    assert text.count("refit ") >= 2, text[-3000:]
    # 2 trials + 2 refit tasks + Ray's prestarted idle workers (num_cpus=2) + one more that
    # the raylet starts, when a batch of tasks is queued and no idle worker is left, and reclaims
    # idle 1-2 s later: the trials hold both CPUs, so the prestarted ones are gone by the refits
    # (plain Ray does the same: 2 one-CPU actors, then 2 or 6 one-CPU tasks: 5 processes).
    assert 2 <= len(seen) <= 2 + 2 + 2 + 1, len(seen)
