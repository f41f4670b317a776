"""Search efficiency on gesture: TPE + ASHA against random search, and encoder reuse against none.

``--compare asha`` (default): TPE + ASHA against random search without early stopping.
``--compare reuse``: TPE + ASHA with pretrained-encoder reuse (the search's default: trials with
a known pretraining key load the encoder, and up to ``--reuse-share`` of the trials are proposed
on a good trial's encoder) against the same search with ``--no-reuse``. Each search gets an empty
encoder cache of its own, so nothing carries over between searches. A reused trial's replayed
pretraining reports count no epochs.

Both run the same number of trials with the same space, three search seeds each, through the
real CLI (``python -m cbdtune.search`` as a subprocess, with its own Ray, storage and MLflow
store under a work folder). ``--seed s`` seeds the sampler and the trials (``train.seed``, hence
the validation split), so seed s of one method pairs with seed s of the other.

Compute is counted from Tune's per-trial ``result.json`` (one line per report; the simplest
source that has every report, including those of trials ASHA stopped):

- trial-epochs: pretraining epochs plus classifier epochs a trial ran (the short fidelity probes
  on cached features are not counted: they cost a small fraction of an epoch);
- trial-seconds: the sum of the trials' ``time_this_iter_s`` (Tune's clock, so each trial's
  start-up, about 20 s for a TorchTrainer, is included).

Reports of all trials are merged in time order; "best validation accuracy reached" after some
compute is the best ``val_accuracy`` of a trial that *completed* by then (a stopped trial has no
selected model to deliver, so it adds cost and no accuracy).

Optuna's TPE draws its first 10 trials at random (``n_startup_trials``), and with the same seed
they are the random search's first 10 draws: over those, the two methods differ by ASHA alone.

    python benchmarks/search_efficiency.py                  # 16 trials x 3 seeds x 2 (~40 min)
    python benchmarks/search_efficiency.py --num-samples 20 --seeds 5
    python benchmarks/search_efficiency.py --quick          # smoke space, 2 trials, 1 seed
    python benchmarks/search_efficiency.py --work-dir W     # reruns reuse W's finished searches

Writes results/search_efficiency.md (table), .png (curves) and .csv (the curves' points).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs

from cbdtune import reports as schema  # the pipeline's report names

ROOT = Path(__file__).resolve().parents[1]
COMPARISONS = {  # --compare: {method name: search flags}
    "asha": {"TPE + ASHA": ["--sampler", "tpe", "--scheduler", "asha", "--no-reuse"],
             "random, no early stopping": ["--sampler", "random", "--scheduler", "none",
                                           "--no-reuse"]},
    "reuse": {"TPE + ASHA, encoder reuse": ["--sampler", "tpe", "--scheduler", "asha"],
              "TPE + ASHA, no reuse": ["--sampler", "tpe", "--scheduler", "asha", "--no-reuse"]},
}
OUT_NAME = {"asha": "search_efficiency", "reuse": "search_reuse"}
CLASSIFIER_STAGES = schema.STAGES


# ---- running the searches ----------------------------------------------------------------------


def run_search(method: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One search through the CLI; returns its name, folders and wall time."""
    flags = COMPARISONS[args.compare][method]
    name = f"eff-{args.compare}-{list(COMPARISONS[args.compare]).index(method)}-s{seed}"
    if "--no-reuse" not in flags:
        flags = [*flags, "--encoder-cache", str(work / f"{name}-encoders")]
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", args.dataset,
           "--space", space_file(args, work), "--num-samples", str(args.num_samples), *flags,
           "--seed", str(seed), "--refit-top", "0",
           "--max-concurrent", str(args.max_concurrent), "--name", name,
           "--storage", str(work / "ray"), "--results-dir", str(work / "results"),
           # one MLflow db per search: two searches may run side by side (--only)
           "--mlflow-uri", f"sqlite:///{work / f'{name}.mlflow.db'}", "--experiment", "efficiency"]
    # RAY_ADDRESS=local: a fresh Ray per search; "auto" would join any Ray running on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    log, done = work / f"{name}.log", work / f"{name}.done.json"
    if done.exists():  # finished by an earlier run of this script with the same --work-dir
        wall = json.loads(done.read_text())["wall_s"]
        print(f"{name}: reusing the finished search in {work}", flush=True)
    else:
        for partial in (work / "ray" / name, *(work / "results").glob(f"*/{name}")):
            shutil.rmtree(partial, ignore_errors=True)  # a search stopped part-way: start over
        t0 = time.perf_counter()
        with log.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, check=False).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"{shlex.join(cmd)} exited {rc}; last lines of {log}:\n{tail}")
        done.write_text(json.dumps({"wall_s": wall, "command": cmd}))
    return {"method": method, "seed": seed, "name": name, "wall_s": wall,
            "storage": work / "ray" / name,
            "trials": next((work / "results").glob(f"*/{name}/trials.parquet"))}


