"""Does cross-validation on the training series predict the test split? A model-free check.

A one-nearest-neighbour classifier (Euclidean, on the series as loaded) scored two ways: leave one
out on the training series, and trained on all of them, tested on the test split. When the first
is well above the second, the training series resemble each other more than the test series
resemble them (recorded in sessions, by subject, ...), and every CV estimate of a model that
leans on near neighbours overstates its test accuracy, whatever is selected with it. Seconds per
dataset; no seed (1-NN has none).

    python benchmarks/split_shift.py --datasets gesture ArticularyWordRecognition
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _machine import provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
NAME = "split_shift"
DATASETS = ("gesture", "ArticularyWordRecognition", "FingerMovements", "JapaneseVowels",
            "PenDigits")


def nearest(a: np.ndarray, b: np.ndarray, *, exclude_self: bool = False,
            chunk: int = 512) -> np.ndarray:
    """Index into ``b`` of each row of ``a``'s nearest neighbour (squared Euclidean), in chunks;
    ``exclude_self``: ``a`` is ``b`` and a row may not pick itself."""
    b_sq = (b ** 2).sum(1)
    out = np.empty(len(a), dtype=int)
    for s in range(0, len(a), chunk):
        d = (a[s:s + chunk] ** 2).sum(1)[:, None] - 2 * a[s:s + chunk] @ b.T + b_sq[None, :]
        if exclude_self:
            d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf
        out[s:s + chunk] = d.argmin(1)
    return out


def shift(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
          y_test: np.ndarray) -> dict[str, float]:
    """1-NN accuracy leave-one-out on train and train -> test, in [0, 1]."""
    tr = x_train.reshape(len(x_train), -1).astype(np.float64)
    te = x_test.reshape(len(x_test), -1).astype(np.float64)
    loo = float(np.mean(y_train[nearest(tr, tr, exclude_self=True)] == y_train))
    test = float(np.mean(y_train[nearest(te, tr)] == y_test))
    return {"loo": loo, "test": test}


def main(argv: list[str] | None = None) -> int:
    from cbdtune.config import DataConfig
    from cbdtune.data import load_dataset

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    lines = [
        "# Does CV on the training series predict the test split? 1-NN, leave-one-out vs test",
        "", *provenance(__file__, argv, packages=("numpy",)),
        "- series as loaded (variable lengths brought to the training length, as every model "
        "here reads them); accuracies in %", "",
        "| dataset | train series | test series | 1-NN leave-one-out on train | 1-NN train → test "
        "| difference, points |", "|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        data = load_dataset(DataConfig(dataset=dataset), seed=0)
        r = shift(data.train.x, data.train.y, data.test.x, data.test.y)
        lines.append(f"| {dataset} | {len(data.train.y)} | {len(data.test.y)} | "
                     f"{100 * r['loo']:.2f} | {100 * r['test']:.2f} | "
                     f"{100 * (r['loo'] - r['test']):+.2f} |")
        print(lines[-1], flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
