"""Calibration of the class probabilities before and after the fitted temperature.

For each dataset and seed, one default-preset trial (``cbdtune.pipeline.run_trial``, 5-fold CV,
the ridge readout) at a reduced pretraining budget (``--pretrain-epochs``). Its selected stage
hands back the out-of-fold probabilities at the selected point, before and after the temperature
fitted on them (``StageResult.oof_proba_raw`` / ``oof_proba``); its refit classifier reads the
test split once with its temperature and once with the temperature set back to 1.

Metrics: log-loss (mean negative log-probability of the true class) and expected calibration
error over 15 equal-width bins of the top probability (Guo et al., ICML 2017,
https://arxiv.org/abs/1706.04599): sum over bins of |bin| / N x |accuracy - mean confidence|.
The OOF columns are where the temperature was fitted (in-sample for T); test is held out.

    python benchmarks/calibration.py                       # 4 datasets, seed 0, 10 epochs
    python benchmarks/calibration.py --datasets gesture --seeds 0,1 --pretrain-epochs 5

Writes results/calibration.md with the command, machine and versions at the top.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import load_average, provenance  # noqa: E402

from cbdtune import classify, pipeline, runtime  # noqa: E402
from cbdtune.config import DataConfig, preset  # noqa: E402
from cbdtune.data import load_dataset  # noqa: E402

DATASETS = ("gesture", "ArticularyWordRecognition", "FingerMovements", "JapaneseVowels")


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None))))


def ece(proba: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top probability over ``bins`` equal-width bins."""
    conf, pred = proba.max(axis=1), proba.argmax(axis=1)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(float(np.mean(pred[inside] == y[inside]))
                                         - float(conf[inside].mean()))
    return total


def one_run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = preset("default").replace({
        "data.dataset": name, "data.data_dir": args.data_dir, "train.seed": seed,
        "train.pretrain_epochs": args.pretrain_epochs, "train.probe_every": args.pretrain_epochs,
        "train.num_threads": 1})
    data = load_dataset(DataConfig(dataset=name, data_dir=args.data_dir), seed=seed)
    t0 = time.perf_counter()
    result = pipeline.run_trial(cfg, data, lambda _m, _s: None)
    assert result.status == "completed" and result.selected is not None, result.reason
    assert result.classifier is not None and data.test is not None
    sel, clf = result.selected, result.classifier
    assert sel.oof_proba is not None and sel.oof_proba_raw is not None
    rt, tc = runtime.Runtime(), cfg.train
    after = classify.predict_proba(clf, data.test.x, rt, tc)
    clf.temperature.fill_(1.0)
    before = classify.predict_proba(clf, data.test.x, rt, tc)
    clf.temperature.fill_(sel.temperature)
    ytr, yte = data.train.y, data.test.y
    row = {"dataset": name, "seed": seed, "stage": sel.stage, "temperature": sel.temperature,
           "cv_acc": sel.val["accuracy"], "test_acc": float(np.mean(after.argmax(1) == yte)),
           "wall_s": time.perf_counter() - t0}
    for split, raw, cal, y in (("oof", sel.oof_proba_raw.numpy(), sel.oof_proba.numpy(), ytr),
                               ("test", before, after, yte)):
        row.update({f"{split}_ll_before": log_loss(raw, y), f"{split}_ll_after": log_loss(cal, y),
                    f"{split}_ece_before": ece(raw, y), f"{split}_ece_after": ece(cal, y),
                    f"{split}_conf_before": float(raw.max(1).mean()),
                    f"{split}_conf_after": float(cal.max(1).mean())})
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "results" / "calibration.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_start = load_average()
    rows = [one_run(name, int(seed), args) for name in args.datasets.split(",")
            for seed in args.seeds.split(",")]
    write(args, argv if argv is not None else sys.argv[1:], rows, load_start)


def write(args: argparse.Namespace, argv: list[str], rows: list[dict[str, Any]],
          load_start: str) -> None:
    lines = [
        "# Calibration: the fitted temperature, before and after (default preset)", "",
        *provenance(__file__, argv, packages=("torch", "numpy"), load_start=load_start),
        "- one torch thread",
        f"- budget: default preset with train.pretrain_epochs={args.pretrain_epochs} (the "
        "preset's 100 scaled down), one fidelity probe, 5-fold CV, ridge readout; seeds "
        f"{args.seeds}", "",
        "LL = log-loss, ECE = expected calibration error (15 bins, top label), conf = mean top "
        "probability; before = temperature 1 (softmax of the ridge's +-1 scores), after = the "
        "temperature fitted on the OOF scores (the OOF columns are in-sample for it).", "",
        "| dataset | seed | T | CV acc | test acc | OOF LL before | after | OOF ECE before | "
        "after | test LL before | after | test ECE before | after | test conf before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['temperature']:.3f} | {r['cv_acc']:.4f} | "
            f"{r['test_acc']:.4f} | {r['oof_ll_before']:.3f} | {r['oof_ll_after']:.3f} | "
            f"{r['oof_ece_before']:.3f} | {r['oof_ece_after']:.3f} | "
            f"{r['test_ll_before']:.3f} | {r['test_ll_after']:.3f} | "
            f"{r['test_ece_before']:.3f} | {r['test_ece_after']:.3f} | "
            f"{r['test_conf_before']:.3f} | {r['test_conf_after']:.3f} |")
    lines += ["", "Wall seconds per trial: " + ", ".join(
        f"{r['dataset']} seed {r['seed']} {r['wall_s']:.0f}" for r in rows), ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
