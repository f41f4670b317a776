"""A search over a multi-node Ray cluster on one machine, surviving the loss of a worker node.

Head (0 CPUs: it hosts only trial drivers) + two worker nodes of 1 CPU each, as separate Ray node
processes on loopback (``ray.cluster_utils.Cluster``). Two smoke trials run at once, one per
worker node; once a trial has written its first checkpoint, the node running it is killed. The
trial's worker group is restarted on the surviving node from that checkpoint (Train's
``FailureConfig``), and the search ends with every trial finished and one MLflow run each.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from cbdtune import search

pytestmark = pytest.mark.ray


def _histories(storage: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial's results, from Tune's result.json files."""
    out = {}
    for path in storage.glob("*/trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def test_search_survives_a_lost_worker_node(tmp_path: Path, monkeypatch) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    storage = tmp_path / "ray"
    timeline: dict[str, Any] = {"t0": time.time()}

    def kill_a_node_after_first_checkpoint() -> None:
        """Kill the node of the first trial that has reported (and so checkpointed)."""
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.5)
            for trial_id, rows in _histories(storage).items():
                node = next((n for n in nodes if n.node_id.startswith(rows[0]["worker_node"])),
                            None)
                if node is not None and rows[0]["stage"] == "pretrain":
                    timeline.update(killed_at=time.time(), node=rows[0]["worker_node"],
                                    first_checkpoint_trial=trial_id)
                    cluster.remove_node(node, allow_graceful=False)
                    return
        timeline["error"] = "no running trial found to kill"

    # Long enough pretraining (20 probes, one checkpoint each) that the kill lands mid-trial.
    space = tmp_path / "space.yaml"
    space.write_text("preset: smoke\ntrain.pretrain_epochs: 40\ntrain.classifier_epochs: 5\n"
                     "model.mask_ratio: {type: float, low: 0.5, high: 0.8}\n")
    killer = threading.Thread(target=kill_a_node_after_first_checkpoint, daemon=True)
    killer.start()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code = search.cli([
            "--dataset", "gesture", "--space", str(space),
            "--num-samples", "2", "--max-concurrent", "2", "--scheduler", "none",
            "--max-failures", "3", "--refit-top", "0", "--storage", str(storage),
            "--results-dir", str(tmp_path / "results"), "--mlflow-uri", uri,
            "--experiment", "multinode"])
        killer.join(timeout=10)
        histories = _histories(storage)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in timeline, timeline
    assert code == 0
    assert "killed_at" in timeline, "the node was never killed"

    # Trials landed on both worker nodes before the kill.
    first_nodes = {rows[0]["worker_node"] for rows in histories.values()}
    assert len(first_nodes) == 2, first_nodes
    # The trial on the killed node resumed from a checkpoint on the other node, not from scratch.
    victim = timeline["first_checkpoint_trial"]
    rows = histories[victim]
    resumed = [r for r in rows if r["resumed_from_epoch"] >= 0]
    assert resumed, "the trial on the killed node was not resumed from a checkpoint"
    assert resumed[0]["worker_node"] != timeline["node"]
    assert resumed[0]["resumed_from_epoch"] >= 2  # smoke: the first probe is at epoch 2
    assert rows[-1].get("final") == 1
    # For the closing note: when the node died, when and from what the trial resumed.
    first_after = resumed[0]
    print("TIMELINE", json.dumps({
        "node_killed_s": round(timeline["killed_at"] - timeline["t0"], 1),
        "trial": victim, "killed_node": timeline["node"],
        "resumed_on": first_after["worker_node"],
        "resumed_from": f"{first_after['resumed_from_stage']} epoch "
                        f"{first_after['resumed_from_epoch']}",
        "first_report_after_resume_s": round(first_after["timestamp"] - timeline["t0"], 1),
    }))

    [parquet] = list((tmp_path / "results").glob("*/*/trials.parquet"))
    df = pd.read_parquet(parquet)
    assert len(df) == 2 and (df["status"] == "completed").all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id])
    trial_runs = [r for r in runs if "cbdtune.trial_id" in r.data.tags]
    assert len(trial_runs) == 2
    assert {r.data.tags["cbdtune.trial_id"] for r in trial_runs} == set(df["trial_id"])
    assert all(r.info.status == "FINISHED" for r in trial_runs)


def test_search_more_gpus_than_cluster_fails_fast(tmp_path: Path, capsys) -> None:
    env_before = os.environ.get("RAY_ADDRESS")
    try:
        code = search.cli(["--dataset", "gesture", "--space", "smoke", "--gpus-per-worker", "1",
                           "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}",
                           "--storage", str(tmp_path / "ray")])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: a trial needs 1 worker(s) x (1 CPU, 1 GPU)")
    assert "0 GPU" in err[0]
    assert os.environ.get("RAY_ADDRESS") == env_before
