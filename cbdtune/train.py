"""One trial from the command line: ``python -m cbdtune.train --dataset gesture --preset smoke``.

Runs the pretrain -> probe / fine-tune pipeline once, through a Ray ``TorchTrainer`` (default) or
in this process (``--in-process``), prints the final table, and logs the run to MLflow.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import uuid
from typing import Any

from cbdtune import _cli, reports, tracking
from cbdtune.config import PRESETS, CbdtuneError, ExperimentConfig, parse_overrides
from cbdtune.data import load_dataset

# The preset the default search space starts from (search_spaces/default.yaml, ``preset:``): a
# single run and a search's trials start from one configuration.
DEFAULT_PRESET = "default"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_cli.prog("cbdtune.train"), description=__doc__.split("\n")[0])
    _cli.add_version_flag(p)
    _cli.add_config_flags(p)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="starting configuration: default (the search's starting point: the "
                        "paper's model with this project's additions and the ridge readout; "
                        "the default), paper (the paper's configuration) or smoke (tiny, "
                        "< 1 min)")
    p.add_argument("--config", help="YAML file with config overrides (nested or dotted keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set model.mask_ratio=0.5 (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    _cli.add_worker_flags(p, gpus_default="1 when this machine has CUDA, else 0")
    p.add_argument("--in-process", action="store_true", help="no Ray: run in this process")
    _cli.add_mlflow_flags(p)
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(cpus_per_worker=1.0, gpus_per_worker=None)
    return p


def run_in_process(cfg: ExperimentConfig, data: Any) -> dict[str, Any]:
    from cbdtune.pipeline import run_trial
    from cbdtune.runtime import Runtime, resolve_device

    history: list[dict[str, Any]] = []
    tty = sys.stderr.isatty()  # bars on a terminal; a file (> log 2>&1) gets log lines
    rt = Runtime(device=resolve_device(cfg.train), progress=tty, progress_log=not tty)
    result = run_trial(cfg, data, lambda metrics, _state: history.append(dict(metrics)), rt=rt)
    return {"status": result.status, "reason": result.reason, "final": result.metrics,
            "history": history}


def run_with_trainer(cfg: ExperimentConfig, data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One run through a Ray ``TorchTrainer``; its checkpoints live in a temporary folder that is
    removed afterwards (a single run is not resumed, and ``~/ray_results`` stays clean)."""
    import ray

    from cbdtune.session import connect
    from cbdtune.worker import fit_trainer, make_trainer

    connect(args.address)
    gpus = _gpus_per_worker(args)
    check_cluster_gpus(ray.cluster_resources(), args.workers, gpus)
    with tempfile.TemporaryDirectory(prefix="cbdtune-train-", ignore_cleanup_errors=True) as tmp:
        trainer = make_trainer(cfg, data_ref=ray.put(data), name=f"train-{uuid.uuid4().hex[:8]}",
                               workers=args.workers, gpus_per_worker=gpus,
                               cpus_per_worker=args.cpus_per_worker, storage_path=tmp)
        return fit_trainer(trainer)


def _gpus_per_worker(args: argparse.Namespace) -> float:
    """``--gpus-per-worker``, else 1 when this machine has CUDA, else 0."""
    if args.gpus_per_worker is not None:
        return args.gpus_per_worker
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def check_args(args: argparse.Namespace) -> None:
    """The flags a config does not check, before anything is loaded or started.

    Raises:
        CbdtuneError: ``--seed`` < 0, ``--workers`` < 1, a CPU or GPU amount that is negative or
            not finite, a ``--set`` item that is not ``key=<YAML>``, or GPUs asked of a machine
            without CUDA when no cluster is named (``--address``, ``$RAY_ADDRESS``): a local Ray
            would wait forever.
    """
    if args.seed is not None and args.seed < 0:
        raise CbdtuneError(f"--seed {args.seed}: must be >= 0")
    if args.workers < 1:
        raise CbdtuneError(f"--workers {args.workers}: must be >= 1")
    for flag, amount in (("--cpus-per-worker", args.cpus_per_worker),
                         ("--gpus-per-worker", args.gpus_per_worker)):
        if amount is not None and (not math.isfinite(amount) or amount < 0):
            raise CbdtuneError(f"{flag} {amount}: must be a finite number >= 0")
    parse_overrides(args.overrides)  # a --set value that is not YAML: one line, before Ray
    if (args.in_process or not args.gpus_per_worker or args.address
            or os.environ.get("RAY_ADDRESS")):
        return
    import torch

    if not torch.cuda.is_available():
        raise CbdtuneError(f"--gpus-per-worker {args.gpus_per_worker}: this machine has no CUDA "
                           "GPU; drop the flag, or pass --address of a cluster with GPUs")


def check_cluster_gpus(resources: dict[str, float], workers: int, gpus: float) -> None:
    """Refuse a run whose workers ask for more GPUs than the Ray cluster has (Ray would wait for
    them forever, not fail).

    Raises:
        CbdtuneError: ``workers * gpus`` exceeds the cluster's ``GPU`` resource.
    """
    have = resources.get("GPU", 0.0)
    if gpus and workers * gpus > have + 1e-9:
        raise CbdtuneError(f"--gpus-per-worker {gpus:g}: {workers} worker(s) need "
                           f"{workers * gpus:g} GPU but the Ray cluster has {have:g}; lower it "
                           "or pass --gpus-per-worker 0")


def print_table(out: dict[str, Any], wall_s: float, file: Any = None) -> None:
    file = file or sys.stdout
    final = out.get("final", {})
    rows = [("status", out.get("status", "?"))]
    if out.get("reason"):
        rows.append(("reason", out["reason"]))
    for key in (reports.SELECTED_STAGE, reports.SELECTED_EPOCH, reports.VAL_ACCURACY,
                reports.VAL_F1, reports.TEST_ACCURACY, reports.TEST_F1):
        if key in final:
            value = final[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows.append(("wall_time_s", f"{wall_s:.1f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=file)


def main(args: argparse.Namespace) -> int:
    # Everything that can be wrong with the input is checked before Ray starts.
    check_args(args)
    cfg = _cli.build_config(args, preset_name=args.preset, config_file=args.config,
                            overrides=args.overrides)
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    if not args.no_mlflow:
        tracking.check_tracking_uri(uri, writable=True)
    data = load_dataset(cfg.data, seed=cfg.train.seed)
    t0 = time.perf_counter()
    out = run_in_process(cfg, data) if args.in_process else run_with_trainer(cfg, data, args)
    wall = time.perf_counter() - t0
    print_table(out, wall)
    if not args.no_mlflow and out:
        run_id = tracking.log_single_run(
            uri, args.experiment or tracking.default_experiment(data.name), cfg,
            out.get("history", []), out.get("final", {}), status=out.get("status", "?"),
            reason=out.get("reason", ""),
            tags={tracking.ENTRY_TAG: "train", tracking.IN_PROCESS_TAG: args.in_process})
        print(f"mlflow run {run_id} in {uri}")
    return 0 if out.get("status") == "completed" else 1


def cli(argv: list[str] | None = None) -> int:
    return _cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
