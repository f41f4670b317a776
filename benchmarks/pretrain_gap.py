"""Does pretraining teach? A linear probe on a pretrained encoder against one on a random encoder,
as the pretraining budget grows in optimizer steps.

For each dataset and seed, two ``pipeline.run_trial`` runs of the same configuration (a search
space's fixed part, ``--space``, default ``default``: the model a default search trains; a linear
probe; 5-fold CV on the training series, refit, test read once):

- random encoder: ``train.pretrain_epochs=0``; the probe reads the encoder as initialised;
- pretrained: ``train.pretrain_steps=--steps`` optimizer steps (``pipeline.steps_to_epochs`` turns
  them into epochs for the dataset's size), with ``--points`` fidelity probes on the way, each a
  full-length linear probe (``train.probe_epochs`` = the classifier's epochs) cross-validated on
  the same folds: the CV accuracy after 1/points, 2/points, ... of the budget.

The gap is pretrained minus random, in CV accuracy at each point and in test accuracy at the end.
Same seed, same folds, same head: the encoder's weights are the only difference.

    python benchmarks/pretrain_gap.py                        # 3 datasets x 2 seeds, 400 steps
    python benchmarks/pretrain_gap.py --threads 1 & python benchmarks/pretrain_gap.py --threads 1
                                                             # two processes share the tasks
    python benchmarks/pretrain_gap.py --quick                # smoke space, gesture, 1 seed

Each (dataset, seed) lands in results/pretrain_gap_runs/ when done (a rerun skips it; processes
side by side take different tasks). Writes results/pretrain_gap.md, .csv and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _cells import finished, folders, run_cells
from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("gesture", "ArticularyWordRecognition", "FingerMovements")


def base_config(args: argparse.Namespace) -> Any:
    from cbdtune.config import parse_overrides
    from cbdtune.space import load_space

    base = load_space(args.space).base
    return base.replace({"train.classifier": "linear_probe", "train.num_threads": args.threads,
                         "train.probe_epochs": base.train.classifier_epochs,
                         **parse_overrides(args.set)})


def one_run(cfg: Any, data: Any) -> dict[str, Any]:
    """CV and test accuracy of one ``run_trial``, and its probes' CV accuracy by steps."""
    from cbdtune.pipeline import run_trial, steps_to_epochs
    from cbdtune.runtime import batches_per_epoch

    reports: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    result = run_trial(cfg, data, lambda m, _s: reports.append(m))
    tc = steps_to_epochs(cfg, len(data.train.x)).train
    per_epoch = batches_per_epoch(len(data.train.x), tc.batch_size, tc.drop_last)
    return {"val": result.metrics["val_accuracy"], "test": result.metrics["test_accuracy"],
            "curve": [[m["epoch"] * per_epoch, m["epoch"], m["val_accuracy"]]
                      for m in reports if m.get("stage") == "pretrain"],
            "epochs": tc.pretrain_epochs, "time_s": time.perf_counter() - t0}


