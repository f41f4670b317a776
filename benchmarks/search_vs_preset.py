"""Does the search earn its time? The default preset without a search against the default search's
handed-over model, its CBD-only selection, and MiniRocket (issue 21, item 7).

For each dataset and search seed s, four test accuracies, each read once:

(a) preset, no search: the default preset (``search_spaces/default.yaml``'s base) as one trial
    (``cbdtune.pipeline.run_trial``, 5-fold CV + refit at seed s, its temperature) and two more
    refits at seeds s + 1 and s + 2 (``refit_trial``, same stage, epoch count, temperature):
    the softmax average of the 3, the model a search of 1 trial with ``--refit-seeds 3`` hands
    over;
(b) the search: ``run_search`` of ``--num-samples`` trials (16) of ``--space`` (default) at
    ``--seed s``, ``--ensemble select``, ``--refit-seeds 3``: the registered model's test
    accuracy (``refit.score_saved_model``, what ``cbdtune.predict`` reads);
(c) the same search, its selection restricted to CBD trials (from the same refits);
(d) MiniRocket: the baseline member alone (``cbdtune.baselines``: aeon's MiniRocket transform,
    ``handover.n_kernels_for(N)`` kernels, ridge with alpha chosen on the 5 folds of seed s,
    refit on every training series).

Plus the search's wall time (run_search end to end: trials, refits, registration) and its
trials completed, and (a)'s wall time.

    python benchmarks/search_vs_preset.py                       # 5 datasets x 3 seeds, 16 trials
    python benchmarks/search_vs_preset.py --datasets gesture --seeds 0 --space smoke \
        --num-samples 2 --out-dir /tmp/svp                       # a smoke: minutes
    python benchmarks/search_vs_preset.py --datasets PenDigits --time-budget 60m
                                                # a dataset whose trials are slow, at a budget

Each (dataset, seed) cell lands in ``<out-dir>/search_vs_preset_runs/<dataset>_seed<s>.json``
when it finishes; a rerun skips finished cells (and cells another live process claimed), and
every process ends by writing ``<out-dir>/search_vs_preset.md`` and ``.csv`` from the finished
cells run with the same settings. The searches' own folders (Ray storage, MLflow, results) go
under ``<out-dir>/search_vs_preset_runs/work/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from _cells import cell_path, claimed, fmt_ms, mean_std, write_done
from _machine import provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("gesture", "ArticularyWordRecognition", "FingerMovements", "JapaneseVowels",
            "PenDigits")
REFIT_SEEDS = 3
COLUMNS = {"a": "(a) preset, 3-seed refit ensemble", "b": "(b) search, handed-over model",
           "c": "(c) search, CBD-only selection", "d": "(d) MiniRocket"}
NAME = "search_vs_preset"


# ---- one cell ----------------------------------------------------------------------------------


def _quiet(_metrics: dict[str, Any], _payload: dict[str, Any] | None) -> None:
    """run_trial's reporter here: the final metrics come back in its result."""


