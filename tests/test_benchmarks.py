"""The bookkeeping behind the committed benchmark tables (the scripts' arithmetic), and one short
real throughput run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _cells  # noqa: E402
import _machine  # noqa: E402
import preset_plus_minirocket as ppm  # noqa: E402
import pretrain_gap  # noqa: E402
import readout_choice  # noqa: E402
import reproduce  # noqa: E402
import search_efficiency as eff  # noqa: E402
import selection  # noqa: E402
import throughput  # noqa: E402


def test_claim_is_exclusive_and_taken_over_from_a_dead_process(tmp_path: Path) -> None:
    claim = tmp_path / "gesture_seed0.claim"
    assert _cells._claim(claim)
    assert claim.read_text() == str(os.getpid())
    assert not _cells._claim(claim)  # held by a live process (this one)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    claim.write_text(dead)
    assert _cells._claim(claim)  # its process is gone: the task is free again
    assert claim.read_text() == str(os.getpid())


def test_cells_run_once_and_only_cells_of_the_same_settings_are_tabled(tmp_path: Path) -> None:
    calls = []

    def run_one(dataset: str, seed: int) -> dict:
        calls.append((dataset, seed))
        return {"rows": [dataset, seed]}

    cells = [("b", 0), ("a", 0), ("b", 1)]
    _cells.run_cells(cells, tmp_path, run_one, {"k": 1})
    _cells.run_cells(cells, tmp_path, run_one, {"k": 1})  # a rerun skips finished cells
    assert calls == cells
    _cells.write_done(_cells.cell_path(tmp_path, "a", 0), {"settings": {"k": 2}, "rows": []})
    found = _cells.finished(cells + [("a", 1)], tmp_path, {"k": 1})
    assert list(found) == [("b", 0), ("b", 1)]  # datasets as first given, then seeds
    assert found[("b", 1)]["rows"] == ["b", 1]
    assert not list(tmp_path.glob("*.claim"))


def test_mean_std_is_percent_with_sample_std() -> None:
    mean, std = _cells.mean_std([0.8, 0.9])
    assert mean == pytest.approx(85.0) and std == pytest.approx(7.0710678)
    assert math.isnan(_cells.mean_std([0.5])[1])


def test_provenance_is_command_machine_versions_and_date() -> None:
    command, machine, versions, date = _machine.provenance(
        "/x/benchmarks/startup.py", ["--out-dir", "a b"], packages=("torch", "no-such-package"),
        load_start="1.00, 2.00, 3.00")
    assert command == "- command: `python benchmarks/startup.py --out-dir 'a b'`"
    assert machine.startswith(f"- machine: {_machine.machine()}; load average at start "
                              "1.00, 2.00, 3.00, at the end ")
    assert machine.endswith(" (the machine is shared)")
    assert versions == (f"- torch {torch.__version__}, no-such-package not installed, "
                        f"python {sys.version.split()[0]}")
    assert date.startswith("- date: 20")
    assert "at start" not in _machine.provenance("k_ablation.py", [])[1]
    assert "load average at the end " in _machine.provenance("k_ablation.py", [])[1]


def _run_script(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """A benchmark run as a script (benchmarks/ on sys.path, its own process and threads)."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick",
                           "--out-dir", str(out), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


TINY = ("--set", "train.pretrain_epochs=1", "--set", "train.probe_epochs=1")


