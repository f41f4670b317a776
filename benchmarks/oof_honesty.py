"""How optimistic are the out-of-fold (OOF) predictions the ensemble selection reads, and does
it change what the selection hands over? (issue 21, item 3)

A search stores each completed trial's OOF class probabilities at the point its readout selected
on the same folds (the ridge path's best of 84 points; MiniRocket's best of its alphas): every
fold's predictions helped choose the point they are read at, so they flatter the model, and the
more points, the more. Here, for each dataset and seed, one CBD model (the default space's base
config, CV at that seed, as (a) of search_vs_preset.py) and the MiniRocket baseline on the same
folds, each with its OOF probabilities two ways:

- selected: every fold at the point chosen on all folds (what a search stores);
- cross-selected: fold f at the point the *other* folds choose (a one-level nested CV: no
  fold's predictions chose their own point).

Then, from each kind, the ensemble selection over {CBD, MiniRocket} (cbdtune.ensemble.select,
the search's rounds), its weights, and the test accuracy of the blend of the two refits (each
refit at its all-folds point, as the search refits). The test split is read once per model.

    python benchmarks/oof_honesty.py --datasets gesture ArticularyWordRecognition --seeds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _cells import cell_path, claimed, fmt_ms, mean_std, write_done
from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
NAME = "oof_honesty"
KINDS = ("selected", "cross")


def best_point(accuracy: np.ndarray, loss: np.ndarray) -> int:
    """The path point of the best mean accuracy ((P,) arrays), ties to the lower mean loss, then
    the first point (the readout's own rule)."""
    return int(np.lexsort((np.arange(len(accuracy)), loss, -accuracy))[0])


def cross_selected(accuracy: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """For each fold f of a path scored per fold and point ((F, P) arrays), the point the other
    folds select (:func:`best_point` over their means); a single fold keeps its own."""
    n_folds = accuracy.shape[0]
    if n_folds < 2:
        return np.full(n_folds, best_point(accuracy[0], loss[0]))
    rest = [np.arange(n_folds) != f for f in range(n_folds)]
    return np.array([best_point(accuracy[r].mean(0), loss[r].mean(0)) for r in rest])


def oof_both(outputs: list[np.ndarray], folds: list[Any], y: np.ndarray,
             n_classes: int) -> tuple[dict[str, np.ndarray], int]:
    """Selected and cross-selected OOF scores (N, K) from each fold's path outputs (P, N_f, K),
    and the all-folds point."""
    from cbdtune import ridge

    scores = [[ridge.point_scores(out[p], y[va], n_classes) for p in range(len(out))]
              for out, (_, va) in zip(outputs, folds, strict=True)]
    acc = np.array([[s["accuracy"] for s in row] for row in scores])
    loss = np.array([[s["loss"] for s in row] for row in scores])
    best = best_point(acc.mean(0), loss.mean(0))
    picks = {"selected": np.full(len(folds), best), "cross": cross_selected(acc, loss)}
    oof = {}
    for kind, points in picks.items():
        z = np.zeros((len(y), n_classes))
        for out, (_, va), p in zip(outputs, folds, points, strict=True):
            z[va] = out[p]
        oof[kind] = z
    return oof, best


def cbd_model(cfg: Any, data: Any, pool: Any) -> dict[str, Any]:
    """One pretraining, the ridge path on the folds, the refit at the all-folds point."""
    import torch

    from cbdtune import pipeline, ridge, runtime
    from cbdtune.stages.ridge import Ridge

    rt = runtime.Runtime()
    cfg, model = pipeline.build_for(data, cfg)
    pipeline.pretrain(model, data, cfg, rt, lambda *a: None, probes=False)
    stage = Ridge()
    clf = stage.classifier(model, cfg, rt)
    head = clf.head
    z = ridge.encode(clf, pool.x, rt, cfg.train)
    outputs = [ridge.path_outputs(head, z, pool.y, tr, va, data.n_classes)
               for tr, va in pool.folds]
    oof, best = oof_both(outputs, pool.folds, pool.y, data.n_classes)
    ridge.fit(head, z, pool.y, best, data.n_classes)
    clf.eval()
    with torch.no_grad():  # temperature 1: raw scores
        test = clf(torch.as_tensor(data.test.x, dtype=torch.float32)).double().numpy()
    return {"oof": oof, "test": test}


def minirocket_model(data: Any, pool: Any, seed: int) -> dict[str, Any]:
    """MiniRocket + ridge at every alpha on the same folds; the refit at the all-folds alpha."""
    from cbdtune import baselines as bl
    from cbdtune.handover import n_kernels_for

    y, k = pool.y, data.n_classes
    n_kernels = n_kernels_for(len(y))
    outputs = bl.path_outputs(data.train.x, y, pool.folds, k, seed=seed, n_kernels=n_kernels)
    oof, best = oof_both(outputs, pool.folds, y, k)
    member = bl.refit(data.train.x, y, k, alpha=bl.ALPHAS[best], temperature=1.0, seed=seed,
                      n_kernels=n_kernels)
    return {"oof": oof, "test": member.scores(data.test.x)}


def _proba(scores: np.ndarray, temperature: float) -> np.ndarray:
    from cbdtune.baselines import softmax

    return softmax(scores / temperature)


def cell(dataset: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from cbdtune import classify, ensemble
    from cbdtune.data import load_dataset
    from cbdtune.handover import ROUNDS
    from cbdtune.space import load_space

    cfg = load_space(args.space).base.replace(
        {"data.dataset": dataset, "data.data_dir": args.data_dir or None, "train.seed": seed,
         "train.num_threads": args.threads}, where="benchmark")
    if args.quick:
        cfg = cfg.replace({"train.pretrain_epochs": 2, "model.encoder_layers": 1})
    data = load_dataset(cfg.data, seed=seed)
    pool = classify.selection_pool(data, cfg)
    t0 = time.perf_counter()
    models = {"cbd": cbd_model(cfg, data, pool), "minirocket": minirocket_model(data, pool, seed)}
    row: dict[str, Any] = {"dataset": dataset, "seed": seed, "time_s": 0.0}
    y_test = data.test.y
    for name, m in models.items():
        row[f"{name}_test"] = float(np.mean(m["test"].argmax(1) == y_test))
        for kind in KINDS:
            row[f"{name}_{kind}_oof"] = float(np.mean(m["oof"][kind].argmax(1) == pool.y))
    for kind in KINDS:
        # each model's temperature fitted on this kind of OOF scores, as the search calibrates
        temps = {n: classify.fit_temperature(m["oof"][kind], pool.y) for n, m in models.items()}
        chosen = ensemble.select({n: _proba(m["oof"][kind], temps[n]) for n, m in models.items()},
                                 pool.y, rounds=ROUNDS)
        test = ensemble.blend(chosen.weights, {n: _proba(m["test"], temps[n])
                                               for n, m in models.items()})
        row[f"{kind}_weight_minirocket"] = chosen.weights.get("minirocket", 0.0)
        row[f"{kind}_ensemble_oof"] = chosen.accuracy
        row[f"{kind}_ensemble_test"] = float(np.mean(test.argmax(1) == y_test))
    row["time_s"] = time.perf_counter() - t0
    return row


COLUMNS = [("cbd_selected_oof", "CBD OOF, selected"), ("cbd_cross_oof", "CBD OOF, cross"),
           ("cbd_test", "CBD test"), ("minirocket_selected_oof", "MiniRocket OOF, selected"),
           ("minirocket_cross_oof", "MiniRocket OOF, cross"), ("minirocket_test", "MiniRocket test"),
           ("selected_ensemble_test", "ensemble test, from selected OOF"),
           ("cross_ensemble_test", "ensemble test, from cross OOF")]


def table(rows: list[dict[str, Any]], datasets: list[str]) -> list[str]:
    lines = ["| dataset | seeds | " + " | ".join(c for _, c in COLUMNS)
             + " | MiniRocket weight: selected / cross | cross − selected ensemble, points |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for ds in datasets:
        mine = [r for r in rows if r["dataset"] == ds]
        if not mine:
            continue
        cells = [fmt_ms(*mean_std([r[k] for r in mine])) for k, _ in COLUMNS]
        w = [np.mean([r[f"{k}_weight_minirocket"] for r in mine]) for k in KINDS]
        diff = mean_std([r["cross_ensemble_test"] - r["selected_ensemble_test"] for r in mine])
        lines.append(f"| {ds} | {len(mine)} | " + " | ".join(cells)
                     + f" | {w[0]:.2f} / {w[1]:.2f} | {fmt_ms(*diff)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["gesture", "ArticularyWordRecognition",
                                                     "FingerMovements", "JapaneseVowels"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--space", default="default", help="whose base config the CBD model is")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="default: $CBDTUNE_DATA_DIR, then the cache")
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    p.add_argument("--quick", action="store_true", help="a tiny encoder, gesture, 1 seed")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds = ["gesture"], 1
    runs = args.out_dir / f"{NAME}_runs"
    runs.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    for dataset in args.datasets:
        for seed in range(args.seeds):
            done = cell_path(runs, dataset, seed)
            with claimed(done) as mine:
                if mine:
                    write_done(done, cell(dataset, seed, args))
                    print(f"{dataset} seed {seed} done -> {done.name}", flush=True)
    rows = [json.loads(f.read_text()) for f in sorted(runs.glob("*_seed*.json"))]
    rows = [r for r in rows if r["dataset"] in args.datasets and r["seed"] < args.seeds]
    write(rows, args, argv, load_start)
    return 0


def write(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str],
          load_start: str) -> None:
    header = [
        "# Out-of-fold predictions for the ensemble selection: selected vs cross-selected", "",
        *provenance(__file__, argv, load_start=load_start),
        f"- CBD: the base config of space {args.space} (ridge readout), one model per seed; "
        "MiniRocket: the search's baseline (same folds, kernels by size); accuracies in %, "
        "mean ± sample std over seeds", "",
    ]
    lines = header + table(rows, args.datasets)
    (args.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
