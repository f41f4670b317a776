"""Model selection protocols compared: one validation split, CV + refit, a 3-seed refit ensemble.

For each dataset and seed, one configuration (``--preset`` plus ``--set`` overrides) is run under
three protocols with ``cbdtune.pipeline``, each reading the test split once:

(a) validation split (today): ``run_trial`` with ``data.cv_folds=0``. A stratified validation
    split (``data.val_fraction``, 20%, carved by seed) is held out of train; the stage and epoch
    with the best validation accuracy are selected and that classifier is tested. Its estimate
    is the validation accuracy there.
(b) CV + refit: ``run_trial`` with ``data.cv_folds=k`` (the config's, 5 by default): stratified
    k-fold CV on every training series selects the stage and epoch count, which is refit on all
    of them and tested. Its estimate is the mean CV accuracy (± its standard error over folds).
(c) refit ensemble of 3 seeds: (b)'s refit classifier plus two ``refit_trial``s of the same stage
    and epoch count at ``train.seed = seed + 1000`` and ``seed + 2000`` (fresh pretraining, head
    and batch order; offsets far above the ``--seeds`` range so no member repeats another task's
    seed). Their test-split softmax probabilities are averaged and the average is tested once;
    each member's own test accuracy is recorded too. The selection is (b)'s: no new look at data.
    ``--ensemble seeds`` builds (c) without new training: seed s's ensemble averages (b)'s refit
    models of seeds s, s + 1 and s + 2 (mod ``--seeds``, so it needs >= 3 seeds); each member
    keeps its own CV-chosen epoch count. Neighbouring ensembles share members, so their spread
    understates the spread of independent ensembles.
(r) random encoder: (b) with ``train.pretrain_epochs=0``: the same model initialisation (same
    seed), readout, folds and refit, the encoder never pretrained. The table adds, per dataset, the
    gain of pretraining (b) - (r) in test points, paired by seed (mean ± sample std over seeds).

Beside them MiniRocket (aeon ``MiniRocketClassifier(random_state=seed, n_jobs=threads)``, as in
``benchmarks/reproduce.py``, one untimed warm-up fit per dataset and process) fitted twice and
tested once each: on every training series, which (b)'s and (c)'s final models train on (the
matched baseline), and on (a)'s train split without its validation part.

Times: (a) and (b) are ``run_trial``'s wall time (pretraining, fidelity probes, selection, refit,
test); (c) is (b)'s plus the two extra refits; MiniRocket is fit + predict.

    python benchmarks/selection.py                                 # 3 datasets x 5 seeds, paper
    python benchmarks/selection.py --epochs-scale 0.25 --seeds 3 --datasets gesture
                        # a first look; neither has been timed yet: per task, (b) trains k + 1
                        # classifiers and (c) two more pretrainings, ~6x reproduce.py's fine-tune
    python benchmarks/selection.py --quick                         # smoke preset, gesture, 1 seed
    python benchmarks/selection.py --protocols b --ensemble seeds --preset default \
        --name selection_default                  # (b) and (c) only -> results/selection_default.md
    python benchmarks/selection.py --threads 1 & python benchmarks/selection.py --threads 1
                                            # two processes share the work
    python benchmarks/selection.py --protocols br --preset default   # with the random control

Each (dataset, seed) lands in results/selection_runs/<dataset>_seed<k>.json when it finishes; a
rerun skips those, processes started side by side take different tasks (benchmarks/_cells.py),
and every process ends by writing the table from all finished tasks with the same settings.
Writes results/selection.md (per dataset and protocol, mean ± sample std over seeds) and
results/selection.csv (one row per dataset, seed and protocol).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _cells import finished, fmt_ms, folders, mean_std, nothing_to_table, run_cells
from _machine import provenance  # benchmarks/ is on sys.path when a script runs
from reproduce import has_aeon, minirocket_seed

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("gesture", "ArticularyWordRecognition", "FingerMovements")
ENSEMBLE_SEED_OFFSETS = (1000, 2000)  # members 2 and 3 of (c): train.seed = seed + offset
VAL_SPLIT = "(a) validation split (today)"
CV_REFIT = "(b) CV + refit"
ENSEMBLE_SIZE = 1 + len(ENSEMBLE_SEED_OFFSETS)
ENSEMBLE = f"(c) refit ensemble of {ENSEMBLE_SIZE} seeds"
RANDOM = "(r) random encoder: (b) without pretraining"
MR_ALL = "MiniRocket, fit on all training series (matched to b, c)"
MR_SPLIT = "MiniRocket, fit on (a)'s train split (matched to a)"


# ---- one (dataset, seed) -------------------------------------------------------------------------


def _quiet(_metrics: dict[str, Any], _payload: dict[str, Any] | None) -> None:
    """run_trial's reporter here: the final metrics come back in its result."""


