"""One trial from the command line: ``python -m cbdtune.train --dataset gesture --preset smoke``.

Runs the pretrain -> probe / fine-tune pipeline once, through a Ray ``TorchTrainer`` (default) or
in this process (``--in-process``), prints the final table, and logs the run to MLflow.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from cbdtune import _cli, tracking
from cbdtune.config import PRESETS, ExperimentConfig
from cbdtune.data import load_dataset


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_cli.prog("cbdtune.train"), description=__doc__.split("\n")[0])
    _cli.add_version_flag(p)
    _cli.add_config_flags(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="starting configuration: paper (full, default) or smoke (tiny, < 1 min)")
    p.add_argument("--config", help="YAML file with config overrides (nested or dotted keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set model.mask_ratio=0.5 (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 when this machine has CUDA, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--in-process", action="store_true", help="no Ray: run in this process")
    p.add_argument("--mlflow-uri", help="tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: cbdtune-<dataset>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p


def run_in_process(cfg: ExperimentConfig, data: Any) -> dict[str, Any]:
    from cbdtune.pipeline import Runtime, resolve_device, run_trial

    history: list[dict[str, Any]] = []
    rt = Runtime(device=resolve_device(cfg.train), progress=sys.stderr.isatty())
    result = run_trial(cfg, data, lambda metrics, _state: history.append(dict(metrics)), rt=rt)
    return {"status": result.status, "reason": result.reason, "final": result.metrics,
            "history": history}


def run_with_trainer(cfg: ExperimentConfig, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from cbdtune.worker import connect, make_trainer

    connect()
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    # A fresh name per run: Train resumes a run whose name already has checkpoints.
    trainer = make_trainer(cfg, data_ref=ray.put(data), name=f"train-{uuid.uuid4().hex[:8]}",
                           workers=args.workers, gpus_per_worker=gpus,
                           cpus_per_worker=args.cpus_per_worker)
    return trainer.fit().return_value or {}


def print_table(out: dict[str, Any], wall_s: float, file: Any = None) -> None:
    file = file or sys.stdout
    final = out.get("final", {})
    rows = [("status", out.get("status", "?"))]
    if out.get("reason"):
        rows.append(("reason", out["reason"]))
    for key in ("selected_stage", "selected_epoch", "val_accuracy", "val_f1", "test_accuracy",
                "test_f1"):
        if key in final:
            value = final[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows.append(("wall_time_s", f"{wall_s:.1f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=file)


def main(args: argparse.Namespace) -> int:
    cfg = _cli.build_config(args, preset_name=args.preset, config_file=args.config,
                            overrides=args.overrides)
    # Everything that can be wrong with the input is checked before Ray starts.
    data = load_dataset(cfg.data, seed=cfg.train.seed)
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    if not args.no_mlflow:
        tracking.check_tracking_uri(uri)
    t0 = time.perf_counter()
    out = run_in_process(cfg, data) if args.in_process else run_with_trainer(cfg, data, args)
    wall = time.perf_counter() - t0
    print_table(out, wall)
    if not args.no_mlflow and out:
        run_id = tracking.log_single_run(
            uri, args.experiment or tracking.default_experiment(data.name), cfg,
            out.get("history", []), out.get("final", {}), status=out.get("status", "?"),
            reason=out.get("reason", ""),
            tags={"cbdtune.entry": "train", "cbdtune.in_process": args.in_process})
        print(f"mlflow run {run_id} in {uri}")
    return 0 if out.get("status") == "completed" else 1


def cli(argv: list[str] | None = None) -> int:
    return _cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
