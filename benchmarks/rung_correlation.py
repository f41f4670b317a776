"""How well a trial's early reports rank it: Spearman's rho between each report's value and the
trial's final CV value, across the trials of one search without early stopping.

For each dataset, runs ``python -m cbdtune.search --scheduler none --refit-top 0 --no-reuse``
(every trial to its end, each pretraining its own encoder) on the default space at a stated
budget, then reads every trial's reports from Tune's ``result.json`` rows. At each report
index (``training_iteration``), across the trials that reported a finite value there, the rank
correlation of that value with the trial's final ``val_accuracy`` (its CV estimate). The
rungs the search's early stopping uses for this budget (:func:`cbdtune.tuning.asha_rungs`)
are marked.

    python benchmarks/rung_correlation.py --datasets gesture,awr,fm --num-samples 10 \\
        --pretrain-epochs 50 --probe-every 5

Halving ``train.pretrain_epochs`` together with ``train.probe_every`` keeps the default's
number of probes, so the rungs sit at the same report indices as in the default search.
Writes results/rung_correlation.md and .csv (``--out``); ``--work-dir`` keeps the runs (default
a temporary folder), and ``--reuse-runs`` recomputes the tables from a work dir's runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _machine import load_average, machine, provenance  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
METRIC = "val_accuracy"


def space_file(work: Path, pretrain_epochs: int | None, probe_every: int | None) -> Path:
    """The default space with the stated budget, written to ``work``."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    if pretrain_epochs is not None:
        raw["train.pretrain_epochs"] = pretrain_epochs
    if probe_every is not None:
        raw["train.probe_every"] = probe_every
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def search_command(dataset: str, space: Path, work: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "cbdtune.search", "--dataset", dataset, "--space", str(space),
            "--num-samples", str(args.num_samples), "--scheduler", "none", "--refit-top", "0",
            "--no-reuse", "--seed", str(args.seed), "--name", f"rc-{dataset}",
            "--max-concurrent", str(args.max_concurrent), "--overwrite",
            "--storage", str(work / "storage"), "--results-dir", str(work / "results"),
            "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}"]


def run_search(dataset: str, space: Path, work: Path, args: argparse.Namespace) -> float:
    """Run one search to the end; its wall seconds."""
    cmd = search_command(dataset, space, work, args)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    with open(work / f"{dataset}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"search on {dataset} exited {rc}; see {work / f'{dataset}.log'}")
    return time.perf_counter() - started


def trial_reports(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> its reports in order, from Tune's ``trial_<id>/result.json`` rows."""
    out = {}
    for path in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name.removeprefix("trial_")] = rows
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant or n < 3."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def correlations(trials: dict[str, list[dict[str, Any]]], rungs: tuple[float, ...]
                 ) -> list[dict[str, Any]]:
    """One row per report index: trials, stage, rho with the final value, rung or not."""
    finals = {t: r[-1][METRIC] for t, r in trials.items()
              if r and r[-1].get("final") == 1 and _finite(r[-1].get(METRIC))}
    by_step: dict[int, dict[str, tuple[float, str]]] = {}
    for t, rows in trials.items():
        if t not in finals:
            continue
        for row in rows:
            if _finite(row.get(METRIC)) and row.get("final") != 1:
                by_step.setdefault(int(row["training_iteration"]), {})[t] = (
                    float(row[METRIC]), str(row.get("stage", "")))
    out = []
    for step in sorted(by_step):
        seen = by_step[step]
        ids = sorted(seen)
        values = [seen[t][0] for t in ids]
        final = [finals[t] for t in ids]
        best = max(ids, key=lambda t: finals[t])
        rank = 1 + sum(v > seen[best][0] for v in values)
        out.append({"report": step, "stage": "/".join(sorted({seen[t][1] for t in ids})),
                    "rung": step in rungs, "trials": len(ids), "rho": spearman(values, final),
                    "best_final_rank_here": rank})
    return out