def test_reproduce_quick_scores_both_protocols_per_stage(tmp_path: Path) -> None:
    proc = _run_script("reproduce.py", tmp_path, "--no-minirocket", *TINY,
                       "--set", "train.classifier_epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr  # per-epoch test at the selected epoch = the honest test
    df = pd.read_csv(tmp_path / "reproduce.csv")
    for stage in ("linear_probe", "fine_tune"):
        rows = df[df["stage"] == stage].set_index("protocol")
        # the best test accuracy over the epochs includes the honestly selected epoch's
        assert rows.loc[reproduce.AUTHORS, "test_accuracy"] >= rows.loc[
            reproduce.HONEST, "test_accuracy"].min()
    assert (df["method"] == "CBD, stage selected on validation").sum() == 1


def test_selection_quick_tables_every_protocol_and_a_three_member_ensemble(
        tmp_path: Path) -> None:
    proc = _run_script("selection.py", tmp_path, *TINY, "--set", "train.classifier_epochs=3",
                       "--set", "data.cv_folds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "selection.csv").set_index("protocol")
    protocols = [selection.VAL_SPLIT, selection.CV_REFIT, selection.ENSEMBLE, selection.MR_ALL,
                 selection.MR_SPLIT]
    assert sorted(df.index) == sorted(protocols)
    ensemble = df.loc[selection.ENSEMBLE]
    assert ensemble["n_models"] == 3 and len(ensemble["members"].split()) == 3
    # the ensemble's selection is (b)'s; MiniRocket trains on what each CBD protocol trains on
    assert ensemble["epoch"] == df.loc[selection.CV_REFIT, "epoch"]
    assert df.loc[selection.MR_ALL, "n_train"] == df.loc[selection.CV_REFIT, "n_train"]
    assert df.loc[selection.MR_SPLIT, "n_train"] == df.loc[selection.VAL_SPLIT, "n_train"]
    assert df.loc[selection.MR_SPLIT, "n_train"] < df.loc[selection.MR_ALL, "n_train"]
    table = (tmp_path / "selection.md").read_text()
    for protocol in protocols:
        assert f"| gesture | {protocol} |" in table
    row = next(line for line in table.splitlines() if f"| {selection.ENSEMBLE} |" in line)
    assert row.split(" | ")[6] == "3"  # the models column
    assert "CV estimate vs refit test: mean gap" in table


def test_selection_gap_is_estimate_minus_test_in_points() -> None:
    df = pd.DataFrame({"dataset": "d", "seed": [0, 1], "protocol": selection.CV_REFIT,
                       "estimate": [0.90, 0.80], "test_accuracy": [0.80, 0.80]})
    (line,) = selection.gap_lines(df)
    assert "CV estimate vs refit test: mean gap 5.00 ± 7.07" in line


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


def test_curve_counts_no_pretraining_for_a_reused_encoder() -> None:
    reports = {"r": [_report("pretrain", 0.1, 0.1, epoch=5, val_accuracy=0.6, encoder_reused=1),
                     _report("pretrain", 0.2, 0.1, epoch=10, val_accuracy=0.6, encoder_reused=1),
                     _report("linear_probe", 1, 0.8, epoch=1, val_accuracy=0.7),
                     _report("final", 1.5, 0.5, val_accuracy=0.7)]}
    assert eff.curve(reports)[-1]["trial_epochs"] == 1  # the probe epoch alone


def test_reuse_verdict_is_trials_per_hour_ratio_and_cv_difference() -> None:
    means = {"TPE + ASHA, encoder reuse": {"per_hour": 30.0, "trial_epochs": 50, "trial_s": 60,
                                           "best_val": 0.91},
             "TPE + ASHA, no reuse": {"per_hour": 12.0, "trial_epochs": 100, "trial_s": 120,
                                      "best_val": 0.90}}
    line = eff.verdict("reuse", means)
    assert line.startswith("Encoder reuse: 2.50x the trials per hour (30.0 vs 12.0)")
    assert "50.0% fewer trial-epochs" in line and "+1.00 points" in line


def test_pretrain_gap_quick_probes_along_the_step_budget(tmp_path: Path) -> None:
    """8 steps at batch 32 over 120 series (3 steps an epoch) are 3 epochs, probed at 2 and 3."""
    proc = _run_script("pretrain_gap.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "pretrain_gap_runs" / "gesture_seed0.json")
                                   .read_text())
    assert [c[:2] for c in run["pretrained"]["curve"]] == [[6, 2], [9, 3]]
    assert run["random"]["epochs"] == 0 and run["pretrained"]["epochs"] == 3
    assert (tmp_path / "pretrain_gap.png").stat().st_size > 0
    table = (tmp_path / "pretrain_gap.md").read_text()
    gap = 100 * (run["pretrained"]["curve"][-1][2] - run["random"]["val"])
    assert "| gesture | 1 | 9 (3) |" in table and f"{gap:+.2f}" in table
    assert "±" not in table.split("|---|")[-1]  # one seed: no spread to show


def test_pretrain_gap_table_is_pretrained_minus_random_in_points() -> None:
    runs = {"d": [{"random": {"val": 0.5, "test": 0.4},
                   "pretrained": {"curve": [[10, 1, 0.6], [20, 2, 0.7]], "test": 0.6,
                                  "epochs": 2}},
                  {"random": {"val": 0.7, "test": 0.6},
                   "pretrained": {"curve": [[10, 1, 0.6], [20, 2, 0.9]], "test": 0.6,
                                  "epochs": 2}}]}
    rows = pretrain_gap.table(runs)[2:]
    assert rows[0].startswith("| d | 2 | 10 (1) | 60.00 ± 14.14 | 60.00 ± 0.00 | +0.00 | | | |")
    assert "| 80.00 ± 14.14 | +20.00 | 50.00 ± 14.14 | 60.00 ± 0.00 | 10.00 ± 14.14 |" in rows[1]


def test_reuse_benchmark_budget_override_and_no_machine_path(tmp_path: Path) -> None:
    from cbdtune.space import load_space

    args = eff.parse_args(["--compare", "reuse", "--space", "default", "--set",
                           "train.pretrain_epochs=40", "--work-dir", str(tmp_path)])
    space = load_space(eff.space_file(args, tmp_path))
    assert space.base.train.pretrain_epochs == 40
    assert space.keys == load_space("default").keys  # the same knobs searched
    assert eff.shown(["--seeds", "3", "--work-dir", str(tmp_path)]) == ["--seeds", "3",
                                                                       "--work-dir", "W"]


def test_trial_cost_quick_tables_each_budget(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trial_cost.py"), "--quick", "--dataset",
         "JapaneseVowels", "--budget", "preset=", "--budget", "one_step=train.pretrain_max_steps=1",
         "--name", "jv"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1].removeprefix("wrote "))
    assert out.parent != REPO / "results"  # --quick writes to a temporary folder
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith(("| preset", "| one_step"))]
    assert len(rows) == 2
    for row in rows:
        assert row[2] == "1" and row[7] == "completed"  # one epoch; the trial finished
        assert 0.0 < float(row[8]) <= 100.0 and 0.0 < float(row[9].rstrip(" |")) <= 100.0


