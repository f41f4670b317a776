"""The search: ``python -m cbdtune.search --dataset gesture``.

Ray Tune runs trials, Optuna (TPE by default) proposes them, ASHA stops the weak ones on the
pipeline's fidelity reports, and every trial lands in MLflow as a run nested under the search's
parent run. Each trial is a Tune function trainable that launches a Ray Train ``TorchTrainer``
(``cbdtune.worker``), so a trial can be data-parallel over several workers or GPUs.

The same command runs on a laptop (a local Ray is started, MLflow writes ``./mlflow.db``) and as
``ray job submit -- python -m cbdtune.search ...`` on a cluster (``RAY_ADDRESS`` is set by Ray).

This module sees a config and a metric, nothing of the model: ``config``, ``space``, ``worker``,
``tracking`` and ``results`` are all it imports from cbdtune.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cbdtune import _cli, results, tracking
from cbdtune.config import METRIC, MODE, CbdtuneError, ExperimentConfig
from cbdtune.data import load_dataset
from cbdtune.space import SearchSpace, load_space

log = logging.getLogger("cbdtune.search")

SAMPLERS = ("tpe", "random", "cmaes")
DRIVER_MEMORY = 256 * 1024**2  # the trial driver only waits on its TorchTrainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_cli.prog("cbdtune.search"),
        description="Hyperparameter search for CBD with Ray Tune + Optuna + ASHA, logged to "
                    "MLflow. Runs on a local Ray or the cluster at $RAY_ADDRESS.")
    _cli.add_version_flag(p)
    _cli.add_config_flags(p)
    p.add_argument("--space", default="default",
                   help="search space YAML, or a name in search_spaces/ (default, paper, smoke)")
    p.add_argument("--num-samples", type=int, default=16, help="trials to run (default 16)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="data-parallel workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker; fractions (0.25) let trials share a GPU")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (seeded)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha")
    p.add_argument("--metric", default=METRIC, help=f"what to optimise (default {METRIC})")
    p.add_argument("--mode", choices=("max", "min"), default=None,
                   help="direction (default: min for losses, else max)")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default cbdtune-<dataset>)")
    p.add_argument("--name", help="search name: Tune run and results folder "
                                  "(default <dataset>-<space>, suffixed -2, -3... when taken)")
    p.add_argument("--storage", default=None,
                   help="Ray storage: a folder or s3:// / gs:// URI (default ~/ray_results)")
    p.add_argument("--results-dir", default="results", help="where results/<dataset>/<name> go")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest search of this name from its storage")
    p.add_argument("--overwrite", action="store_true",
                   help="use --name (or the default name) even if a search of that name exists: "
                        "its results files are replaced and Tune starts a new experiment in its "
                        "storage (ignored with --resume)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial (and of its worker group) after a failure")
    p.add_argument("--allow-autoscale", action="store_true",
                   help="skip the resource check: the cluster's autoscaler will add nodes")
    return p


# ---- validation (all before Ray starts) -----------------------------------------------------------


def _mode(args: argparse.Namespace) -> str:
    if args.mode:
        return args.mode
    return "min" if "loss" in args.metric else MODE


def validate_args(args: argparse.Namespace) -> None:
    if args.metric.startswith("test"):
        raise CbdtuneError(f"--metric {args.metric}: the search never selects on a test metric; "
                           f"use a validation metric such as {METRIC}")
    for flag, value, least in (("--num-samples", args.num_samples, 1),
                               ("--workers-per-trial", args.workers_per_trial, 1),
                               ("--max-concurrent", args.max_concurrent, 0),
                               ("--max-failures", args.max_failures, 0)):
        if value < least:
            raise CbdtuneError(f"{flag}: must be >= {least}, but got {value}")
    if args.gpus_per_worker < 0 or args.cpus_per_worker < 0:
        raise CbdtuneError("--gpus-per-worker/--cpus-per-worker: must be >= 0")
    if args.gpus_per_worker > 1 and not float(args.gpus_per_worker).is_integer():
        raise CbdtuneError(f"--gpus-per-worker {args.gpus_per_worker}: fractions must be < 1 "
                           "(a worker shares one GPU) or whole numbers")


def expected_reports(cfg: ExperimentConfig, space: SearchSpace | None = None) -> int:
    """How many results one full trial reports at most: ASHA's ``max_t``.

    ASHA stops every trial at ``max_t``, so it must not fall short of a trial's last (final)
    report; searched epoch counts are taken at their upper bound.
    """
    for p in space.params if space else ():
        if p.key.startswith("train.") and p.key.endswith("epochs") and p.high is not None:
            cfg = cfg.replace({p.key: int(p.high)})
    tc = cfg.train
    pre = math.ceil(tc.pretrain_epochs / tc.probe_every) if tc.pretrain_epochs else 0
    stages = 2 if tc.classifier == "both" else 1
    return max(1, pre + stages * (tc.classifier_epochs + 1) + 1)


# ---- Ray side ---------------------------------------------------------------------------------


def check_resources(args: argparse.Namespace) -> int:
    """Fail fast when not even one trial fits the cluster; return how many trials fit at once."""
    import ray

    need_cpu = args.cpus_per_worker
    need_gpu = args.gpus_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpu = sum(r.get("GPU", 0.0) for r in nodes)
    fits_one_worker = any(r.get("CPU", 0.0) >= need_cpu and r.get("GPU", 0.0) >= need_gpu
                          for r in nodes)
    workers = args.workers_per_trial
    if not args.allow_autoscale and (
            not fits_one_worker or total_cpu < workers * need_cpu
            or total_gpu + 1e-9 < workers * need_gpu):
        raise CbdtuneError(
            f"a trial needs {workers} worker(s) x ({need_cpu:g} CPU, {need_gpu:g} GPU) but the "
            f"cluster has {total_cpu:g} CPU and {total_gpu:g} GPU on {len(nodes)} node(s); lower "
            "--workers-per-trial/--gpus-per-worker, add nodes, or pass --allow-autoscale")
    per_trial = [total_cpu / max(workers * need_cpu, 1e-9)]
    if need_gpu:
        per_trial.append(total_gpu / (workers * need_gpu))
    return max(1, int(min(per_trial) + 1e-9))


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_searcher(space: SearchSpace, *, sampler: str, seed: int, metric: str, mode: str,
                  max_concurrent: int) -> Any:
    """OptunaSearch over the space's ``train_loop_config`` keys, limited to ``max_concurrent``."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric=metric, mode=mode, sampler=_sampler(sampler, seed))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def param_space(space: SearchSpace, args: argparse.Namespace, storage: str | None) -> dict:
    """Run-level settings at the top, the trial's hyperparameters under ``train_loop_config``."""
    return {
        "workers": args.workers_per_trial,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
        "max_failures": args.max_failures,
        "storage_path": storage,
        "train_loop_config": space.to_tune(),
    }