def space_file(args: argparse.Namespace, work: Path) -> str:
    """``--space`` as given, or with ``--set`` overrides of its fixed keys: a copy in ``work``."""
    if not args.set:
        return args.space
    import yaml

    from cbdtune.config import parse_overrides
    from cbdtune.space import load_space

    source = Path(load_space(args.space).path)
    raw = yaml.safe_load(source.read_text())
    raw.update(parse_overrides(args.set))
    path = work / f"{source.stem}-set.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


# ---- reading what they did ---------------------------------------------------------------------


def trial_reports(storage: Path) -> dict[str, list[dict[str, Any]]]:
    """``{trial_id: [report, ...]}`` from each trial folder's result.json (JSON lines)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(storage.glob("trial_*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name.removeprefix("trial_")] = lines
    if not out:
        raise RuntimeError(f"no trial_*/result.json under {storage}")
    return out


def epochs_in(report: dict[str, Any], last_pretrain_epoch: int) -> int:
    """Training epochs a report stands for: the pretraining epochs since the previous fidelity
    report (none when the trial replays a reused encoder's reports), or one classifier epoch (a
    stage's closing ``stage_done`` report and the final report add none)."""
    stage = report.get(schema.STAGE)
    if stage == schema.PRETRAIN:
        if report.get(schema.ENCODER_REUSED):
            return 0
        return int(report[schema.EPOCH]) - last_pretrain_epoch
    if stage in CLASSIFIER_STAGES and not schema.is_stage_done(report):
        return 1
    return 0


def curve(reports: dict[str, list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Merge every trial's reports in time order; the cumulative cost and best completed val."""
    events = []
    for trial_id, rows in reports.items():
        last_pre = 0
        for r in rows:
            n = epochs_in(r, last_pre)
            if r.get(schema.STAGE) == schema.PRETRAIN:
                last_pre = int(r[schema.EPOCH])
            done = r.get(schema.STAGE) == schema.FINAL_STAGE and not r.get(schema.DIVERGED)
            # Tune's timestamp has 1 s resolution; the trial's own clock orders within a second.
            events.append((r.get("timestamp", 0), r.get("time_total_s", 0.0), trial_id, n,
                           float(r.get("time_this_iter_s", 0.0)),
                           float(r[schema.VAL_ACCURACY]) if done else math.nan))
    events.sort(key=lambda e: (e[0], e[1]))
    points, epochs, seconds, best = [], 0, 0.0, math.nan
    for _ts, _tt, _trial, n, dt, val in events:
        epochs += n
        seconds += dt
        if val == val and not val <= best:  # a completed trial; NaN-safe max
            best = val
        points.append({"trial_epochs": epochs, "trial_s": seconds, "best_val": best})
    return points


def best_at(points: list[dict[str, float]], budget: float, key: str = "trial_epochs") -> float:
    """The best completed validation accuracy once ``budget`` compute had been spent."""
    best = math.nan
    for p in points:
        if p[key] > budget:
            break
        best = p["best_val"]
    return best


def summarise_run(run: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    reports = trial_reports(run["storage"])
    points = curve(reports)
    df = pd.read_parquet(run["trials"])
    done = df[df["status"] == "completed"]
    best = done.loc[done["val_accuracy"].idxmax()] if len(done) else None
    reused = int(df[schema.ENCODER_REUSED].fillna(0).sum()) if schema.ENCODER_REUSED in df else 0
    return {**run, "points": points, "n_trials": len(df), "completed": len(done), "reused": reused,
            "stopped": int((df["status"] == "stopped").sum()),
            "other": int((~df["status"].isin(["completed", "stopped"])).sum()),
            "trial_epochs": points[-1]["trial_epochs"], "trial_s": points[-1]["trial_s"],
            "best_val": float(best["val_accuracy"]) if best is not None else math.nan,
            "best_test": float(best["test_accuracy"]) if best is not None else math.nan,
            "statuses": df["status"].value_counts().to_dict()}


# ---- output -------------------------------------------------------------------------------------


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(dict.fromkeys(r["method"] for r in runs), ("tab:blue", "tab:orange"),
                      strict=False))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "trial_epochs", "cumulative trial-epochs"),
                           (axes[1], "trial_s", "cumulative trial-seconds")):
        for i, run in enumerate(runs):
            xs = [p[key] for p in run["points"]]
            ys = [100 * p["best_val"] for p in run["points"]]
            first = all(r["method"] != run["method"] for r in runs[:i])
            ax.step(xs, ys, where="post", color=colors[run["method"]], alpha=0.8,
                    linestyle=("-", "--", ":", "-.")[run["seed"] % 4],
                    label=run["method"] if first else None)
        ax.set_xlabel(label)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best validation accuracy of a completed trial (%)")
    axes[0].legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else math.nan


def pct(x: float) -> str:
    return f"{100 * x:.2f}" if x == x else "-"


def shown(argv: list[str]) -> list[str]:
    """``argv`` with ``--work-dir``'s folder as ``W``: a path of the machine it ran on."""
    return ["W" if i and argv[i - 1] == "--work-dir" else a for i, a in enumerate(argv)]


def header(args: argparse.Namespace, argv: list[str], load_start: str) -> list[str]:
    from cbdtune.config import parse_overrides
    from cbdtune.space import load_space

    space = load_space(args.space)
    tc = space.base.replace(parse_overrides(args.set)).train
    methods = {name: " ".join(flags) for name, flags in COMPARISONS[args.compare].items()}
    title = ("TPE + ASHA vs random search" if args.compare == "asha"
             else "pretrained-encoder reuse vs none")
    lines = [
        f"# Search efficiency on {args.dataset}: {title}", "",
        *provenance(__file__, shown(argv), packages=("torch", "ray"), load_start=load_start),
        f"- space: {Path(space.path).name}"
        + (f" with {' '.join(args.set)} (a smaller budget)" if args.set else "")
        + f" (searched: {', '.join(space.keys)}); each trial "
        f"{tc.pretrain_epochs} pretraining + {tc.classifier_epochs} {tc.classifier} epochs, "
        f"1 CPU; {args.num_samples} trials per search, {args.max_concurrent} at once; seeds "
        f"0..{args.seeds - 1} (sampler and trial seed); no refit after the search",
        "- methods: " + "; ".join(f"{n}: `{f}`" for n, f in methods.items()),
        "- trial-epochs: pretraining + classifier epochs run, from each trial's result.json (a "
        "reused encoder's replayed pretraining counts none); trial-s: sum of Tune's "
        "time_this_iter_s (start-up included); best val: the best val_accuracy (mean CV) of a "
        "*completed* trial; test: that trial's refit test accuracy (read once, not selected on)",
        "- at equal compute: each method's best val once it had spent the trial-epochs of the "
        "cheaper search of the same seed"]
    if args.compare == "asha":
        lines.append("- TPE's first 10 trials are random draws (Optuna's n_startup_trials), the "
                     "same as the random search's with the same seed: up to trial 10 the methods "
                     "differ by ASHA alone")
    return lines


def tables(rows: list[dict[str, Any]], methods: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Per search, then the mean over seeds per method."""
    lines = ["| method | seed | trials (completed / stopped by ASHA / other) | encoders reused "
             "| trial-epochs | trial-s | search wall s | best val % | its test % "
             "| best val % at equal compute |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['n_trials']} ({r['completed']} / "
                     f"{r['stopped']} / {r['other']}) | {r['reused']} | {r['trial_epochs']} "
                     f"| {r['trial_s']:.0f} | {r['wall_s']:.0f} | {pct(r['best_val'])} "
                     f"| {pct(r['best_test'])} | {pct(r['best_at_budget'])} |")
    lines += ["", "Mean over seeds:", "",
              "| method | trials per hour | trial-epochs | trial-s | search wall s | best val % "
              "| its test % | best val % at equal compute |", "|---|---|---|---|---|---|---|---|"]
    means = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        m = means[method] = {k: mean([r[k] for r in mine]) for k in
                             ("trial_epochs", "trial_s", "wall_s", "best_val", "best_test",
                              "best_at_budget")}
        m["per_hour"] = mean([3600 * r["n_trials"] / r["wall_s"] for r in mine])
        lines.append(f"| {method} | {m['per_hour']:.1f} | {m['trial_epochs']:.0f} "
                     f"| {m['trial_s']:.0f} | {m['wall_s']:.0f} | {pct(m['best_val'])} "
                     f"| {pct(m['best_test'])} | {pct(m['best_at_budget'])} |")
    return lines, means


def verdict(compare: str, means: dict[str, dict[str, float]]) -> str:
    (name_a, a), (name_b, b) = means.items()
    if compare == "asha":
        return (f"Compute ASHA saved: {1 - a['trial_epochs'] / b['trial_epochs']:.1%} of the "
                f"trial-epochs, {1 - a['trial_s'] / b['trial_s']:.1%} of the trial-seconds, "
                f"{1 - a['wall_s'] / b['wall_s']:.1%} of the wall time; best validation accuracy "
                f"{100 * (a['best_val'] - b['best_val']):+.2f} points (TPE + ASHA minus random).")
    return (f"Encoder reuse: {a['per_hour'] / b['per_hour']:.2f}x the trials per hour "
            f"({a['per_hour']:.1f} vs {b['per_hour']:.1f}), "
            f"{1 - a['trial_epochs'] / b['trial_epochs']:.1%} fewer trial-epochs, "
            f"{1 - a['trial_s'] / b['trial_s']:.1%} fewer trial-seconds; best CV estimate "
            f"{100 * (a['best_val'] - b['best_val']):+.2f} points ({name_a} minus {name_b}).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="cbdtune-quick-") if args.quick
                                    else ROOT / "results"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cbdtune-efficiency-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    methods = list(COMPARISONS[args.compare])
    runs = []
    for seed in range(args.seeds):
        for method in methods:
            if args.only is not None and method != methods[args.only]:
                continue
            run = summarise_run(run_search(method, seed, args, work))
            runs.append(run)
            print(f"{method:26s} seed {seed}: {run['n_trials']} trials {run['statuses']}, "
                  f"{run['reused']} reused, {run['trial_epochs']} trial-epochs, "
                  f"{run['trial_s']:.0f} trial-s, wall {run['wall_s']:.0f} s, best val "
                  f"{pct(run['best_val'])} (test {pct(run['best_test'])})", flush=True)

    if args.only is not None:
        print(f"--only {args.only}: {methods[args.only]}'s searches are in {work}; run again "
              "with this --work-dir and without --only for the tables")
        return 0

    import pandas as pd

    # Equal-compute comparison: each method's best once it had spent what the cheaper search spent.
    budget = {s: min(r["trial_epochs"] for r in runs if r["seed"] == s) for s in range(args.seeds)}
    rows = [{**run, "best_at_budget": best_at(run["points"], budget[run["seed"]])}
            for run in runs]
    table, means = tables(rows, methods)
    name = OUT_NAME[args.compare]
    lines = [*header(args, argv, load_start), "", *table, "", verdict(args.compare, means), "",
             f"![best validation accuracy against compute]({name}.png)"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(runs, out_dir / f"{name}.png",
         f"{args.dataset}, {args.num_samples} trials per search, space {args.space}")
    pd.DataFrame([{"method": r["method"], "seed": r["seed"], **pt}
                  for r in runs for pt in r["points"]]).to_csv(out_dir / f"{name}.csv",
                                                              index=False)
    print("\n" + "\n".join(table) + "\n\n" + verdict(args.compare, means))
    print(f"\nwrote {out_dir}/{name}.md, .png, .csv")
    if args.work_dir is None and not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"searches' storage, MLflow db and logs kept in {work}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="gesture")
    p.add_argument("--compare", choices=tuple(COMPARISONS), default="asha",
                   help="asha: TPE + ASHA vs random search (default); reuse: encoder reuse vs none")
    p.add_argument("--space", default="efficiency", help="search space (default efficiency)")
    p.add_argument("--num-samples", type=int, default=16, help="trials per search (default 16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fixed key of the space for both methods, e.g. a smaller "
                        "budget: train.pretrain_epochs=40 (repeatable; stated in the header)")
    p.add_argument("--seeds", type=int, default=3, help="search seeds 0..N-1 per method")
    p.add_argument("--max-concurrent", type=int, default=2,
                   help="trials at once, the same for both methods (default 2: 2 cores)")
    p.add_argument("--work-dir", default=None,
                   help="where the searches' Ray storage, MLflow db and logs go, kept (default: "
                        "a temp dir, deleted at the end unless --keep-work); a search already "
                        "finished there is reused, so a stopped run resumes")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--only", type=int, choices=(0, 1), default=None,
                   help="run only this method's searches (0 or 1, in --compare's order) into "
                        "--work-dir and stop: two invocations can run side by side, each pinned "
                        "to its own core; a third without --only writes the tables")
    p.add_argument("--quick", action="store_true",
                   help="smoke space, 2 trials, 1 seed; writes to a temp dir")
    p.add_argument("--out-dir", default=None, help="default results/ (a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.only is not None and args.work_dir is None:
        p.error("--only needs --work-dir (the other invocations read the searches from it)")
    if args.quick:
        args.space, args.num_samples, args.seeds = "smoke", 2, 1
    return args


if __name__ == "__main__":
    sys.exit(main())