def replay(trials: dict[str, list[dict[str, Any]]], grace: int, max_t: int, *,
           min_completed: int, se_margin: float) -> dict[str, Any]:
    """The trials' reports fed, in the order they were made (``timestamp``), to
    :class:`cbdtune.stopping.NoiseAwareASHA`; how many it would stop, and whether the trial with
    the best final value among them. An approximation: a real stop frees a slot, so later
    trials would start earlier."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from cbdtune.stopping import NoiseAwareASHA

    s = NoiseAwareASHA(max_t=max_t, grace_period=grace, reduction_factor=3,
                       min_completed=min_completed, se_margin=se_margin)
    s.set_search_properties(METRIC, "max")
    events = sorted((row.get("timestamp", 0), i, t, row) for t, rows in trials.items()
                    for i, row in enumerate(rows))
    stopped: set[str] = set()
    for _, _, t, row in events:
        if t in stopped:
            continue
        trial = SimpleNamespace(trial_id=t)
        if row.get("final") == 1:
            s.on_trial_complete(None, trial, row)
        elif s.on_trial_result(None, trial, row) == TrialScheduler.STOP:
            stopped.add(t)
            s.on_trial_complete(None, trial, row)
    finals = {t: r[-1][METRIC] for t, r in trials.items() if r and r[-1].get("final") == 1}
    best = max(finals, key=finals.__getitem__) if finals else None
    return {"trials": len(trials), "stopped": len(stopped), "best_stopped": best in stopped}


# Stopping rules replayed on the measured reports: the search's default and ASHA's plain one.
# "max_t": 14 puts a second rung at report 12 (after the last probe), as the search did before.
RULES = {"noise-aware (min_completed 4, k = 1)": {"min_completed": 4, "se_margin": 1.0},
         "plain ASHA cut (min_completed 0, k = 0)": {"min_completed": 0, "se_margin": 0.0},
         "plain ASHA cut, rungs 4 and 12 (the search before)": {"min_completed": 0,
                                                               "se_margin": 0.0, "max_t": 14}}


def _grace_max_t(space: Path) -> tuple[int, int]:
    sys.path.insert(0, str(ROOT))
    from cbdtune.space import load_space
    from cbdtune.tuning import asha_rungs

    sp = load_space(str(space))
    return asha_rungs(sp.base, sp)


def rungs_of(space: Path) -> tuple[float, ...]:
    """The report indices the search's early stopping judges at for this space."""
    sys.path.insert(0, str(ROOT))
    from cbdtune.space import load_space
    from cbdtune.stopping import rung_milestones
    from cbdtune.tuning import asha_rungs

    sp = load_space(str(space))
    grace, max_t = asha_rungs(sp.base, sp)
    return rung_milestones(grace, max_t, 3)


def write(out: Path, rows: list[dict[str, Any]], header: list[str]) -> None:
    fields = ["dataset", "report", "stage", "rung", "trials", "rho", "best_final_rank_here"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    lines = header + ["", "| dataset | report | stage | ASHA rung | trials | Spearman rho with "
                          "final CV | final best's rank at this report |",
                      "|---|---|---|---|---|---|---|"]
    for r in rows:
        rho = "n/a" if math.isnan(r["rho"]) else f"{r['rho']:.2f}"
        lines.append(f"| {r['dataset']} | {r['report']} | {r['stage']} | "
                     f"{'yes' if r['rung'] else ''} | {r['trials']} | {rho} | "
                     f"{r['best_final_rank_here']} |")
    out.write_text("\n".join(lines) + "\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="gesture,awr,fm")
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=50)
    p.add_argument("--probe-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--work-dir", type=Path)
    p.add_argument("--reuse-runs", action="store_true",
                   help="do not run: read the runs already in --work-dir")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "rung_correlation.md")
    p.add_argument("--quick", action="store_true",
                   help="a tiny budget that checks the script runs (gesture, 3 trials of 4 "
                        "pretraining epochs), written to the work dir")
    args = p.parse_args()
    args.work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="rung_correlation-"))
    if args.quick:
        args.datasets, args.num_samples, args.pretrain_epochs, args.probe_every = (
            "gesture", 3, 4, 1)
        args.out = args.work_dir / "rung_correlation.md"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return args