def _storage_root(args: argparse.Namespace) -> str:
    if args.storage:
        return args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    return str(Path("~/ray_results").expanduser())


def _search_name(args: argparse.Namespace, root: str, stem: str, *, results_dir: Path) -> str:
    """The search's name, decided once for its Ray storage and its results folder.

    ``--name``, else ``<dataset>-<space>``. A name is taken when ``{root}/{name}`` holds a Tune
    experiment or ``{results_dir}/{name}`` is a non-empty folder. A fresh search takes the first
    free one of ``name``, ``name-2``, ``name-3``...; ``--resume`` the latest taken one that Tune
    can restore; ``--overwrite`` (ignored with ``--resume``) ``name`` itself, taken or not.

    Args:
        args: the parsed command line (``name``, ``dataset``, ``resume``, ``overwrite``).
        root: the Ray storage root (a folder or a URI).
        stem: the space file's stem, for the default name.
        results_dir: the dataset's results folder, ``<--results-dir>/<dataset name>``.

    Raises:
        CbdtuneError: ``--resume`` with no restorable search of this name.
    """
    from ray import tune

    base = args.name or f"{args.dataset}-{stem}"
    names = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    taken: list[str] = []
    restorable: list[str] = []
    for name in names:
        if tune.Tuner.can_restore(f"{root}/{name}"):
            restorable.append(name)
        elif not _has_results(results_dir / name):
            break
        taken.append(name)
    if args.resume:
        if not restorable:
            raise CbdtuneError(f"--resume: no search named {base} in {root}; run it without "
                               "--resume first, or pass --name/--storage")
        return restorable[-1]
    if args.overwrite:
        return base
    return names[len(taken)]


