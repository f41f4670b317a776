"""What one trial costs end to end on a dataset, at one or more pretraining budgets: wall time,
peak memory, and its CV and test accuracy (one ``python -m cbdtune.train`` process each).

    python benchmarks/trial_cost.py --dataset PenDigits \
        --budget capped= --budget uncapped=train.pretrain_max_steps=0 --name pendigits

A budget is ``name=key=value[,key=value...]`` on top of ``--preset`` (an empty list: the preset
as it is). Each trial runs in its own process with one torch thread, in-process (no Ray), with no
MLflow; the budgets run one after another. Writes ``results/<name>.md``; ``--quick`` pretrains
one epoch per budget and writes to a temporary folder (checks that the script runs).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"^(status|val_accuracy|test_accuracy|selected_stage|selected_epoch)\s+(\S+)$")
PRETRAIN = re.compile(r"pretrain: epoch (\d+)/(\d+) .*\(([\d.]+) s\)")
STAGE = re.compile(r"ridge readout \((\d+) series\): fold (\d+)/(\d+)\s+\(([\d.]+) s\)")


def run(dataset: str, preset: str, overrides: list[str], data_dir: str | None) -> dict[str, Any]:
    """One trial in a child process: its final lines, progress times, wall time and peak RSS."""
    cmd = [sys.executable, "-m", "cbdtune.train", "--dataset", dataset, "--preset", preset,
           "--in-process", "--no-mlflow", "--set", "train.num_threads=1"]
    cmd += [a for o in overrides for a in ("--set", o)]
    cmd += ["--data-dir", data_dir] if data_dir else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    row: dict[str, Any] = {"pretrain_s": 0.0, "stage_s": 0.0}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        print(line, flush=True)
        if m := FINAL.match(line):
            row[m.group(1)] = m.group(2)
        elif m := PRETRAIN.search(line):
            row["epochs"], row["pretrain_s"] = int(m.group(2)), float(m.group(3))
        elif (m := STAGE.search(line)) and m.group(2) == m.group(3):
            row["n_stage"], row["stage_s"] = int(m.group(1)), float(m.group(4))
    _, status, usage = os.wait4(proc.pid, 0)
    row["wall_s"] = time.perf_counter() - t0
    row["peak_gib"] = usage.ru_maxrss / 2**20  # kB on Linux
    if os.waitstatus_to_exitcode(status) != 0:
        row["status"] = f"exit {os.waitstatus_to_exitcode(status)}"
    return row


def write(rows: list[tuple[str, list[str], dict[str, Any]]], args: argparse.Namespace,
          argv: list[str], load_start: str) -> Path:
    lines = [
        f"# One {args.preset}-preset trial on {args.dataset}, end to end, per pretraining budget",
        "", *provenance(__file__, argv, load_start=load_start),
        "- one torch thread per trial, trials one after another",
        "- CV + refit as `python -m cbdtune.train` runs it (seed 0); pretraining s and the ridge "
        "stage's s (its folds on every training series) from the trial's progress lines", "",
        "| budget | overrides | pretraining epochs | pretraining s | ridge stage s | trial wall s "
        "| peak RSS GiB | status | CV acc % | test acc % |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, overrides, r in rows:
        pct = [f"{100 * float(r[k]):.2f}" if k in r else "-"
               for k in ("val_accuracy", "test_accuracy")]
        lines.append(f"| {name} | {', '.join(f'`{o}`' for o in overrides) or '(preset)'} | "
                     f"{r.get('epochs', '-')} | {r['pretrain_s']:.0f} | {r['stage_s']:.0f} | "
                     f"{r['wall_s']:.0f} | {r['peak_gib']:.1f} | {r.get('status', '?')} | "
                     + " | ".join(pct) + " |")
    out = args.out
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--preset", default="default")
    p.add_argument("--budget", action="append", required=True,
                   help="name=key=value[,key=value...] (repeatable; empty: the preset)")
    p.add_argument("--data-dir", default=None, help="default: $CBDTUNE_DATA_DIR, else the cache")
    p.add_argument("--name", required=True, help="writes results/<name>.md")
    p.add_argument("--quick", action="store_true",
                   help="one pretraining epoch per budget, written to a temporary folder")
    args = p.parse_args(argv)
    args.out = ROOT / "results" / f"{args.name}.md"
    if args.quick:
        args.out = Path(tempfile.mkdtemp(prefix="trial_cost-")) / f"{args.name}.md"
    load_start = load_average()
    rows = []
    for budget in args.budget:
        name, _, spec = budget.partition("=")
        overrides = [o for o in spec.split(",") if o]
        overrides += ["train.pretrain_epochs=1"] if args.quick else []
        rows.append((name, overrides, run(args.dataset, args.preset, overrides, args.data_dir)))
    print(f"wrote {write(rows, args, argv, load_start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