def _trial_row(protocol: str, result: Any, seconds: float, n_train: int) -> dict[str, Any]:
    from cbdtune import reports as schema  # the pipeline's report names

    m = result.metrics
    return {"protocol": protocol, "method": "CBD", "status": result.status,
            "test_accuracy": m.get(schema.TEST_ACCURACY, math.nan),
            "test_f1": m.get(schema.TEST_F1, math.nan),
            "estimate": m.get(schema.VAL_ACCURACY, math.nan),
            "estimate_se": m.get(schema.VAL_ACCURACY_SE, math.nan),
            "stage": m.get(schema.SELECTED_STAGE, ""), "epoch": m.get(schema.SELECTED_EPOCH, 0),
            "n_models": 1, "members": "", "n_train": n_train, "time_s": seconds}


def _ensemble_row(cfg: Any, data: Any, cv: dict[str, Any], clf: Any, rt: Any) -> dict[str, Any]:
    """(c): (b)'s refit and refits at seed + each offset; softmax average tested once."""
    from cbdtune import classify, pipeline

    stage, epochs = cv["stage"], cv["epoch"]
    probas = [classify.predict_proba(clf, data.test.x, rt, cfg.train)]
    seconds = cv["time_s"]
    for offset in ENSEMBLE_SEED_OFFSETS:
        member = cfg.replace({"train.seed": cfg.train.seed + offset})
        metrics, _clf, proba = pipeline.refit_trial(member, data, stage=stage, epochs=epochs,
                                                    rt=rt)
        probas.append(proba)
        seconds += metrics["wall_s"]
    return {**cv, **_ensemble_scores(probas, data.test.y, data.n_classes), "time_s": seconds}


def _ensemble_scores(probas: list[Any], y: Any, n_classes: int) -> dict[str, Any]:
    """(c)'s columns: the softmax average tested once, and each member alone."""
    import numpy as np

    from cbdtune.runtime import macro_f1

    pred = np.mean(probas, axis=0).argmax(1)
    return {"protocol": ENSEMBLE, "test_accuracy": float(np.mean(pred == y)),
            "test_f1": macro_f1(pred, y, n_classes), "n_models": len(probas),
            "members": " ".join(f"{np.mean(p.argmax(1) == y):.4f}" for p in probas)}


