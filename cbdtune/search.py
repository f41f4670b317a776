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

import numpy as np

from cbdtune import _cli, results, tracking
from cbdtune.config import METRIC, MODE, CbdtuneError, ExperimentConfig, preset
from cbdtune.data import load_dataset
from cbdtune.space import SearchSpace, load_space

log = logging.getLogger("cbdtune.search")

SAMPLERS = ("tpe", "random", "cmaes")
DRIVER_MEMORY = 256 * 1024**2
# What the pipeline reports at every evaluation point and in its final report (cross-validated
# means under CV): the metrics a search may select on.
REPORTED_METRICS = ("val_accuracy", "val_loss", "val_f1")  # the trial driver only waits on its TorchTrainer


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
    p.add_argument("--cv-folds", type=int, default=None,
                   help="k of the stratified k-fold cross-validation each trial is scored by "
                        "(default: the space's, 5); 0 = one validation split (large datasets)")
    p.add_argument("--cv-repeats", type=int, default=None,
                   help="repeat the k folds with fresh shuffles (tiny datasets; default 1)")
    p.add_argument("--refit-top", type=int, default=3,
                   help="refit the best N configurations on all training series (default 3; "
                        "0 = no refit, no model)")
    p.add_argument("--refit-seeds", type=int, default=3,
                   help="seeds per refit configuration (default 3); the model is the ensemble")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not run the paper's configuration as the first trial")
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
                               ("--max-failures", args.max_failures, 0),
                               ("--refit-top", args.refit_top, 0),
                               ("--refit-seeds", args.refit_seeds, 1)):
        if value < least:
            raise CbdtuneError(f"{flag}: must be >= {least}, but got {value}")
    if args.metric not in REPORTED_METRICS:
        raise CbdtuneError(f"--metric {args.metric}: not a metric the pipeline reports for "
                           f"selection; choose one of {', '.join(REPORTED_METRICS)}")
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
                  max_concurrent: int, baseline: bool = True) -> Any:
    """Optuna over the space, sampled define-by-run, limited to ``max_concurrent``.

    :meth:`SearchSpace.define_by_run` suggests only the parameters whose ``when`` holds, named
    ``train_loop_config/<key>`` so that each trial's config nests them as the trainable expects.
    Trials ASHA stopped reach Optuna as PRUNED, not COMPLETE (:mod:`cbdtune.searcher`). With
    ``baseline`` the paper's configuration is the first trial (``points_to_evaluate``).
    """
    from ray.tune.search import ConcurrencyLimiter

    from cbdtune.searcher import FullFidelityOptunaSearch

    points = [baseline_point(space)] if baseline and space.params else None
    searcher = FullFidelityOptunaSearch(space=space.define_by_run, metric=metric, mode=mode,
                                        sampler=_sampler(sampler, seed),
                                        points_to_evaluate=points)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def baseline_point(space: SearchSpace) -> dict[str, Any]:
    """The paper's value of every searched key whose ``when`` holds for the paper's values (the
    space's base value where the paper's lies outside the searched range), keyed as
    :meth:`SearchSpace.define_by_run` names its parameters; Optuna's ``enqueue_trial`` fixes
    exactly these in trial 0, so it samples nothing else there."""
    paper, base = preset("paper").to_dict(), space.base.to_dict()
    values = {}
    for p in space.params:
        value = paper[p.key]
        inside = (value in p.choices if p.kind == "categorical"
                  else p.low is not None and p.low <= value <= p.high)
        values[p.key] = value if inside else base[p.key]
    return space.optuna_point(values)