def one_task(base: Any, dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The random-encoder run and the pretrained run of one (dataset, seed)."""
    from cbdtune.data import load_dataset

    cfg = base.replace({"data.dataset": dataset, "train.seed": seed})
    data = load_dataset(cfg.data, seed=seed)
    out: dict[str, Any] = {}
    for name, over in (("random", {"train.pretrain_epochs": 0}),
                       ("pretrained", {"train.pretrain_steps": args.steps,
                                       "train.pretrain_epochs": args.points,
                                       "train.probe_every": 1})):
        r = out[name] = one_run(cfg.replace(over), data)
        print(f"{dataset:26s} seed {seed} {name:10s}: CV {r['val']:.4f} test {r['test']:.4f} "
              f"({r['epochs']} epochs, {r['time_s']:.0f} s)", flush=True)
    return out


# ---- the table and the figure ------------------------------------------------------------------


def pm(xs: list[float]) -> str:
    """Mean ± sample std, in % (the value alone for one seed)."""
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.fmean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| dataset | seeds | steps (epochs) | CV %, random encoder | CV %, pretrained "
             "| CV gap, points | test %, random | test %, pretrained | test gap, points |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset, rs in runs.items():
        rand_val = [r["random"]["val"] for r in rs]
        gap_test = [r["pretrained"]["test"] - r["random"]["test"] for r in rs]
        curve = rs[0]["pretrained"]["curve"]
        for i, (steps, epoch, _) in enumerate(curve):
            vals = [r["pretrained"]["curve"][i][2] for r in rs]
            end = (f"| {pm([r['random']['test'] for r in rs])} "
                   f"| {pm([r['pretrained']['test'] for r in rs])} | {pm(gap_test)} |"
                   if i == len(curve) - 1 else "| | | |")
            lines.append(f"| {dataset} | {len(rs)} | {steps} ({epoch}) | {pm(rand_val)} "
                         f"| {pm(vals)} "
                         f"| {100 * (statistics.fmean(vals) - statistics.fmean(rand_val)):+.2f} "
                         + end)
    return lines


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (dataset, rs) in zip(axes[0], runs.items(), strict=True):
        steps = [0] + [s for s, _, _ in rs[0]["pretrained"]["curve"]]
        for seed, r in enumerate(rs):
            ax.plot(steps, [100 * r["random"]["val"]] + [100 * v for _, _, v in
                                                           r["pretrained"]["curve"]],
                    marker="o", alpha=0.8, label=f"seed {seed}")
        ax.axhline(100 * statistics.fmean(r["random"]["val"] for r in rs), color="gray",
                   linestyle="--", label="random encoder (mean)")
        ax.set(title=dataset, xlabel="pretraining optimizer steps", ylabel="CV accuracy %")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out_dir, runs_dir = folders(args.out_dir, args.quick, "pretrain_gap")
    settings = {"space": args.space, "steps": args.steps, "points": args.points,
                "threads": args.threads, "set": sorted(args.set)}
    base = base_config(args)
    load_start = load_average()
    cells = [(d, s) for s in range(args.seeds) for d in args.datasets]
    run_cells(cells, runs_dir, lambda d, s: one_task(base, d, s, args), settings)
    runs: dict[str, list[dict[str, Any]]] = {}
    for (dataset, _), run in finished(cells, runs_dir, settings).items():
        runs.setdefault(dataset, []).append(run)
    lines = header(args, argv, base, load_start) + table(runs)
    (out_dir / "pretrain_gap.md").write_text("\n".join(lines) + "\n\n![CV accuracy against "
                                             "pretraining steps](pretrain_gap.png)\n")
    plot(runs, out_dir / "pretrain_gap.png")
    print("\n".join(lines) + f"\n\nwrote {out_dir}/pretrain_gap.md, .png")
    return 0


def header(args: argparse.Namespace, argv: list[str], base: Any, load_start: str) -> list[str]:
    m, tc = base.model, base.train
    return [
        "# Does pretraining teach? Pretrained vs random encoder, by pretraining steps", "",
        *provenance(__file__, argv, load_start=load_start),
        f"- {args.threads} torch thread(s)",
        f"- config: space {args.space}'s fixed part (preset and budget): d_model {m.d_model}, "
        f"{m.encoder_layers} encoder layers, ff {m.ff_dim}, batch {tc.batch_size}, pretrain lr "
        f"{tc.pretrain_lr}; linear probe, {tc.classifier_epochs} epochs (early stop "
        f"{tc.early_stop_patience}), {base.data.cv_folds}-fold CV; overrides "
        f"{' '.join(args.set) or 'none'}",
        f"- pretrained: {args.steps} optimizer steps, probed {args.points} times (each a "
        f"{tc.classifier_epochs}-epoch linear probe, CV); random: the same run without "
        "pretraining; test: the refit on all training series, read once; mean ± sample std "
        "over seeds", ""]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--space", default="default", help="whose fixed part is the config")
    p.add_argument("--steps", type=int, default=400, help="pretraining optimizer steps")
    p.add_argument("--points", type=int, default=4, help="probes along the way")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="smoke space, gesture, 1 seed, 8 steps")
    p.add_argument("--out-dir", default=None, help="default results/ (a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.space, args.datasets, args.seeds, args.steps, args.points = (
            "smoke", ["gesture"], 1, 8, 2)
    if min(args.seeds, args.steps, args.points, args.threads) < 1:
        p.error("--seeds, --steps, --points and --threads must be >= 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