def cbd_seed(cfg: Any, seed: int, cv_folds: int, args: argparse.Namespace
             ) -> tuple[list[dict[str, Any]], Any, Any, Any]:
    """The protocols asked for on one seed; the two datasets (carved split, all of train); and
    (b)'s refit test probabilities (for ``--ensemble seeds``; None if (b) did not run)."""
    from cbdtune import classify, pipeline
    from cbdtune.data import load_dataset
    from cbdtune.runtime import Runtime, resolve_device

    rt = Runtime(device=resolve_device(cfg.train), encoder_cache=args.encoder_cache)
    rows, proba = [], None
    split_cfg = cfg.replace({"data.cv_folds": 0})
    split_data = load_dataset(split_cfg.data, seed=seed)
    if "a" in args.protocols:
        t0 = time.perf_counter()
        result = pipeline.run_trial(split_cfg, split_data, _quiet, rt=rt)
        rows.append(_trial_row(VAL_SPLIT, result, time.perf_counter() - t0,
                               len(split_data.train)))

    cv_cfg = cfg.replace({"data.cv_folds": cv_folds})
    cv_data = load_dataset(cv_cfg.data, seed=seed)
    if "b" in args.protocols:
        t0 = time.perf_counter()
        result = pipeline.run_trial(cv_cfg, cv_data, _quiet, rt=rt)
        rows.append(_trial_row(CV_REFIT, result, time.perf_counter() - t0, len(cv_data.train)))
        if result.classifier is not None:  # not diverged
            proba = classify.predict_proba(result.classifier, cv_data.test.x, rt, cv_cfg.train)
            if args.ensemble == "refits":
                rows.append(_ensemble_row(cv_cfg, cv_data, rows[-1], result.classifier, rt))
    if "r" in args.protocols:
        random_cfg = cv_cfg.replace({"train.pretrain_epochs": 0, "train.pretrain_steps": 0})
        t0 = time.perf_counter()
        result = pipeline.run_trial(random_cfg, cv_data, _quiet, rt=rt)
        rows.append(_trial_row(RANDOM, result, time.perf_counter() - t0, len(cv_data.train)))
    return rows, split_data, cv_data, proba


def seed_ensembles(runs: dict[tuple[str, int], dict[str, Any]], seeds: int
                   ) -> list[dict[str, Any]]:
    """``--ensemble seeds``: per dataset and seed s, the softmax average of (b)'s refit models
    of seeds s .. s + ENSEMBLE_SIZE - 1 (mod ``seeds``), tested once; every member must exist."""
    import numpy as np


    out = []
    for (dataset, seed), run in runs.items():
        members = [runs.get((dataset, (seed + i) % seeds)) for i in range(ENSEMBLE_SIZE)]
        if seeds < ENSEMBLE_SIZE or any(m is None or m.get("cv_proba") is None for m in members):
            continue
        y = np.asarray(run["test_y"])
        probas = [np.asarray(m["cv_proba"]) for m in members]
        cv = next(r for r in run["rows"] if r["protocol"] == CV_REFIT)
        out.append({"dataset": dataset, "seed": seed, **cv,
                    **_ensemble_scores(probas, y, probas[0].shape[1]),
                    "time_s": sum(next(r for r in m["rows"] if r["protocol"] == CV_REFIT)
                                  ["time_s"] for m in members)})
    return out


def minirocket_rows(split_data: Any, cv_data: Any, seed: int, threads: int, *,
                    warm_up: bool) -> list[dict[str, Any]]:
    """MiniRocket on all of train (the CV protocol's data) and on (a)'s train split."""
    rows = []
    for protocol, data in ((MR_ALL, cv_data), (MR_SPLIT, split_data)):
        r = minirocket_seed(data, seed, "train", threads, warm_up=warm_up)
        warm_up = False
        rows.append({"protocol": protocol, "method": "MiniRocket", "status": "completed",
                     "test_accuracy": r["test_accuracy"], "test_f1": r["test_f1"],
                     "estimate": math.nan, "estimate_se": math.nan, "stage": "", "epoch": 0,
                     "n_models": 1, "members": "", "n_train": len(data.train),
                     "time_s": r["time_s"]})
    return rows


# ---- the table -----------------------------------------------------------------------------------


def summarise(df: Any) -> list[dict[str, Any]]:
    """Per dataset and protocol: test accuracy and F1 mean ± sample std over seeds, in %."""
    out = []
    for (dataset, protocol), g in df.groupby(["dataset", "protocol"], sort=False):
        mean, std = mean_std(list(g["test_accuracy"]))
        f1_mean, f1_std = mean_std(list(g["test_f1"]))
        est = g["estimate"].dropna()
        se = g["estimate_se"].dropna()
        estimate = "-" if not len(est) else (
            f"{100 * est.mean():.2f}" + (f" (s.e. {100 * se.mean():.2f})" if len(se) else ""))
        members = [float(a) for s in g["members"] for a in str(s).split()]
        chosen = g["stage"][g["stage"] != ""]
        lo, hi = g["epoch"].min(), g["epoch"].max()
        selected = (", ".join(f"{s} {n}" for s, n in chosen.value_counts().items())
                    + f"; epochs {lo}" + (f"-{hi}" if hi != lo else "")) if len(chosen) else "-"
        out.append({"dataset": dataset, "protocol": protocol, "n": len(g), "mean": mean,
                    "std": std, "f1": fmt_ms(f1_mean, f1_std), "estimate": estimate,
                    "models": int(g["n_models"].max()),
                    "members": fmt_ms(*mean_std(members)) if members else "-",
                    "selected": selected, "n_train": int(g["n_train"].iloc[0]),
                    "time_s": float(g["time_s"].mean())})
    return out