def param_space(space: SearchSpace, args: argparse.Namespace, storage: str | None) -> dict:
    """Run-level settings at the top; the searcher fills ``train_loop_config`` in each trial.

    Nothing here is a distribution: Tune refuses one in ``param_space`` when the searcher has its
    own space. Tune deep-merges each suggestion into this dict (``SearchGenerator``), so a trial
    with no parameter sampled still gets an empty ``train_loop_config``.
    """
    return {
        "workers": args.workers_per_trial,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
        "max_failures": args.max_failures,
        "storage_path": storage,
        "train_loop_config": {},
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


def _inputs(args: argparse.Namespace) -> tuple[SearchSpace, ExperimentConfig, Any, str]:
    """Everything checked before Ray starts: flags, space, config, dataset, MLflow, results."""
    validate_args(args)
    space = load_space(args.space)
    late: dict[str, Any] = {"data.dataset": args.dataset}
    if args.data_dir:
        late["data.data_dir"] = str(Path(args.data_dir).resolve())
    if args.seed is not None:
        late["train.seed"] = args.seed
    if args.cv_folds is not None:
        late["data.cv_folds"] = args.cv_folds
    if args.cv_repeats is not None:
        late["data.cv_repeats"] = args.cv_repeats
    base = space.base.replace(late, where="command line")
    results.check_results_dir(Path(args.results_dir))
    data = load_dataset(base.data, seed=base.train.seed)
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    tracking.check_tracking_uri(uri)
    return space, base, data, uri


def _scheduler(args: argparse.Namespace, base: ExperimentConfig, space: SearchSpace) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if args.scheduler != "asha":
        return FIFOScheduler()
    # First rung after a third of the pretraining probes (short cross-validated linear probes),
    # then x3 per rung; rungs in the classifier stage compare the mean CV curve's best point.
    max_t = expected_reports(base, space) + 1
    probes = math.ceil(base.train.pretrain_epochs / base.train.probe_every)
    grace = max(1, math.ceil(probes / 3))
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=max(1, min(grace, max_t)), reduction_factor=3)


def main(args: argparse.Namespace) -> int:
    # [1] Validate everything before Ray starts: bad input costs nothing.
    space, base, data, uri = _inputs(args)
    metric, mode = args.metric, _mode(args)
    command = "python -m cbdtune.search " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    # [2] Ray: join a cluster or start one; check that one trial fits.
    import ray

    from cbdtune.worker import connect

    where = connect()
    fits = check_resources(args)
    max_concurrent = args.max_concurrent or min(fits, args.num_samples)
    root = _storage_root(args)
    name = _search_name(args, root, Path(space.path).stem,
                        results_dir=Path(args.results_dir) / data.name)
    log.info("search %s: %d trials, %d at once, on a %s Ray (%s); storage %s/%s",
             name, args.num_samples, max_concurrent, where, ray.cluster_resources(), root, name)

    # [3] MLflow: a parent run for the search (reused by --resume).
    mlc = tracking.client(uri)
    exp_id = tracking.experiment_id(mlc, args.experiment or tracking.default_experiment(data.name))
    header = {"dataset": data.name, "space": space.path, "space_sha256": space.sha256,
              "git_commit": tracking.git_commit(), "sampler": args.sampler,
              "scheduler": args.scheduler, "seed": base.train.seed, "metric": metric,
              "mode": mode, "cv_folds": base.data.cv_folds, "cv_repeats": base.data.cv_repeats,
              "num_samples": args.num_samples, "workers_per_trial": args.workers_per_trial,
              "gpus_per_worker": args.gpus_per_worker}
    parent = _parent_run(mlc, exp_id, name, args.resume, {"cbdtune.command": command}, header)

    # [4] Tune: the dataset goes to the object store once, for every trial, refit and worker.
    data_ref = ray.put(data)
    t0 = time.perf_counter()
    grid = _tuner(args, space, base, data_ref, uri, exp_id, parent, root, name,
                  max_concurrent, metric, mode).fit()
    wall = time.perf_counter() - t0

    # [5] Results: table, best config, summary; then the refits and the model.
    df = results.trials_frame(_rows(grid))
    interrupted = len(df) < args.num_samples or bool((df["status"] == "unfinished").any())
    out_dir = Path(args.results_dir) / data.name / name
    header.update({"wall_s": round(wall, 1), "ray": where})
    write = dict(space=space, base=base, metric=metric, mode=mode, command=command, header=header)
    paths = results.write(out_dir, df, **write)
    best = results.best_trial(df, metric, mode)
    if best is not None:
        tracking.log_metrics(mlc, parent, {f"best_{k}": best.get(k) for k in
                                           ("val_accuracy", "val_accuracy_se", "val_f1",
                                            "test_accuracy", "test_f1") if k in best},
                             step=len(df))
        tracking.set_tags(mlc, parent, {"cbdtune.best_trial": best["trial_id"]})
    if best is not None and args.refit_top and not interrupted:
        top = results.ranked(df, metric, mode).head(args.refit_top)
        outcome = _refit_and_register(args, top, base, data, data_ref, uri, parent, out_dir,
                                      metric, root, name)
        paths = results.write(out_dir, df, refits=outcome, **write)
    for path in paths.values():
        mlc.log_artifact(parent, str(path))
    mlc.set_terminated(parent, status="KILLED" if interrupted else "FINISHED")
    _print_best(df, best, metric, out_dir, time.perf_counter() - t0, name)
    if interrupted:
        print(f"search {name} stopped before its {args.num_samples} trials finished; continue it "
              f"with: {command} --resume", file=sys.stderr)
        return 130
    return 0


