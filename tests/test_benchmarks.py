"""The bookkeeping behind the committed benchmark tables (the scripts' arithmetic), and one short
real throughput run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce  # noqa: E402
import search_efficiency as eff  # noqa: E402
import throughput  # noqa: E402


def test_claim_is_exclusive_and_taken_over_from_a_dead_process(tmp_path: Path) -> None:
    claim = tmp_path / "gesture_seed0.claim"
    assert reproduce._claim(claim)
    assert claim.read_text() == str(os.getpid())
    assert not reproduce._claim(claim)  # held by a live process (this one)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    claim.write_text(dead)
    assert reproduce._claim(claim)  # its process is gone: the task is free again
    assert claim.read_text() == str(os.getpid())


def test_mean_std_is_percent_with_sample_std() -> None:
    mean, std = reproduce.mean_std([0.8, 0.9])
    assert mean == pytest.approx(85.0) and std == pytest.approx(7.0710678)
    assert math.isnan(reproduce.mean_std([0.5])[1])


def test_throughput_row_is_the_median_run_with_its_range() -> None:
    runs = [{"samples_per_s": v, "best_samples_per_s": v + 10, "peak_gb": g, "params": 7}
            for v, g in [(300.0, 0.5), (100.0, 0.7), (200.0, 0.6)]]
    row = throughput._summarise(runs)
    assert (row["samples_per_s"], row["slowest"], row["fastest"]) == (200.0, 100.0, 300.0)
    assert row["best_samples_per_s"] == 310.0 and row["peak_gb"] == 0.7 and row["params"] == 7


def test_throughput_worker_times_real_steps() -> None:
    # the worker sets the thread count: give it this process's, so later tests keep theirs
    r = throughput._worker("cpu", "fp32", 3, 50, steps=2, warmup=1,
                           threads=torch.get_num_threads())
    assert r["samples_per_s"] > 0 and r["best_samples_per_s"] >= r["samples_per_s"]
    assert r["params"] > 1_000_000 and r["peak_gb"] > 0


def _report(stage: str, t: float, dt: float, **kw) -> dict:
    return {"stage": stage, "timestamp": 0, "time_total_s": t, "time_this_iter_s": dt, **kw}


def test_curve_counts_epochs_and_only_credits_completed_trials() -> None:
    reports = {
        # completed: pretrain to epoch 10 in two fidelity reports, 3 fine-tune epochs, stage end
        "a": [_report("pretrain", 1, 1, epoch=5, val_accuracy=0.5),
              _report("pretrain", 3, 2, epoch=10, val_accuracy=0.6),
              *[_report("fine_tune", 3 + e, 1, epoch=e, val_accuracy=0.7) for e in (1, 2, 3)],
              _report("fine_tune", 6.5, 0.5, stage_done=True, val_accuracy=0.8),
              _report("final", 7, 0.5, val_accuracy=0.8)],
        # stopped by ASHA after its first fidelity report: cost, no accuracy to deliver
        "b": [_report("pretrain", 2, 2, epoch=5, val_accuracy=0.9)],
    }
    points = eff.curve(reports)
    assert points[-1]["trial_epochs"] == 10 + 3 + 5
    assert points[-1]["trial_s"] == pytest.approx(7 + 2)  # time_this_iter_s summed
    assert points[-1]["best_val"] == 0.8  # b's 0.9 came from a fidelity probe, not a result
    assert math.isnan(eff.best_at(points, budget=17))  # a had not finished by then
    assert eff.best_at(points, budget=18) == 0.8