def _has_results(folder: Path) -> bool:
    """True when ``folder`` exists and is not an empty folder (a file there counts too)."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _parent_run(mlc: Any, exp_id: str, name: str, resume: bool, tags: dict[str, Any],
                params: dict[str, Any]) -> str:
    if resume:
        found = mlc.search_runs([exp_id], filter_string=f"tags.`cbdtune.search` = '{name}' and "
                                                        "tags.`cbdtune.role` = 'search'",
                                order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            mlc.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = mlc.create_run(exp_id, run_name=name,
                         tags={"cbdtune.search": name, "cbdtune.role": "search", **tags})
    tracking.log_params(mlc, run.info.run_id, params)
    return run.info.run_id


def main(args: argparse.Namespace) -> int:
    # [1] Validate everything before Ray starts: bad input costs nothing.
    validate_args(args)
    space = load_space(args.space)
    late: dict[str, Any] = {"data.dataset": args.dataset}
    if args.data_dir:
        late["data.data_dir"] = str(Path(args.data_dir).resolve())
    if args.seed is not None:
        late["train.seed"] = args.seed
    base = space.base.replace(late, where="command line")
    data = load_dataset(base.data, seed=base.train.seed)
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    tracking.check_tracking_uri(uri)
    metric, mode = args.metric, _mode(args)
    seed = base.train.seed
    command = "python -m cbdtune.search " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    # [2] Ray: join a cluster or start one; check that one trial fits.
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from cbdtune.worker import connect, train_driver_fn

    where = connect()
    fits = check_resources(args)
    max_concurrent = args.max_concurrent or min(fits, args.num_samples)
    root = _storage_root(args)
    name = _search_name(args, root, Path(space.path).stem)
    log.info("search %s: %d trials, %d at once, on a %s Ray (%s); storage %s/%s",
             name, args.num_samples, max_concurrent, where, ray.cluster_resources(), root, name)

    # [3] MLflow: a parent run for the search (reused by --resume).
    mlc = tracking.client(uri)
    exp_id = tracking.experiment_id(mlc, args.experiment or tracking.default_experiment(data.name))
    header = {"dataset": data.name, "space": space.path, "space_sha256": space.sha256,
              "git_commit": tracking.git_commit(), "sampler": args.sampler,
              "scheduler": args.scheduler, "seed": seed, "metric": metric, "mode": mode,
              "num_samples": args.num_samples, "workers_per_trial": args.workers_per_trial,
              "gpus_per_worker": args.gpus_per_worker}
    parent = _parent_run(mlc, exp_id, name, args.resume, {"cbdtune.command": command}, header)
    callback = tracking.MLflowTrialCallback(uri, exp_id, parent, base)

    # [4] The trainable: the dataset goes to the object store once, for every trial and worker.
    data_ref = ray.put(data)
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, data_ref=[data_ref], base=base.to_dict()),
        {"cpu": 0, "memory": DRIVER_MEMORY})  # drivers must not hold the CPUs workers need
    train_storage = f"{root}/{name}/train"
    if args.scheduler == "asha":
        # First rung after a third of the pretraining probes (the cheap fidelity signal: the
        # short probe's validation accuracy), then x3 per rung.
        max_t = expected_reports(base, space) + 1
        probes = math.ceil(base.train.pretrain_epochs / base.train.probe_every)
        grace = max(1, math.ceil(probes / 3))
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=max(1, min(grace, max_t)), reduction_factor=3)
    else:
        scheduler = FIFOScheduler()
    # Tune checkpoints the experiment (searcher, scheduler, callbacks) into storage: --resume.
    run_config = tune.RunConfig(
        name=name, storage_path=root, callbacks=[callback],
        failure_config=tune.FailureConfig(max_failures=args.max_failures), verbose=1)
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=args.num_samples, scheduler=scheduler,
        search_alg=make_searcher(space, sampler=args.sampler, seed=seed, metric=metric,
                                 mode=mode, max_concurrent=max_concurrent),
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    if args.resume:
        tuner = tune.Tuner.restore(f"{root}/{name}", trainable, resume_errored=True,
                                   param_space=param_space(space, args, train_storage))
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(space, args, train_storage),
                           tune_config=tune_config, run_config=run_config)
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0

    # [5] Results: table, best config, summary; the parent run gets them as artifacts.
    df = results.trials_frame(_rows(grid))
    interrupted = len(df) < args.num_samples or bool((df["status"] == "unfinished").any())
    out_dir = Path(args.results_dir) / data.name / name
    header.update({"wall_s": round(wall, 1), "ray": where})
    paths = results.write(out_dir, df, space, base, metric=metric, mode=mode, command=command,
                          header=header)
    for path in paths.values():
        mlc.log_artifact(parent, str(path))
    best = results.best_trial(df, metric, mode)
    if best is not None:
        tracking.log_metrics(mlc, parent, {f"best_{k}": best.get(k) for k in
                                           ("val_accuracy", "val_f1", "test_accuracy", "test_f1")
                                           if k in best}, step=len(df))
        tracking.set_tags(mlc, parent, {"cbdtune.best_trial": best["trial_id"]})
    mlc.set_terminated(parent, status="KILLED" if interrupted else "FINISHED")
    _print_best(df, best, metric, out_dir, wall, name)
    if interrupted:
        print(f"search {name} stopped before its {args.num_samples} trials finished; continue it "
              f"with: {command} --resume", file=sys.stderr)
        return 130
    return 0


def _rows(grid: Any) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``, with the status the MLflow callback also uses."""
    # Tune's own trial states tell a trial that ended from one cut off by Ctrl-C.
    states = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    rows = []
    for res in grid:
        last = res.metrics or {}
        trial_id = last.get("trial_id") or Path(res.path).name.removeprefix("trial_")
        status, reason = tracking.trial_status(last, errored=res.error is not None,
                                               error=str(res.error or ""))
        if states.get(trial_id) not in ("TERMINATED", "ERROR"):
            status, reason = "unfinished", "the search was interrupted; --resume continues it"
        params = (res.config or {}).get("train_loop_config", {})
        rows.append(results.trial_row(trial_id, params, last, status, reason))
    return rows


def _print_best(df: Any, best: Any, metric: str, out_dir: Path, wall: float, name: str) -> None:
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    print(f"\nsearch {name}: {len(df)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
          f" in {wall:.0f} s; results in {out_dir}")
    if best is None:
        print("no trial completed")
        return
    rows = [("best trial", best["trial_id"])]
    for key in (metric, "val_f1", "test_accuracy", "test_f1", "selected_stage"):
        if key in best and best[key] == best[key]:
            value = best[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows += [(k, v) for k, v in best.items() if k.startswith("param.")]
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cli(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a tool
    return _cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