def _tuner(args: argparse.Namespace, space: SearchSpace, base: ExperimentConfig, data_ref: Any,
           uri: str, exp_id: str, parent: str, root: str, name: str, max_concurrent: int,
           metric: str, mode: str) -> Any:
    """The Tuner (fresh, or restored from storage with ``--resume``)."""
    from ray import tune

    from cbdtune.worker import train_driver_fn

    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, data_ref=[data_ref], base=base.to_dict()),
        {"cpu": 0, "memory": DRIVER_MEMORY})  # drivers must not hold the CPUs workers need
    settings = param_space(space, args, f"{root}/{name}/train")
    if args.resume:
        return tune.Tuner.restore(f"{root}/{name}", trainable, resume_errored=True,
                                  param_space=settings)
    callback = tracking.MLflowTrialCallback(uri, exp_id, parent, base)
    # Tune checkpoints the experiment (searcher, scheduler, callbacks) into storage: --resume.
    run_config = tune.RunConfig(
        name=name, storage_path=root, callbacks=[callback],
        failure_config=tune.FailureConfig(max_failures=args.max_failures), verbose=1)
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=args.num_samples,
        scheduler=_scheduler(args, base, space),
        search_alg=make_searcher(space, sampler=args.sampler, seed=base.train.seed,
                                 metric=metric, mode=mode, max_concurrent=max_concurrent,
                                 baseline=not args.no_baseline),
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    return tune.Tuner(trainable, param_space=settings, tune_config=tune_config,
                      run_config=run_config)


def _refit_and_register(args: argparse.Namespace, top: Any, base: ExperimentConfig, data: Any,
                        data_ref: Any, uri: str, parent: str, out_dir: Path, metric: str,
                        root: str, name: str) -> dict[str, Any]:
    """Refit the top configurations, save and register their ensemble; the summary's numbers."""
    from cbdtune import refit, serving

    trainer_args = {"workers": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker,
                    "cpus_per_worker": args.cpus_per_worker, "max_failures": args.max_failures,
                    "storage_path": f"{root}/{name}/refit"}
    refits = refit.run(top, base, data_ref, seeds=args.refit_seeds, trainer_args=trainer_args)
    y_test = data.test.y if data.test is not None else None
    configs = refit.summarise(top, refits, y_test, metric)
    members = [(ExperimentConfig.from_dict(r.config, where="refit"), r.weights,
                {"rank": r.rank, "source_trial": r.trial_id, "seed": r.seed})
               for r in refits]
    model_dir = serving.save_model(out_dir / "model", members, class_names=data.class_names,
                                   dataset=data.name)
    ensemble = serving.CBDEnsemble.load(model_dir)
    outcome: dict[str, Any] = {"configs": [c.row() for c in configs], "members": len(refits),
                               "model_dir": model_dir}
    if data.test is not None:  # the ensemble reads test once, through the code users load
        pred = ensemble.predict_proba(data.test.x).argmax(1)
        outcome["ensemble_test_accuracy"] = float(np.mean(pred == data.test.y))
    registered = f"cbdtune-{_dataset_slug(args.dataset, data.name)}"
    outcome["registered"] = (registered, serving.log_model(
        uri, parent, model_dir, registered_name=registered, input_example=data.train.x[:2]))
    _log_refits(uri, parent, outcome)
    return outcome


def _log_refits(uri: str, parent: str, outcome: dict[str, Any]) -> None:
    mlc = tracking.client(uri)
    metrics = {"ensemble_test_accuracy": outcome.get("ensemble_test_accuracy")}
    for c in outcome["configs"]:
        for key in ("cv_accuracy", "cv_se", "test_mean", "test_std", "ensemble_test"):
            metrics[f"refit.{c['rank']}.{key}"] = c[key]
    tracking.log_metrics(mlc, parent, {k: v for k, v in metrics.items() if v is not None}, step=0)
    name, version = outcome["registered"]
    tracking.set_tags(mlc, parent, {"cbdtune.model": f"models:/{name}/{version}"})


def _dataset_slug(arg: str, name: str) -> str:
    """``gesture`` stays ``gesture``; a folder path becomes its dataset's name."""
    slug = name if ("/" in arg or "\\" in arg) else arg
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in slug)


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
