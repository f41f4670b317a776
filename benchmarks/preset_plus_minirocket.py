"""Where the search's gain comes from: the preset and MiniRocket combined, with no search.

``benchmarks/search_vs_preset.py`` compares (b), the default search's handed-over model (an
ensemble selected over its trials and the MiniRocket baseline), with (a), the preset alone. This
script asks how much of (b) - (a) the 16 trials earn, and how much the baseline family alone
earns, and what a fixed prior toward the baseline family would do. For each dataset and seed s,
on the folds a search at seed s uses, each model reading the test split once:

(a) the preset: ``search_vs_preset.preset_models`` (CV + refit at seed s, two more refits),
    the softmax average of the 3; the same model as search_vs_preset's (a);
(d) MiniRocket: the search's baseline member (``search_vs_preset.minirocket_member``);
(e) (a) and (d) combined by the search's own rule: ``cbdtune.ensemble.select`` over the two
    candidates' out-of-fold probabilities (the preset's at seed s, MiniRocket's), as many
    rounds as ``cbdtune.handover.ROUNDS``; its weights blend the two models' test probabilities;
(f) (a) and (d) at equal weights: no look at any data, a fixed prior of one half per family.

The table sets them beside (b) from the cells of ``search_vs_preset.py`` at the same dataset
and seed (``--search-runs``), where there is one.

    python benchmarks/preset_plus_minirocket.py              # 5 datasets x 3 seeds
    python benchmarks/preset_plus_minirocket.py --quick    # smoke space, gesture, seed 0

Cells land in ``<out-dir>/preset_plus_minirocket_runs/<dataset>_seed<s>.json``
(``benchmarks/_cells.py``: a rerun skips finished cells); every process ends by writing
``<out-dir>/preset_plus_minirocket.md`` and ``.csv`` from the cells finished with its settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import search_vs_preset as svp  # benchmarks/ is on sys.path when a script runs
from _cells import finished, fmt_ms, folders, mean_std, nothing_to_table, run_cells
from _machine import provenance

ROOT = Path(__file__).resolve().parents[1]
NAME = "preset_plus_minirocket"
SEARCH_RUNS = [ROOT / "results" / f"{svp.NAME}_runs",  # search_vs_preset's cells
               ROOT / "results" / f"{svp.NAME}_pendigits" / f"{svp.NAME}_runs"]
COLUMNS = {"a": "(a) preset", "d": "(d) MiniRocket", "e": "(e) a + d, selected on OOF",
           "f": "(f) a + d, equal weights", "b": "(b) search"}


def one_cell(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from cbdtune import ensemble
    from cbdtune.handover import ROUNDS

    a = svp.preset_models(dataset, seed, args)
    d = svp.minirocket_member(dataset, seed, args)
    data = a["data"]
    if a["probas"] is None:
        return {"status": a["result"].status}
    a_oof = a["result"].selected.oof_proba.detach().cpu().numpy().astype(np.float64)
    if not np.array_equal(d["data"].train.y, data.train.y) or len(a_oof) != len(data.train.y):
        raise SystemExit(f"{dataset} seed {seed}: the preset's and MiniRocket's training series "
                         "differ; the out-of-fold probabilities cannot be compared")
    sel = ensemble.select({"preset": a_oof, "minirocket": d["oof"].proba}, data.train.y,
                          rounds=ROUNDS)
    test = {"preset": np.mean(a["probas"], axis=0),
            "minirocket": d["member"].predict_proba(data.test.x)}

    def accuracy(weights: dict[str, float]) -> float:
        return float(np.mean(ensemble.blend(weights, test).argmax(1) == data.test.y))

    return {"status": "completed", "a_test": accuracy({"preset": 1.0}),
            "d_test": accuracy({"minirocket": 1.0}), "e_test": accuracy(sel.weights),
            "f_test": accuracy({"preset": 0.5, "minirocket": 0.5}),
            "e_weight_minirocket": sel.weights.get("minirocket", 0.0),
            "a_oof": ensemble.accuracy(a_oof, data.train.y),
            "d_oof": ensemble.accuracy(d["oof"].proba, data.train.y), "e_oof": sel.accuracy,
            "time_s": a["time_s"] + d["time_s"]}


def with_search(runs: dict[tuple[str, int], dict[str, Any]],
                search_runs: list[Path]) -> list[dict[str, Any]]:
    """Each cell with (b)'s test accuracy at its dataset and seed from the first of
    ``search_runs`` (search_vs_preset's cell folders) that has it; None where none has."""
    rows = []
    for (dataset, seed), run in runs.items():
        paths = [f / f"{dataset}_seed{seed}.json" for f in search_runs]
        found = [json.loads(p.read_text()) for p in paths if p.exists()]
        b = found[0].get("b_test") if found else None
        rows.append({"dataset": dataset, "seed": seed,
                     **{k: v for k, v in run.items() if k != "settings"}, "b_test": b})
    return rows


def table(rows: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    lines = ["| dataset | seeds | " + " | ".join(COLUMNS.values())
             + " | (e) - (a) | (f) - (a) | (b) - (e) | MiniRocket weight in (e) |",
             "|---" * (len(COLUMNS) + 6) + "|"]
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds and r["status"] == "completed"]
        if not mine:
            continue
        cells = [fmt_ms(*mean_std([r[f"{k}_test"] for r in mine]))
                 if all(r[f"{k}_test"] is not None for r in mine) else "" for k in COLUMNS]
        diffs = [_diff(mine, "e", "a"), _diff(mine, "f", "a"), _diff(mine, "b", "e")]
        weight = sum(r["e_weight_minirocket"] for r in mine) / len(mine)
        lines.append(f"| {ds} | {len(mine)} | " + " | ".join(cells) + " | "
                     + " | ".join(diffs) + f" | {weight:.2f} |")
    return lines


def _diff(rows: list[dict[str, Any]], x: str, y: str) -> str:
    """Mean over seeds of x - y in points, paired by seed, with its sample std."""
    if any(r[f"{x}_test"] is None or r[f"{y}_test"] is None for r in rows):
        return ""
    mean, std = mean_std([r[f"{x}_test"] - r[f"{y}_test"] for r in rows])
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if std == std else "")