def measure(space: Path, rungs: tuple[float, ...], args: argparse.Namespace) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Each dataset's search (or its runs in the work dir with --reuse-runs): the correlation
    rows, the replays of every stopping rule, and the searches' wall seconds."""
    work = args.work_dir
    rows, replays = [], []
    grace, max_t = _grace_max_t(space)
    walls_file = work / "walls.json"  # each search's wall seconds, kept for --reuse-runs
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    for dataset in args.datasets.split(","):
        if not args.reuse_runs:
            walls[dataset] = run_search(dataset, space, work, args)
            walls_file.write_text(json.dumps(walls))
        trials = trial_reports(work / "storage" / f"rc-{dataset}")
        rows += [{"dataset": dataset, **r} for r in correlations(trials, rungs)]
        for rule, kw in RULES.items():
            kw = {"max_t": max_t, **kw}
            replays.append({"dataset": dataset, "rule": rule, **replay(trials, grace, **kw)})
    return rows, replays, walls


def header_lines(rungs: tuple[float, ...], walls: dict[str, float], load: str,
                 args: argparse.Namespace) -> list[str]:
    command, _, versions, date = provenance(__file__, [
        "--datasets", args.datasets, "--num-samples", str(args.num_samples), "--pretrain-epochs",
        str(args.pretrain_epochs), "--probe-every", str(args.probe_every), "--seed",
        str(args.seed), "--max-concurrent", str(args.max_concurrent)], packages=("torch", "ray"))
    example = " ".join(shlex.quote(c) for c in search_command("DATASET", Path("SPACE"),
                                                               Path("W"), args)[1:])
    rung_list = ", ".join(f"{r:g}" for r in rungs)
    return [
        "# Rank correlation of each report with the trial's final CV value (no early stopping)",
        "", command, f"- each search: `python {example}`",
        f"- machine: {machine()} (2-core CPU shared machine); load average "
        f"{'when the tables were computed from the runs' if args.reuse_runs else 'at start'} "
        f"{load}", versions, date,
        f"- budget: the default space with train.pretrain_epochs={args.pretrain_epochs}, "
        f"train.probe_every={args.probe_every} (the default's number of probes at half its "
        f"epochs); {args.num_samples} trials per dataset, seed {args.seed}, no encoder reuse",
        f"- the search's early-stopping rungs for this space: reports {rung_list}",
        "- search wall s: " + (", ".join(f"{d} {walls[d]:.0f}" for d in args.datasets.split(",")
                                         if d in walls) or "not recorded"),
        "- rho: Spearman's rank correlation, across trials, of the report's val_accuracy "
        "(a probe's CV accuracy during pretraining, then the best point of the mean CV curve) "
        "with the final report's val_accuracy; rank: where the trial with the best final value "
        "stands at this report (1 = first; ties share the better rank)",
    ]


def replay_lines(rows: list[dict[str, Any]], replays: list[dict[str, Any]],
                 rungs: tuple[float, ...]) -> list[str]:
    lines = ["", "Replayed: each dataset's reports fed in the order they were made to "
             "NoiseAwareASHA with these rules (a stop frees a slot in a real search, so later "
             "trials would start earlier: an approximation).", "",
             "| dataset | rule | trials | would stop | best final trial stopped |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['rule']} | {r['trials']} | {r['stopped']} | "
              f"{'yes' if r['best_stopped'] else 'no'} |" for r in replays]
    first = [r for r in rows if r["rung"] and r["report"] == min(rungs)]
    lines += ["", f"At the first rung (report {min(rungs):g}), Spearman rho with the final CV "
              "value: " + ", ".join(f"{r['dataset']} {r['rho']:.2f} ({r['trials']} trials)"
                                    for r in first) + "."]
    return lines


def main() -> None:
    args = parse_args()
    space = space_file(args.work_dir, args.pretrain_epochs, args.probe_every)
    rungs = rungs_of(space)
    load = load_average()
    rows, replays, walls = measure(space, rungs, args)
    write(args.out, rows, header_lines(rungs, walls, load, args))
    with open(args.out, "a") as f:
        f.write("\n".join(replay_lines(rows, replays, rungs)) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