def test_readout_choice_names_the_selected_blend() -> None:
    from cbdtune.ridge import ALPHAS

    def meta(epoch: int, levels: bool = True, stage: str = "ridge") -> dict:
        return {"stage": stage, "epoch": epoch, "config": {"model.level_features": levels}}

    n = len(ALPHAS)
    assert readout_choice.choice(meta(1)) == "tokens"
    assert readout_choice.choice(meta(n + 1)) == "tokens + levels"
    assert readout_choice.choice(meta(3 * n + 1)) == readout_choice.choice(meta(4 * n)) == (
        "levels alone")
    assert readout_choice.choice(meta(4 * n, levels=False)) == "tokens"  # one blend without levels
    assert readout_choice.choice(meta(7, stage="fine_tune")) == "fine_tune"


def test_token_rate_table_pairs_a_run_without_random_rows_with_an_earlier_one(
        tmp_path: Path, monkeypatch) -> None:
    """A pretraining-only change (no (r) rows of its own) takes the random encoder of an
    earlier variant, same dataset and seeds; the gain is paired by seed; MiniRocket may come
    from a run of its own."""
    import token_rate

    def rows(protocol: str, accs: list[float]) -> list[dict]:
        return [{"dataset": "toy", "seed": s, "protocol": protocol, "test_accuracy": a,
                 "epoch": 1, "time_s": 1.0} for s, a in enumerate(accs)]

    pd.DataFrame(rows(selection.CV_REFIT, [0.80, 0.90]) + rows(selection.RANDOM, [0.70, 0.80])
                 ).to_csv(tmp_path / "base.csv", index=False)
    pd.DataFrame(rows(selection.CV_REFIT, [0.85, 0.95])).to_csv(tmp_path / "aug.csv",
                                                                index=False)
    pd.DataFrame(rows(selection.MR_ALL, [0.90, 0.92])).to_csv(tmp_path / "mr.csv", index=False)
    monkeypatch.setattr(token_rate, "_tokens", lambda dataset, m: (16, 2))  # no dataset on disk
    assert token_rate.main(["--variant", "base=base", "--variant", "aug=aug",
                            "--minirocket", "mr", "--results-dir", str(tmp_path),
                            "--name", "t"]) == 0
    table = pd.read_csv(tmp_path / "t.csv").set_index("variant")
    assert table.loc["base", "gain_mean"] == pytest.approx(10.0)
    assert table.loc["aug", "gain_mean"] == pytest.approx(15.0)  # (85-70, 95-80) paired
    assert table.loc["aug", "minus_minirocket"] == pytest.approx(90.0 - 91.0)
    assert table.loc["aug", "vs_first"] == "+5.00 ± 0.00"  # (85-80, 95-90)


