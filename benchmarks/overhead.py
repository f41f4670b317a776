"""Orchestration overhead: one trial in-process, through a TorchTrainer, and through Tune.

The same trial (same config, seed, dataset split and thread count, so the same work and, on CPU,
the same numbers) runs three ways in one process:

    (a) in-process      ``pipeline.run_trial`` called directly
    (b) TorchTrainer    ``worker.make_trainer(...).fit()``: 1 worker with 1 CPU
    (c) Tune + Train    a 1-trial ``tune.Tuner`` whose function trainable is
                        ``worker.train_driver_fn``, built as ``cbdtune.search`` builds it

(c) calls Tune directly instead of running ``python -m cbdtune.search`` as a subprocess so that
(b) and (c) share one Ray instance and one loaded dataset: c - b is then what Tune itself adds
(the trial actor, TuneReportCallback's result plumbing, experiment checkpoints), not Ray's start,
the search's MLflow bookkeeping or a second dataset read, which a user pays once per search.

``train.num_threads`` is 1 on every path: a Ray worker is given 1 CPU (``cpus_per_worker=1``),
and torch's thread count changes float sums, so any other count would make the work differ.

    python benchmarks/overhead.py                       # paper preset, gesture (~40 min, 2 cores)
    python benchmarks/overhead.py --quick               # smoke preset (~1.5 min)
    python benchmarks/overhead.py --repeats 3

Writes results/overhead.md with the command, machine, versions and date at the top.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import load_average, provenance  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("in-process", "TorchTrainer", "Tune + TorchTrainer")


def header(title: str, argv: list[str], notes: list[str], load_start: str) -> list[str]:
    return [
        f"# {title}", "",
        *provenance(__file__, argv, packages=("torch", "ray"), load_start=load_start),
        *[f"- {n}" for n in notes], "",
    ]


# ---- the three paths -------------------------------------------------------------------------


def in_process(cfg: Any, data: Any) -> dict[str, Any]:
    from cbdtune.pipeline import run_trial

    reports: list[dict[str, Any]] = []
    result = run_trial(cfg, data, lambda m, _state: reports.append(m))
    return {**result.metrics, "reports": len(reports)}


def torch_trainer(cfg: Any, data_ref: Any, storage: str) -> dict[str, Any]:
    from cbdtune.worker import make_trainer

    trainer = make_trainer(cfg, data_ref=data_ref, name="overhead-train", storage_path=storage,
                           workers=1, cpus_per_worker=1.0)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"TorchTrainer run failed: {result.error}")
    out = result.return_value or {}
    return {**out.get("final", {}), "reports": len(out.get("history", []))}


def make_tuner(cfg: Any, data_ref: Any, storage: str, *, name: str, trials: int = 1) -> Any:
    """A ``tune.Tuner`` of ``trials`` trials of ``worker.train_driver_fn`` on ``cfg`` (nothing
    searched: the base config is every trial), one at a time, wired as ``cbdtune.search`` wires
    its trainable."""
    from ray import tune

    from cbdtune.search import DRIVER_MEMORY
    from cbdtune.session import TrialSettings
    from cbdtune.worker import train_driver_fn

    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, data_ref=[data_ref], base=cfg.to_dict()),
        {"cpu": 0, "memory": DRIVER_MEMORY})
    param_space = TrialSettings(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                                max_failures=0, storage_path=f"{storage}/train",
                                encoder_cache=None).param_space()
    return tune.Tuner(trainable, param_space=param_space,
                      tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))


def tune_trainer(cfg: Any, data_ref: Any, storage: str) -> dict[str, Any]:
    """One Tune trial running ``train_driver_fn``, wired as in ``cbdtune.search.run_search``."""
    grid = make_tuner(cfg, data_ref, storage, name="overhead-tune").fit()
    if grid.errors:
        raise RuntimeError(f"Tune trial failed: {grid.errors[0]}")
    last = grid[0].metrics or {}
    return {**last, "reports": int(last.get("training_iteration", 0))}


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", help="config preset (default paper)")
    p.add_argument("--dataset", default="gesture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of each path (median reported)")
    p.add_argument("--quick", action="store_true",
                   help="smoke preset: checks the script works; writes to a temp dir")
    p.add_argument("--out", default=None, help="default results/overhead.md")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="which paths to run (in-process always runs: it is the baseline)")
    args = p.parse_args(argv)
    args.paths = [name for name in PATHS if name in args.paths or name == "in-process"]
    if args.quick:
        args.preset = "smoke"
    if args.out is None:
        folder = Path(tempfile.mkdtemp(prefix="cbdtune-quick-")) if args.quick else ROOT / "results"
        args.out = str(folder / "overhead.md")
    return args


def run_paths(cfg: Any, data: Any, paths: list[str],
              repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Every path ``repeats`` times, interleaved, on one local Ray; each run's metrics with its
    wall time around the call (``outer_s``)."""
    import ray

    from cbdtune.session import connect

    # "local": a fresh Ray of our own; "auto" would join any Ray another process runs here.
    # connect() also sets the 0.25 s Train poll interval (session.TRAIN_POLL_ENV) for the workers.
    connect("local")
    data_ref = ray.put(data)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory(prefix="cbdtune-overhead-") as storage:
        for rep in range(repeats):
            for name in paths:
                t0 = time.perf_counter()
                if name == "in-process":
                    m = in_process(cfg, data)
                elif name == "TorchTrainer":
                    m = torch_trainer(cfg, data_ref, f"{storage}/b{rep}")
                else:
                    m = tune_trainer(cfg, data_ref, f"{storage}/c{rep}")
                m["outer_s"] = time.perf_counter() - t0
                runs[name].append(m)
                print(f"[{rep + 1}/{repeats}] {name:20s} {m['outer_s']:8.1f} s  "
                      f"val {m.get('val_accuracy', float('nan')):.4f}  "
                      f"test {m.get('test_accuracy', float('nan')):.4f}", flush=True)
    ray.shutdown()
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A row per path: median wall time, what it adds to in-process, and the first run's scores."""
    base_s = _median([m["outer_s"] for m in runs["in-process"]])
    rows = []
    for name, ms in runs.items():
        wall = _median([m["outer_s"] for m in ms])
        rows.append({"path": name, "wall": wall, "added": wall - base_s, "ratio": wall / base_s,
                     "inside": _median([m.get("wall_s", float("nan")) for m in ms]),
                     "reports": ms[0]["reports"], "val": ms[0].get("val_accuracy"),
                     "test": ms[0].get("test_accuracy")})
    return rows