def preset_models(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """(a)'s models: the space's base config (the preset), CV + refit at ``seed``, and two more
    refits. Returns ``data``, the trial's ``result``, each refit's test ``probas`` (None when
    the trial did not complete) and ``time_s``."""
    from cbdtune import classify, pipeline, runtime
    from cbdtune.data import load_dataset
    from cbdtune.space import load_space

    cfg = load_space(args.preset_space).base.replace(
        {"data.dataset": dataset, "data.data_dir": args.data_dir or None, "train.seed": seed,
         "train.num_threads": args.threads}, where="benchmark")
    data = load_dataset(cfg.data, seed=seed)
    rt = runtime.Runtime(device=runtime.resolve_device(cfg.train))
    t0 = time.perf_counter()
    result = pipeline.run_trial(cfg, data, _quiet, rt=rt)
    chosen = result.selected
    if result.classifier is None or chosen is None:
        return {"data": data, "result": result, "probas": None,
                "time_s": time.perf_counter() - t0}
    probas = [classify.predict_proba(result.classifier, data.test.x, rt, cfg.train)]
    for j in range(1, REFIT_SEEDS):
        _m, _clf, proba = pipeline.refit_trial(
            cfg.replace({"train.seed": seed + j}), data, stage=chosen.stage, epochs=chosen.epoch,
            rt=rt, temperature=chosen.temperature)
        probas.append(proba)
    return {"data": data, "result": result, "probas": probas, "time_s": time.perf_counter() - t0}


def preset_ensemble(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """(a): the softmax average of :func:`preset_models`' refits."""
    import numpy as np

    a = preset_models(dataset, seed, args)
    if a["probas"] is None:
        return {"a_test": math.nan, "a_time_s": a["time_s"], "a_status": a["result"].status}
    y = a["data"].test.y
    accuracy = float(np.mean(np.mean(a["probas"], axis=0).argmax(1) == y))
    return {"a_test": accuracy, "a_time_s": a["time_s"], "a_status": "completed",
            "a_cv": a["result"].selected.val.get("accuracy"),
            "a_members": [float(np.mean(p.argmax(1) == y)) for p in a["probas"]]}


def search_cell(dataset: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(b) and (c): one search with ``--ensemble select``; its numbers from the parent run."""
    from mlflow.tracking import MlflowClient

    from cbdtune.search import SearchSettings, run_search

    name = f"{dataset}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    settings = SearchSettings(
        datasets=(dataset,), space=args.space, seed=seed, num_samples=args.num_samples,
        refit_seeds=REFIT_SEEDS, ensemble="select", storage=str(work / "ray"),
        results_dir=str(work / "results"), mlflow_uri=uri, name=name, overwrite=True,
        data_dir=args.data_dir, time_budget=args.time_budget)
    t0 = time.perf_counter()
    result = run_search(settings)
    wall = time.perf_counter() - t0
    metrics = MlflowClient(uri).get_run(result.mlflow_run_id).data.metrics
    trials = result.trials
    completed = int((trials["status"] == "completed").sum()) if "status" in trials else 0
    return {"b_test": metrics.get("ensemble_test_accuracy", math.nan),
            "b_oof": metrics.get("ensemble.full.oof_accuracy", math.nan),
            "c_test": metrics.get("ensemble.cbd_only.test_accuracy", math.nan),
            "c_oof": metrics.get("ensemble.cbd_only.oof_accuracy", math.nan),
            "b_weight_minirocket": metrics.get("ensemble.full.weight.minirocket", 0.0),
            "search_wall_s": wall, "trials": len(trials), "trials_completed": completed,
            "trial_s": float(trials["time_total_s"].mean()) if "time_total_s" in trials
            else math.nan,
            "search_status": result.status}


def minirocket_member(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The baseline member on the folds a search at ``seed`` uses: ``data``, its out-of-fold
    probabilities ``oof`` (:class:`cbdtune.baselines.OutOfFold`), the refit ``member``,
    ``n_kernels`` and ``time_s``."""
    from cbdtune import baselines
    from cbdtune.classify import selection_pool
    from cbdtune.data import load_dataset
    from cbdtune.handover import n_kernels_for
    from cbdtune.space import load_space

    cfg = load_space(args.space).base.replace(
        {"data.dataset": dataset, "data.data_dir": args.data_dir or None, "train.seed": seed},
        where="benchmark")
    data = load_dataset(cfg.data, seed=seed)
    pool = selection_pool(data, cfg)
    n_kernels = n_kernels_for(len(data.train.y))
    t0 = time.perf_counter()
    oof, member = baselines.minirocket_baseline(data.train.x, data.train.y, pool.folds,
                                                data.n_classes, seed=seed, n_kernels=n_kernels)
    return {"data": data, "oof": oof, "member": member, "n_kernels": n_kernels,
            "time_s": time.perf_counter() - t0}


def minirocket_cell(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """(d): the baseline member alone (:func:`minirocket_member`)."""
    import numpy as np

    d = minirocket_member(dataset, seed, args)
    data = d["data"]
    accuracy = float(np.mean(d["member"].predict_proba(data.test.x).argmax(1) == data.test.y))
    return {"d_test": accuracy, "d_time_s": d["time_s"], "d_kernels": d["n_kernels"],
            "n_train": len(data.train.y), "n_test": len(data.test.y)}


def run_cell(dataset: str, seed: int, args: argparse.Namespace, runs: Path) -> None:
    done = cell_path(runs, dataset, seed)
    with claimed(done) as mine:
        if not mine:
            print(f"{dataset} seed {seed}: finished or claimed, skipped", flush=True)
            return
        print(f"{dataset} seed {seed}: running", flush=True)
        row: dict[str, Any] = {"dataset": dataset, "seed": seed, "settings": settings_of(args)}
        row.update(minirocket_cell(dataset, seed, args))
        row.update(preset_ensemble(dataset, seed, args))
        row.update(search_cell(dataset, seed, args, runs / "work" / f"{dataset}_seed{seed}"))
        write_done(done, row)
        print(f"{dataset} seed {seed}: a {row['a_test']:.4f} b {row['b_test']:.4f} "
              f"c {row['c_test']:.4f} d {row['d_test']:.4f}, search {row['search_wall_s']:.0f} s, "
              f"{row['trials_completed']}/{row['trials']} completed", flush=True)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two cells comparable: only cells of equal settings share a table."""
    return {"space": args.space, "preset_space": args.preset_space,
            "num_samples": args.num_samples, "time_budget": args.time_budget,
            "refit_seeds": REFIT_SEEDS}


# ---- the table ---------------------------------------------------------------------------------


def collect(runs: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    want = settings_of(args)
    rows = []
    for path in sorted(runs.glob("*_seed*.json")):
        row = json.loads(path.read_text())
        if (row.get("settings") == want and row["dataset"] in args.datasets
                and row["seed"] in args.seeds):
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    lines = ["| dataset | seeds | " + " | ".join(COLUMNS.values())
             + " | (b) - (a) | search wall s | trials completed | time per trial s | (a) time s "
             "| MiniRocket weight in (b) |", "|---" * (len(COLUMNS) + 8) + "|"]
    diffs = []
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        if not mine:
            continue
        cells = [fmt_ms(*mean_std([r[f"{k}_test"] for r in mine])) for k in COLUMNS]
        diff = 100 * (sum(r["b_test"] - r["a_test"] for r in mine) / len(mine))
        diffs.append(diff)
        lines.append(f"| {ds} | {len(mine)} | " + " | ".join(cells)
                     + f" | {diff:+.2f} | {_mean(mine, 'search_wall_s'):.0f} | "
                     f"{_mean(mine, 'trials_completed'):.1f} / {_mean(mine, 'trials'):.0f} | "
                     f"{_mean(mine, 'trial_s'):.0f} | {_mean(mine, 'a_time_s'):.0f} | "
                     f"{_mean(mine, 'b_weight_minirocket'):.2f} |")
    if diffs:
        lines += ["", f"(b) - (a) averaged over the {len(diffs)} dataset(s): "
                  f"{sum(diffs) / len(diffs):+.2f} points."]
    return lines


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else math.nan


def write(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> None:
    import pandas as pd

    header = [
        "# The search against the preset it starts from (issue 21, item 7)", "",
        *provenance(__file__, argv, packages=("torch", "ray")),
        f"- search: space {args.space}, {args.num_samples} trials, `--ensemble select`, "
        f"`--refit-seeds {REFIT_SEEDS}`" + (f", `--time-budget {args.time_budget}`"
                                             if args.time_budget else "")
        + "; (a): the base config of " + args.preset_space + f", {REFIT_SEEDS} refit seeds",
        "- test accuracy in %, mean ± sample std (ddof 1) over search seeds; each model reads "
        "the test split once", "",
    ]
    lines = header + table(rows, args.datasets)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    flat = [{k: v for k, v in r.items() if k not in ("settings", "a_members")} for r in rows]
    pd.DataFrame(flat).to_csv(args.out_dir / f"{NAME}.csv", index=False)
    print("\n".join(lines[len(header):]))
    print(f"\nwrote {args.out_dir / f'{NAME}.md'} and {args.out_dir / f'{NAME}.csv'}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="search seeds, comma-separated")
    p.add_argument("--num-samples", type=int, default=16, help="trials per search")
    p.add_argument("--space", default="default", help="the searched space (default %(default)s)")
    p.add_argument("--preset-space", default=None,
                   help="whose base config is (a) (default: --space)")
    p.add_argument("--time-budget", help="each search's --time-budget (e.g. 60m)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1, help="torch threads for (a)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    p.add_argument("--table-only", action="store_true",
                   help="run no cell: write the table from the cells already finished")
    args = p.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.preset_space = args.preset_space or args.space
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = args.out_dir / f"{NAME}_runs"
    runs.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets if not args.table_only else []:
        for seed in args.seeds:
            run_cell(dataset, seed, args, runs)
    write(collect(runs, args), args, [a for a in argv if a != "--table-only"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