def gap_lines(df: Any) -> list[str]:
    """Per dataset: how far each CBD estimate sits above the test accuracy it predicts."""
    lines = []
    for dataset, g in df.groupby("dataset", sort=False):
        parts = []
        for name, protocol in (("CV estimate vs refit test", CV_REFIT),
                               ("validation estimate vs its test", VAL_SPLIT)):
            rows = g[g["protocol"] == protocol]
            if len(rows):
                gap, std = mean_std(list(rows["estimate"] - rows["test_accuracy"]))
                parts.append(f"{name}: mean gap {fmt_ms(gap, std)}")
        lines.append(f"- {dataset} (estimate − test, points, over {g['seed'].nunique()} "
                     f"seed(s)): " + "; ".join(parts))
    return lines


def pretraining_gain_lines(df: Any) -> list[str]:
    """Per dataset: (b) - (r) test accuracy in points, paired by seed; none without (r)."""
    lines = []
    for dataset, g in df.groupby("dataset", sort=False):
        b = g[g["protocol"] == CV_REFIT].set_index("seed")["test_accuracy"]
        r = g[g["protocol"] == RANDOM].set_index("seed")["test_accuracy"]
        seeds = sorted(set(b.index) & set(r.index))
        if seeds:
            gain, std = mean_std([b[s] - r[s] for s in seeds])  # in points
            lines.append(f"- {dataset}: {gain:+.2f} ± {std:.2f} points over {len(seeds)} "
                         f"seed(s) (per seed: "
                         + ", ".join(f"{100 * (b[s] - r[s]):+.2f}" for s in seeds) + ")")
    return ["", "Gain of pretraining, (b) − (r) test accuracy paired by seed:", "", *lines] \
        if lines else []