def test_cross_selected_point_ignores_the_fold_it_predicts() -> None:
    """Fold 0 alone prefers point 1, folds 1 and 2 point 0: fold 0 is read at point 0 (its
    peers' choice); each of folds 1 and 2 at point 1 (fold 0's 1.0 tips the mean of its peers);
    ties go to the lower loss."""
    import oof_honesty

    acc = np.array([[0.5, 1.0], [0.9, 0.6], [0.9, 0.6]])
    loss = np.zeros_like(acc)
    assert oof_honesty.cross_selected(acc, loss).tolist() == [0, 1, 1]
    acc = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert oof_honesty.cross_selected(acc, np.array([[1.0, 0.5], [1.0, 0.5]])).tolist() == [1, 1]


def test_oof_honesty_quick_tables_both_kinds(tmp_path: Path) -> None:
    proc = _run_script("oof_honesty.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [json.loads(f.read_text()) for f in (tmp_path / "oof_honesty_runs").glob("*.json")]
    for kind in ("selected", "cross"):
        assert 0 <= row[f"{kind}_weight_minirocket"] <= 1
        assert 0 < row[f"{kind}_ensemble_test"] <= 1
    for model in ("cbd", "minirocket"):
        assert all(0 < row[f"{model}_{kind}_oof"] <= 1 for kind in ("selected", "cross"))
    assert "| gesture | 1 |" in (tmp_path / "oof_honesty.md").read_text()


def test_split_shift_sees_training_series_that_resemble_each_other_more_than_the_test() -> None:
    """Training series in near-identical pairs: leave-one-out 1-NN finds each one's twin (100%);
    test series drawn away from every pair are labelled by chance."""
    import split_shift

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 1, 30))
    x_train = np.concatenate([centers, centers + 1e-3 * rng.normal(size=centers.shape)])
    y_train = np.tile(np.arange(20) % 2, 2)
    x_test = rng.normal(size=(200, 1, 30))
    y_test = rng.integers(0, 2, 200)
    r = split_shift.shift(x_train, y_train, x_test, y_test)
    assert r["loo"] == 1.0
    assert 0.35 < r["test"] < 0.65
    assert split_shift.nearest(x_train[:, 0], x_train[:, 0], exclude_self=True, chunk=7).tolist() \
        == [*range(20, 40), *range(20)]


def test_minirocket_seed_takes_series_shorter_than_its_kernel() -> None:
    """PenDigits has 8 steps; aeon's MiniRocket needs 9: the benchmarks edge-pad as the search's
    baseline does (``baselines.padded``) instead of failing after the CBD rows."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 2, 8)).astype(np.float32) + y[:, None, None]
    split = SimpleNamespace(x=x, y=y)
    data = SimpleNamespace(train=split, test=split, val=split, n_classes=2)
    row = reproduce.minirocket_seed(data, 0, "train", 1, warm_up=False)
    assert row["test_accuracy"] > 0.9


def test_preset_plus_minirocket_quick_blends_the_two_families(tmp_path: Path) -> None:
    proc = _run_script("preset_plus_minirocket.py", tmp_path, "--search-runs", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [json.loads(f.read_text()) for f in (tmp_path / f"{ppm.NAME}_runs").glob("*.json")]
    assert row["status"] == "completed"
    assert 0 <= row["e_weight_minirocket"] <= 1
    for k in "adef":
        assert 0 < row[f"{k}_test"] <= 1
    if row["e_weight_minirocket"] in (0.0, 1.0):  # a selection of one family is that family
        assert row["e_test"] == row["d_test" if row["e_weight_minirocket"] else "a_test"]
    assert row["e_oof"] >= max(row["a_oof"], row["d_oof"]) - 0.05  # no worse than a member by much
    assert "| gesture | 1 |" in (tmp_path / f"{ppm.NAME}.md").read_text()


def test_preset_plus_minirocket_pairs_b_by_dataset_and_seed(tmp_path: Path) -> None:
    (tmp_path / "gesture_seed0.json").write_text(json.dumps({"b_test": 0.95}))
    run = {"settings": {}, "status": "completed", "a_test": 0.90, "d_test": 0.93, "e_test": 0.92,
           "f_test": 0.94, "e_weight_minirocket": 0.5}
    rows = ppm.with_search({("gesture", 0): run, ("gesture", 1): {**run, "a_test": 0.92}},
                           [tmp_path / "missing", tmp_path])
    assert [r["b_test"] for r in rows] == [0.95, None]  # seed 1 has no search cell
    assert "settings" not in rows[0]
    [line] = [x for x in ppm.table(rows, ["gesture"]) if x.startswith("| gesture")]
    cells = line.split(" | ")
    assert cells[6] == ""  # (b) is blank where a seed has none
    assert cells[7] == "+1.00 ± 1.41"  # (e) - (a), paired by seed: +2 and 0 points
