"""The Bernstein order K ablation (the paper's Table 5) as a search: does K do anything?

Runs the shipped ``k_ablation`` space (K = 1, 2, 4, 8, 12, 16 crossed with the SER
normalisation: the paper's softmax over raw energies, and this project's tempered form) through
the real CLI with Optuna's grid sampler, no ASHA and no baseline trial: every grid point once,
the rest of the config the paper's (linear probe, half its pretraining epochs: see the space's
header). Each trial is scored by 5-fold CV
on the training split, then refit on all of it and tested once (``run_trial``); the test number
is never used to select anything here, it is only plotted.

    python benchmarks/k_ablation.py                      # gesture, 12 trials (~30 min, 2 cores)
    python benchmarks/k_ablation.py --dataset FingerMovements --seed 1
    python benchmarks/k_ablation.py --quick              # smoke budget, 4 trials (a test)

Writes results/k_ablation.md (table: CV accuracy ± s.e. and test accuracy per K and SER form,
with the spread over K of each) and results/k_ablation.png (the two curves).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
K, NORM = "param.model.bernstein_order", "param.model.ser_norm"
QUICK_SPACE = """preset: smoke
train.pretrain_epochs: 2
train.classifier_epochs: 3
train.probe_every: 1000
data.cv_folds: 2
model.bernstein_order: {type: categorical, choices: [1, 4]}
model.ser_norm: {type: categorical, choices: [softmax, tempered]}
"""


def run_search(args: argparse.Namespace, work: Path) -> tuple[Path, float, list[str]]:
    """The grid search through the CLI, with its own Ray, storage and MLflow store in ``work``."""
    name = "k-ablation"
    cmd = [sys.executable, "-m", "cbdtune.search", "--dataset", args.dataset,
           "--space", args.space, "--sampler", "grid", "--scheduler", "none",
           "--no-baseline", "--no-reuse", "--num-samples", str(args.num_samples),
           "--seed", str(args.seed), "--max-concurrent", str(args.max_concurrent),
           "--refit-top", "0", "--name", name, "--storage", str(work / "ray"),
           "--results-dir", str(work / "results"), "--mlflow-uri",
           f"sqlite:///{work / 'mlflow.db'}", "--experiment", "k-ablation"]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, cwd=ROOT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}")
    return next((work / "results").glob(f"*/{name}/trials.parquet")), \
        time.perf_counter() - t0, cmd


def table(df: Any) -> list[str]:
    """One row per (SER form, K), then per form the spread of each accuracy over K."""
    lines = ["| SER normalisation | K | CV accuracy % (s.e.) | refit test accuracy % | status |",
             "|---|---|---|---|---|"]
    for (norm, k), r in df.sort_values([NORM, K]).set_index([NORM, K]).iterrows():
        lines.append(f"| {norm} | {k} | {100 * r['val_accuracy']:.2f} "
                     f"({100 * r.get('val_accuracy_se', float('nan')):.2f}) "
                     f"| {100 * r['test_accuracy']:.2f} | {r['status']} |")
    lines += ["", "Spread over K (max − min, points): " + "; ".join(
        f"{norm}: CV {100 * (g['val_accuracy'].max() - g['val_accuracy'].min()):.2f}, "
        f"test {100 * (g['test_accuracy'].max() - g['test_accuracy'].min()):.2f}"
        for norm, g in df.groupby(NORM))]
    return lines


def figure(df: Any, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for norm, g in df.sort_values(K).groupby(NORM):
        line, = ax.plot(g[K], 100 * g["val_accuracy"], "o-", label=f"{norm}: CV")
        ax.fill_between(g[K], 100 * (g["val_accuracy"] - g["val_accuracy_se"]),
                        100 * (g["val_accuracy"] + g["val_accuracy_se"]),
                        color=line.get_color(), alpha=0.15)
        ax.plot(g[K], 100 * g["test_accuracy"], "s--", color=line.get_color(),
                label=f"{norm}: refit test")
    ax.set(xlabel="Bernstein order K", ylabel="accuracy %", xscale="log",
           title=f"K ablation, {dataset}, linear probe")
    ax.set_xticks(sorted(df[K].unique()), [str(k) for k in sorted(df[K].unique())])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="gesture")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every trial (default 0)")
    p.add_argument("--num-samples", type=int, default=12, help="grid points (default all 12)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default: as many as the machine's CPUs fit)")
    p.add_argument("--quick", action="store_true", help="smoke budget, 4 trials, temp output")
    p.add_argument("--out-dir", default=None, help="default results/ (a temp dir with --quick)")
    args = p.parse_args(argv)
    import pandas as pd

    out = Path(args.out_dir or (tempfile.mkdtemp(prefix="cbdtune-k-") if args.quick
                                else ROOT / "results"))
    with tempfile.TemporaryDirectory(prefix="cbdtune-k-work-") as work:
        args.space = "k_ablation"
        if args.quick:  # the same two knobs on the smoke model and budget
            args.num_samples, args.space = 4, str(Path(work) / "k_quick.yaml")
            Path(args.space).write_text(QUICK_SPACE)
        trials, wall, cmd = run_search(args, Path(work))
        df = pd.read_parquet(trials)
    df = df[df["status"] == "completed"]
    if df.empty:
        raise SystemExit("error: no trial of the ablation completed; see the search's output")
    header = [
        "# Bernstein order K ablation (paper Table 5 style), as a grid search", "",
        *provenance(__file__, argv, packages=("torch", "ray")),
        f"- search: `{shlex.join(['python', *cmd[1:11]])} ...` (own Ray, storage and MLflow "
        "store in a temporary folder)",
        f"- wall {wall:.0f} s for {len(df)} completed trials",
        "- space: cbdtune/search_spaces/k_ablation.yaml (paper preset, linear probe, half its "
        "pretraining epochs, the probe stopped 30 epochs after its best point); CV = "
        "5-fold mean accuracy at the CV-chosen epoch count (s.e. over folds); test = the refit "
        "on all training series, read once; one seed", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "k_ablation.md").write_text("\n".join(header + table(df)) + "\n")
    figure(df, out / "k_ablation.png", args.dataset)
    print("\n".join(table(df)) + f"\n\nwrote {out / 'k_ablation.md'} and {out / 'k_ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