def write(rows: list[dict[str, Any]], cfg: Any, data: Any, args: argparse.Namespace,
          argv: list[str], load_start: str) -> None:
    tc = cfg.train
    notes = [
        f"trial: preset `{args.preset}`, dataset {data.name} (train {len(data.train)}, val "
        f"{len(data.val)}, test {len(data.test)}), seed {args.seed}, classifier "
        f"`{tc.classifier}`, {tc.pretrain_epochs} pretraining + {tc.classifier_epochs} "
        f"classifier epochs, `train.num_threads=1` on every path (a Ray worker gets 1 CPU)",
        *(["(c) runs a 1-trial `tune.Tuner` over `worker.train_driver_fn` in this process (as "
           "`cbdtune.search` wires it), sharing Ray and the dataset with (b); the CLI's Ray "
           "start, dataset read and MLflow logging are not included"]
          if "Tune + TorchTrainer" in args.paths else []),
        f"wall = around the call, median of {args.repeats} run(s); inside = `run_trial`'s own "
        "`wall_s` (the difference is start-up/teardown); reports = evaluation points sent "
        "(each `ray.train.report` waits for the controller's 0.25 s poll)",
    ]
    lines = header("Orchestration overhead of one trial", argv, notes, load_start) + [
        "| path | wall s | added s | ratio to in-process | inside run_trial s | reports | val acc "
        "| test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['wall']:.1f} | {r['added']:+.1f} | {r['ratio']:.3f} "
                     f"| {r['inside']:.1f} | {r['reports']} | {_fmt(r['val'])} "
                     f"| {_fmt(r['test'])} |")
    same = len({(r["val"], r["test"]) for r in rows}) == 1
    lines += ["", f"Same val/test accuracy on every path: {'yes' if same else 'NO'}."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[-len(rows) - 4:]))
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    load_start = load_average()

    from cbdtune.config import preset
    from cbdtune.data import load_dataset

    cfg = preset(args.preset).replace({"data.dataset": args.dataset, "train.seed": args.seed,
                                       "train.num_threads": 1, "train.device": "cpu"})
    data = load_dataset(cfg.data, seed=cfg.train.seed)
    runs = run_paths(cfg, data, args.paths, args.repeats)
    write(summarise(runs), cfg, data, args, argv, load_start)
    return 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


if __name__ == "__main__":
    sys.exit(main())