def write(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str]) -> None:
    import pandas as pd

    header = [
        "# The preset and MiniRocket combined, without a search", "",
        *provenance(__file__, argv, packages=("torch", "aeon")),
        f"- (a): the base config of {args.space}, {svp.REFIT_SEEDS} refit seeds; (d): "
        "the search's MiniRocket member; (b): the search's handed-over model from "
        + ", ".join(f"`{_relative(f)}`" for f in args.search_runs),
        "- test accuracy in %, mean ± sample std (ddof 1) over seeds; differences paired by "
        "seed; each model reads the test split once", "",
    ]
    lines = header + table(rows, args.datasets)
    (args.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    pd.DataFrame(rows).to_csv(args.out_dir / f"{NAME}.csv", index=False)
    print("\n".join(lines[len(header):]))
    print(f"\nwrote {args.out_dir / f'{NAME}.md'} and {args.out_dir / f'{NAME}.csv'}")


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(svp.DATASETS), help="comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated")
    p.add_argument("--space", default="default",
                   help="whose base config is (a) and whose folds all fit on (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="default: $CBDTUNE_DATA_DIR, then the cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads for (a)")
    p.add_argument("--out-dir", type=Path, default=None, help="default results/")
    p.add_argument("--quick", action="store_true",
                   help="the smoke space, gesture, seed 0, in a temporary folder: minutes")
    p.add_argument("--search-runs", type=Path, nargs="+", default=SEARCH_RUNS,
                   help="search_vs_preset's cell folders, for (b) (default: its two in results/)")
    args = p.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        args.datasets, args.seeds, args.space = ["gesture"], [0], "smoke"
    args.preset_space = args.space  # (a) and (d) on the same folds
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out_dir, runs = folders(args.out_dir, args.quick, NAME)
    cells = [(d, s) for d in args.datasets for s in args.seeds]
    settings = {"space": args.space, "refit_seeds": svp.REFIT_SEEDS, "threads": args.threads}
    run_cells(cells, runs, lambda d, s: one_cell(d, s, args), settings)
    done = finished(cells, runs, settings)
    if not done:
        return nothing_to_table(runs)
    write(with_search(done, args.search_runs), args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