def write_table(df: Any, out_dir: Path, header: list[str], name: str) -> None:
    lines = [*header, "",
             "| dataset | protocol | test acc % | n | estimate % | test macro-F1 % | models "
             "| members' test acc % | selected (stage seeds; epochs) | train series | time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarise(df):
        lines.append(f"| {r['dataset']} | {r['protocol']} | {fmt_ms(r['mean'], r['std'])} "
                     f"| {r['n']} | {r['estimate']} | {r['f1']} | {r['models']} | {r['members']} "
                     f"| {r['selected']} | {r['n_train']} | {r['time_s']:.1f} |")
    lines += ["", "How optimistic each selection estimate is:", "", *gap_lines(df),
              *pretraining_gain_lines(df)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    df.to_csv(out_dir / f"{name}.csv", index=False)
    start = next(i for i, line in enumerate(lines) if line.startswith("| dataset"))
    print("\n" + "\n".join(lines[start:]))
    print(f"\nwrote {out_dir / f'{name}.md'} and {out_dir / f'{name}.csv'}")


def header(args: argparse.Namespace, argv: list[str], base: Any, cv_folds: int) -> list[str]:
    from cbdtune.runtime import native_bf16, resolve_device

    tc = base.train
    offsets = " and seed + ".join(map(str, ENSEMBLE_SEED_OFFSETS))
    precision = "bf16 autocast" if tc.amp and native_bf16(resolve_device(tc)) else "fp32"
    return [
        "# Model selection: validation split vs CV + refit vs a refit ensemble, and MiniRocket", "",
        *provenance(__file__, argv, packages=("torch", "ray", "aeon")),
        f"- config: preset {args.preset}; {tc.pretrain_epochs} pretraining epochs, "
        + ("classifier ridge (closed form, no epochs)" if tc.classifier == "ridge" else
           f"{tc.classifier_epochs} classifier epochs, classifier {tc.classifier}")
        + f" (epochs scale "
        f"{args.epochs_scale:g}{': REDUCED' if args.epochs_scale != 1 else ''}), "
        f"{args.threads} torch threads, device {tc.device}, precision {precision}"
        + (f", overrides {' '.join(args.set)}" if args.set else ""),
        f"- seeds 0..{args.seeds - 1} (`train.seed`, the carved validation split, the folds); "
        "test accuracy mean ± sample std (ddof 1) over seeds, in %",
        f"- (a) `data.cv_folds=0`, validation split {base.data.val_fraction:g} of train; "
        f"estimate = validation accuracy at the selection. (b) `data.cv_folds={cv_folds}`, "
        "estimate = mean CV accuracy (s.e. over folds, averaged over seeds). (c) the softmax "
        + (f"average of (b)'s refit and refits at train.seed = seed + {offsets} (same stage and "
           "epoch count)" if args.ensemble == "refits" else
           f"average of (b)'s refit models of seeds s..s+{ENSEMBLE_SIZE - 1} mod {args.seeds} "
           "(no new training; neighbouring ensembles share members)")
        + "; members' test acc = each member alone, over members and seeds"
        + ("; (r) = (b) with `train.pretrain_epochs=0` (same seed, initialisation, folds)"
           if "r" in args.protocols else "")
        + (f"; protocols run: {', '.join(f'({c})' for c in args.protocols)}"
           if args.protocols != "abc" else ""),
        f"- MiniRocket: aeon `MiniRocketClassifier(random_state=seed, n_jobs={args.threads})`, "
        "time = fit + predict after one untimed warm-up per dataset and process",
        "- time: (a), (b) run_trial's wall time; (c) " + (
            "(b)'s plus its two extra refits" if args.ensemble == "refits"
            else "the sum of its members' (b) times")
        + ("; encoders were stored in and reused from a cache (`--encoder-cache`): a trial "
           "that found its encoder there did not pretrain" if args.encoder_cache else ""),
    ]


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--preset", default="paper", help="config preset (default paper)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.classifier=both (repeatable); "
                        "data.cv_folds sets (b)'s k")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply pretraining and classifier epochs (budget cut; stated)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads for CBD and MiniRocket's n_jobs (default 2)")
    p.add_argument("--no-minirocket", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke preset, gesture, 1 seed; writes to a temp dir")
    p.add_argument("--out-dir", default=None, help="default results/ (a temp dir with --quick)")
    p.add_argument("--name", default="selection",
                   help="file names in --out-dir: NAME.md, NAME.csv, NAME_runs/")
    p.add_argument("--protocols", default="abc",
                   help="which of (a), (b), (c), (r) (random encoder: (b) without "
                        "pretraining) to run, e.g. 'b' or 'br' (default abc)")
    p.add_argument("--ensemble", choices=("refits", "seeds"), default="refits",
                   help="(c) from two fresh refits per seed (default) or from (b)'s refits of "
                        "neighbouring seeds (no extra training; needs --seeds >= 3)")
    p.add_argument("--encoder-cache", default=None, metavar="DIR",
                   help="store pretrained encoders in DIR and reuse those stored there (runs "
                        "that differ only in the classifier then pretrain once; times drop)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.epochs_scale <= 0 or args.threads < 1:
        p.error("--seeds and --threads must be >= 1 and --epochs-scale > 0")
    if not set(args.protocols) <= set("abcr") or not args.protocols:
        p.error(f"--protocols takes letters from 'abcr', but got {args.protocols!r}")
    if "c" in args.protocols and "b" not in args.protocols:
        p.error("--protocols: (c) ensembles (b)'s refits; add b")
    if "c" not in args.protocols:
        args.ensemble = "none"
    if args.quick:
        args.preset, args.datasets, args.seeds = "smoke", ["gesture"], 1
    if args.ensemble == "seeds" and args.seeds < ENSEMBLE_SIZE:
        p.error(f"--ensemble seeds needs --seeds >= {ENSEMBLE_SIZE}")
    return p, args


def base_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Any, int]:
    """The preset with the budget cut and overrides; (b)'s fold count."""
    from cbdtune.config import parse_overrides, preset

    base = preset(args.preset)
    tc = base.train
    base = base.replace({
        "train.pretrain_epochs": max(1, round(tc.pretrain_epochs * args.epochs_scale)),
        "train.classifier_epochs": max(1, round(tc.classifier_epochs * args.epochs_scale)),
        "train.num_threads": args.threads, **parse_overrides(args.set)})
    if base.data.cv_folds == 0:
        p.error("data.cv_folds=0 leaves protocol (b) nothing to cross-validate; give k >= 2")
    return base, base.data.cv_folds


def one_cell(base: Any, cv_folds: int, args: argparse.Namespace, warmed: set[str]
             ) -> Callable[[str, int], dict[str, Any]]:
    """``run_one`` for :func:`run_cells`: CBD's protocols, then MiniRocket's (warmed up once per
    dataset and process), printed as they come; with the refit ensemble's members' test
    probabilities when (c) runs."""

    def run_one(dataset: str, seed: int) -> dict[str, Any]:
        cfg = base.replace({"data.dataset": dataset, "train.seed": seed})
        found, split_data, cv_data, proba = cbd_seed(cfg, seed, cv_folds, args)
        if not args.no_minirocket:
            found += minirocket_rows(split_data, cv_data, seed, args.threads,
                                     warm_up=dataset not in warmed)
            warmed.add(dataset)
        for r in found:
            print(f"{dataset:26s} seed {seed}  {r['protocol']:58s} test "
                  f"{r['test_accuracy']:.4f}  ({r['time_s']:.1f} s)", flush=True)
        extra = {} if proba is None else {"cv_proba": proba.round(6).tolist(),
                                          "test_y": cv_data.test.y.tolist()}
        return {"rows": found, **extra}

    return run_one


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p, args = parse_args(argv)
    import pandas as pd

    args.no_minirocket = args.no_minirocket or not has_aeon()
    base, cv_folds = base_config(p, args)
    out_dir, runs_dir = folders(args.out_dir, args.quick, args.name)
    settings = {"preset": args.preset, "epochs_scale": args.epochs_scale,
                "protocols": args.protocols, "ensemble": args.ensemble,
                "threads": args.threads, "set": sorted(args.set), "cv_folds": cv_folds,
                "ensemble_seed_offsets": list(ENSEMBLE_SEED_OFFSETS),
                "minirocket": not args.no_minirocket,
                **({"encoder_cache": True} if args.encoder_cache else {})}
    # seed-major, so that a run stopped early still leaves every dataset with some seeds
    tasks = [(d, s) for s in range(args.seeds) for d in args.datasets]
    run_cells(tasks, runs_dir, one_cell(base, cv_folds, args, warmed=set()), settings)
    runs = finished(tasks, runs_dir, settings)
    rows = [{"dataset": d, "seed": s, **r} for (d, s), run in runs.items() for r in run["rows"]]
    if args.ensemble == "seeds":
        rows += seed_ensembles(runs, args.seeds)
    if not rows:
        return nothing_to_table(runs_dir)
    first = ["dataset", "seed", "protocol", "test_accuracy", "test_f1", "estimate",
             "estimate_se", "stage", "epoch", "n_models", "members"]
    df = pd.DataFrame(rows)
    df = df[first + [c for c in df.columns if c not in first]]
    order = [VAL_SPLIT, CV_REFIT, ENSEMBLE, RANDOM, MR_ALL, MR_SPLIT]
    df["protocol"] = pd.Categorical(df["protocol"], order, ordered=True)
    df = df.sort_values(["protocol", "seed"], kind="stable").sort_values(
        "dataset", key=lambda d: d.map(args.datasets.index), kind="stable")
    df["protocol"] = df["protocol"].astype(str)
    write_table(df, out_dir, header(args, argv, base, cv_folds), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
