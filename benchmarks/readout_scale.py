"""How the ridge readout and its pretraining probes scale in the number of series N.

For each N (a stratified subsample of PenDigits' training split, 2 x 8, 10 classes), the
default preset's model (untrained: the readout's cost does not depend on the weights) encodes
the N series into the readout's columns (default preset: 9 depths x 128 x 9 pooled + 4 levels
= 10,372 columns), then

- path: the readout's whole path (4 blends x 21 alphas) scored on 5 stratified folds, which is
  what one fidelity probe during pretraining and the ridge stage each cost;
- fit: the refit at one path point on all N series;

each timed (wall, one thread) with its peak of traced memory (``tracemalloc``: numpy's and
Python's allocations, not torch's). "before" is ``cbdtune/ridge.py`` at ``--before`` (a thin
SVD of the fold's (n, F) columns per fold and per blend), run for N <= ``--before-max``;
"after" is the working tree's (one eigendecomposition per fold, every blend and alpha from it).
Both produce the same scores (tests/test_ridge.py checks them against scikit-learn).

    python benchmarks/readout_scale.py                      # N = 120, 500, 2000, 7494
    python benchmarks/readout_scale.py --sizes 120,500 --before-max 500

Writes results/readout_scale.md with the command, machine and versions at the top.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import load_average, provenance  # noqa: E402

from cbdtune import classify, pipeline, ridge, runtime  # noqa: E402
from cbdtune.config import DataConfig, preset  # noqa: E402
from cbdtune.data import load_dataset, stratified_folds  # noqa: E402
from cbdtune.runtime import macro_f1  # noqa: E402


def old_ridge(commit: str) -> ModuleType:
    """``cbdtune/ridge.py`` as it was at ``commit``, imported under another name."""
    src = subprocess.run(["git", "show", f"{commit}:cbdtune/ridge.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ridge_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ridge_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured(fn: Callable[[], Any], trace: bool) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and (``trace``) its peak traced memory in MiB, else NaN."""
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
    if trace:
        tracemalloc.stop()
    return out, wall, peak


def timed_and_traced(fn: Callable[[], Any], twice: bool) -> tuple[Any, float, float]:
    """Wall seconds from a plain run and the peak from a traced one (``twice``: tracemalloc
    slows Python-level code), or both from one traced run."""
    if not twice:
        return measured(fn, trace=True)
    out, wall, _ = measured(fn, trace=False)
    return out, wall, measured(fn, trace=True)[2]


def subsample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices of ``y``, stratified (the first fold-assignment-like draw per class)."""
    if n >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    # round-robin over classes keeps the class proportions
    ranks = np.empty(len(y), dtype=np.int64)
    for k in np.unique(y):
        members = order[y[order] == k]
        ranks[members] = np.arange(len(members)) * len(y) // len(members)
    return np.sort(np.argsort(ranks, kind="stable")[:n])


def one_size(n: int, x: np.ndarray, y: np.ndarray, model: Any, cfg: Any, impls: dict[str, Any],
             n_classes: int, twice_max: int) -> list[dict[str, Any]]:
    idx = subsample(y, n)
    xs, ys = x[idx], y[idx]
    rt = runtime.Runtime()
    clf = classify.new_classifier(model, cfg, "ridge", rt)
    z, enc_s, _ = measured(lambda: ridge.encode(clf, xs, rt, cfg.train), trace=False)
    twice = n <= twice_max
    folds = stratified_folds(ys, 5, 0, 1)
    rows = []
    for name, impl in impls.items():
        scores, path_s, path_mib = timed_and_traced(lambda impl=impl: [
            impl.path_scores(clf.head, z, ys, tr, va, n_classes) for tr, va in folds], twice)
        best = max(range(len(scores[0])),
                   key=lambda i: np.mean([f[i]["accuracy"] for f in scores]))
        _, fit_s, fit_mib = timed_and_traced(
            lambda impl=impl, best=best: impl.fit(clf.head, z, ys, best, n_classes), twice)
        rows.append({"n": n, "impl": name, "columns": z.shape[1], "encode_s": enc_s,
                     "path_s": path_s, "path_mib": path_mib, "fit_s": fit_s, "fit_mib": fit_mib,
                     "cv_acc": float(np.mean([f[best]["accuracy"] for f in scores]))})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="120,500,2000,7494")
    p.add_argument("--before", default="c9f485f", help="commit of the 'before' ridge.py")
    p.add_argument("--before-max", type=int, default=500)
    p.add_argument("--twice-max", type=int, default=2000,
                   help="up to this N, time a plain run and trace memory in a second one")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "results" / "readout_scale.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = load_average()
    data = load_dataset(DataConfig(dataset="PenDigits", data_dir=args.data_dir), seed=0)
    cfg = preset("default").replace({"train.pretrain_epochs": 0, "data.dataset": "PenDigits"})
    cfg, model = pipeline.build_for(data, cfg)
    model.eval()
    before = old_ridge(args.before)
    macro_f1(np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), 2)  # imports sklearn once
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        impls = {"after": ridge}
        if n <= args.before_max:
            impls = {"before": before, **impls}
        rows += one_size(n, data.train.x, data.train.y, model, cfg, impls, data.n_classes,
                         args.twice_max)
    write(args, argv if argv is not None else sys.argv[1:], rows, load_start)


def write(args: argparse.Namespace, argv: list[str], rows: list[dict[str, Any]],
          load_start: str) -> None:
    lines = [
        "# The ridge readout as N grows (PenDigits, default preset)", "",
        *provenance(__file__, argv, packages=("torch", "numpy"), load_start=load_start),
        "- one torch thread; numpy's BLAS as installed",
        f"- before: cbdtune/ridge.py at {args.before}; after: this commit's", "",
        "path = the whole path (4 blends x 21 alphas) on 5 folds, the cost of one fidelity "
        "probe or the ridge stage; fit = the refit at the selected point on all N. Peak = "
        "tracemalloc's peak (numpy allocations) during that step. Up to N = "
        f"{args.twice_max} the time is from a plain run and the peak from a second, traced one "
        "(tracing slows Python-level code); above, both come from one traced run.", "",
        "| N | impl | columns | encode s | path s | path peak MiB | fit s | fit peak MiB | "
        "CV acc |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['impl']} | {r['columns']} | {r['encode_s']:.1f} | "
                     f"{r['path_s']:.1f} | {r['path_mib']:.0f} | {r['fit_s']:.1f} | "
                     f"{r['fit_mib']:.0f} | {r['cv_acc']:.4f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
