"""The search: ``python -m cbdtune.search --dataset gesture``.

Ray Tune runs trials, Optuna (TPE by default) proposes them, ASHA stops the weak ones on the
pipeline's fidelity reports, and every trial lands in MLflow as a run nested under the search's
parent run. Each trial is a Tune function trainable that launches a Ray Train ``TorchTrainer``
(``cbdtune.worker``), so a trial can be data-parallel over several workers or GPUs.

The same command runs on a laptop (a local Ray is started, MLflow writes ``./mlflow.db``) and as
``ray job submit -- python -m cbdtune.search ...`` on a cluster (``RAY_ADDRESS`` is set by Ray).

This module sees a config and a metric, nothing of the model: ``config``, ``settings``,
``reports``, ``space``, ``worker``, ``tracking``, ``callbacks``, ``views`` and ``results`` are all
it imports from cbdtune.

In Python: ``run_search(SearchSettings(dataset="gesture", space="smoke"))`` returns a
:class:`SearchResult`; the command line is a thin mapping of its flags onto
:class:`~cbdtune.settings.SearchSettings`.

Every way out of a started search ends its MLflow runs: FINISHED; KILLED after Ctrl-C in any
phase (exit 130, with the ``--resume`` command printed, no model version registered); FAILED
after an exception (its first line is the parent's reason tag, :data:`cbdtune.tracking.REASON_TAG`).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import _cli, reports, results, tracking
from cbdtune.config import METRIC, MODE, CbdtuneError, ExperimentConfig, preset
from cbdtune.data import load_dataset
from cbdtune.settings import (  # noqa: F401 (parse_duration re-exported)
    SAMPLERS,
    SCHEDULERS,
    SearchSettings,
    parse_duration,
)
from cbdtune.space import SearchSpace, load_space, resolve_path

log = logging.getLogger("cbdtune.search")

DRIVER_MEMORY = 256 * 1024**2  # the trial driver only waits on its TorchTrainer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_cli.prog("cbdtune.search"),
        description="Hyperparameter search for CBD with Ray Tune + Optuna + ASHA, logged to "
                    "MLflow. Runs on a local Ray or the cluster at $RAY_ADDRESS.")
    _cli.add_version_flag(p)
    _cli.add_config_flags(
        p, dataset_help="registry name (gesture, awr, ...), UEA/UCR archive name, or a folder; "
                        "several separated by commas (gesture,awr,fm) search one configuration "
                        "on all of them, scored by the mean of their CV accuracies")
    p.add_argument("--space",
                   help="search space YAML, or a name in search_spaces/ (default, paper, smoke)")
    p.add_argument("--num-samples", type=int, help="trials to run (default %(default)s)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--workers-per-trial", type=int, help="data-parallel workers")
    _cli.add_worker_flags(p, gpus_default="%(default)s")
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler, seeded (default %(default)s)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="asha stops weak trials on their intermediate reports (default: asha "
                        "for one dataset; none for several, where a trial reports once at its "
                        "end and asha is refused)")
    p.add_argument("--metric", help="what to optimise (default %(default)s); two, comma-separated "
                                    "(val_accuracy,time_total_s), search both with Optuna's "
                                    "multi-objective sampler and rank trials by the first")
    p.add_argument("--mode", help="max or min, one per metric (default: min for losses and "
                                  "time_total_s, else max)")
    _cli.add_mlflow_flags(p)
    p.add_argument("--name", help="search name: Tune run and results folder "
                                  "(default <dataset>-<space>, suffixed -2, -3... when taken)")
    _add_run_flags(p)
    p.set_defaults(**SearchSettings.defaults())  # one place for every default: the settings
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the search runs and stores, what it does after, and encoder reuse."""
    p.add_argument("--storage",
                   help="Ray storage: a folder or s3:// / gs:// URI (default ~/ray_results)")
    p.add_argument("--results-dir", help="where <results-dir>/<dataset>/<name> goes (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest search of this name from its storage (an "
                        "interrupted search prints the exact command)")
    p.add_argument("--overwrite", action="store_true",
                   help="use --name (or the default name) even if a search of that name exists: "
                        "its results files are replaced and Tune starts a new experiment in its "
                        "storage (ignored with --resume)")
    p.add_argument("--cv-folds", type=int,
                   help="k of the stratified k-fold cross-validation each trial is scored by "
                        "(default: the space's, 5; at most the training series of a "
                        "dataset's largest class); 0 = one validation split (large datasets)")
    p.add_argument("--cv-repeats", type=int,
                   help="repeat the k folds with fresh shuffles (tiny datasets; default 1)")
    p.add_argument("--refit-top", type=int,
                   help="refit the best N configurations on all training series (default %(default)s; "
                        "0 = no refit, no model)")
    p.add_argument("--refit-seeds", type=int,
                   help="seeds per refit configuration (default %(default)s); the model is the ensemble")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not run the paper's configuration as the first trial")
    p.add_argument("--max-failures", type=int,
                   help="retries of a trial (and of its worker group) after a failure (default %(default)s)")
    p.add_argument("--allow-autoscale", action="store_true",
                   help="skip the resource check: the cluster's autoscaler will add nodes")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop starting and running trials after this long (90m, 2h, 3600s); "
                        "the trials that ended are refit as usual")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray Tune's trial table (default: one line per finished trial)")
    p.add_argument("--no-reuse", action="store_true",
                   help="pretrain every trial: no encoder cache, no trials on known encoders")
    p.add_argument("--encoder-cache", metavar="PATH_OR_URI",
                   help="where pretrained encoders are stored and reused, a folder or s3:// / "
                        "gs:// URI (default <storage>/encoders)")
    p.add_argument("--reuse-share", type=float,
                   help="the most trials Optuna proposes on an already pretrained encoder, "
                        "as a share of all (default %(default)s)")


# ---- checks before Ray starts ----------------------------------------------------------------


def check_storage(storage: str | None, *, option: str = "--storage") -> None:
    """Fail before Ray starts when Tune could not write under a local ``--storage`` folder (or
    the trials under ``option``'s, e.g. ``--encoder-cache``).

    Raises:
        CbdtuneError: the nearest existing folder on the way is a file or is read-only.
    """
    if storage and "://" in storage:
        return  # a cloud URI: Ray's pyarrow filesystem reports its own errors
    flag = f"{option} {storage}" if storage else "the Ray storage ~/ray_results"
    path = Path(storage or "~/ray_results").expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CbdtuneError(f"{flag}: {existing} is a file, not a folder; pass a folder path")
    if not tracking.is_writable(existing):
        raise CbdtuneError(f"{flag}: {existing} is read-only; pass a writable folder")


def check_encoder_cache(settings: SearchSettings) -> None:
    """Fail before Ray starts when the trials could not store encoders: a local cache folder
    (``<root>/encoders``, :func:`encoder_root`) that exists read-only, or is a file.

    Raises:
        CbdtuneError: one line naming the folder and the ways out.
    """
    root = encoder_root(settings)
    if root is None or "://" in root:
        return
    from cbdtune.encoder_cache import ENCODERS

    folder = Path(root) / ENCODERS
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if existing.is_dir() and tracking.is_writable(existing):
        return
    what = "is a file, not a folder" if not existing.is_dir() else "is read-only"
    raise CbdtuneError(f"encoder cache {shown_path(str(folder))}: {shown_path(str(existing))} "
                       f"{what}; make it a writable folder, pass --encoder-cache with another "
                       "folder, or --no-reuse")


def check_cv_folds(base: ExperimentConfig, datasets: dict[str, Any], *, given: bool,
                   space: str) -> None:
    """Fail before Ray starts when ``data.cv_folds`` asks for more folds than a dataset can
    give: stratified k-fold (``data.stratified_folds``) would run only as many folds as its
    largest class has training series, while the summary and MLflow record the k asked.

    Args:
        base: the search's base config (``data.cv_folds`` from ``--cv-folds`` or the space).
        datasets: the loaded datasets, by slug.
        given: whether ``--cv-folds`` set it (else the space did).
        space: the space, for the message.

    Raises:
        CbdtuneError: one line naming the dataset, the most folds it allows and the fix.
    """
    k = base.data.cv_folds
    if not k:
        return
    for data in datasets.values():
        most = int(np.bincount(np.asarray(data.train.y, dtype=np.int64)).max())
        if k > most:
            where = f"--cv-folds {k}" if given else f"data.cv_folds {k} (space {space})"
            raise CbdtuneError(
                f"{where}: {data.name} has at most {most} training series in a class, so "
                f"stratified cross-validation runs at most {most} folds; pass --cv-folds "
                f"{most} or fewer (0 = one validation split)")


def shown_path(given: str, resolved: str | Path | None = None) -> str:
    """A path for summaries and MLflow params: relative to the working directory when it lies
    inside it, else as the user gave it (no absolute path of this machine by default)."""
    target = Path(resolved if resolved is not None else given).expanduser()
    cwd = Path.cwd()
    for candidate in (target.absolute(), target.resolve()):
        if candidate.is_relative_to(cwd):
            return candidate.relative_to(cwd).as_posix()
    return given


def max_reports(cfg: ExperimentConfig, space: SearchSpace | None = None) -> int:
    """How many results one trial of the space reports at most: the pipeline's report budget
    (:func:`cbdtune.reports.report_budget`) with searched epoch counts at their upper bound and
    ``train.classifier`` at ``both`` when searched. ASHA stops every trial at ``max_t``, so it
    must not fall short of a trial's last (final) report."""
    for p in space.params if space else ():
        if p.key.startswith("train.") and p.key.endswith("epochs") and p.high is not None:
            cfg = cfg.replace({p.key: int(p.high)})
        if p.key == "train.classifier" and "both" in (p.choices or ()):
            cfg = cfg.replace({p.key: "both"})
    return reports.report_budget(cfg)


# ---- Ray side ---------------------------------------------------------------------------------


def check_resources(settings: SearchSettings) -> int:
    """Fail fast when not even one trial fits the cluster; return how many trials fit at once."""
    import ray

    need_cpu = settings.cpus_per_worker
    need_gpu = settings.gpus_per_worker
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(r.get("CPU", 0.0) for r in nodes)
    total_gpu = sum(r.get("GPU", 0.0) for r in nodes)
    fits_one_worker = any(r.get("CPU", 0.0) >= need_cpu and r.get("GPU", 0.0) >= need_gpu
                          for r in nodes)
    workers = settings.workers_per_trial
    if not settings.allow_autoscale and (
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


def _sampler(name: str, seed: int, space: SearchSpace) -> Any:
    import optuna

    if name == "grid":  # every point once, in an order shuffled by the seed
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def make_searcher(space: SearchSpace, *, sampler: str, seed: int, metric: str | list[str],
                  mode: str | list[str], max_concurrent: int, baseline: bool = True,
                  reuse_share: float = 0.0) -> Any:
    """Optuna over the space, sampled define-by-run, limited to ``max_concurrent``.

    ``metric`` and ``mode`` may be lists of two: a multi-objective study (one value per metric;
    a list of one is the single-objective study).

    :meth:`SearchSpace.define_by_run` suggests only the parameters whose ``when`` holds, named
    ``train_loop_config/<key>`` so that each trial's config nests them as the trainable expects.
    Trials ASHA stopped reach Optuna as PRUNED, not COMPLETE (:mod:`cbdtune.searcher`). With
    ``baseline`` the paper's configuration is the first trial (``points_to_evaluate``). Up to
    ``reuse_share`` of the trials fix a good trial's pretraining parameters and sample the rest.
    """
    from ray.tune.search import ConcurrencyLimiter

    from cbdtune.searcher import FullFidelityOptunaSearch

    points = [baseline_point(space)] if baseline and space.params else None
    if isinstance(metric, list) and len(metric) == 1:
        metric = metric[0]
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    searcher = FullFidelityOptunaSearch(space=space.define_by_run, metric=metric, mode=mode,
                                        sampler=_sampler(sampler, seed, space),
                                        points_to_evaluate=points, reuse_share=reuse_share)
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


def trial_settings(settings: SearchSettings, storage: str | None) -> Any:
    """The run-level settings every trial of this search runs with (the worker's
    :class:`~cbdtune.worker.TrialSettings`, built from the search's settings only)."""
    from cbdtune.worker import TrialSettings

    return TrialSettings(workers=settings.workers_per_trial,
                         cpus_per_worker=settings.cpus_per_worker,
                         gpus_per_worker=settings.gpus_per_worker,
                         max_failures=settings.max_failures, storage_path=storage,
                         encoder_cache=encoder_root(settings))


def encoder_root(settings: SearchSettings) -> str | None:
    """The encoder cache's root (``--encoder-cache``, else the Ray storage root: the entries go
    to ``<root>/encoders``, next to the searches of that storage, which share them); None with
    ``--no-reuse``."""
    if not settings.reuse:
        return None
    given = settings.encoder_cache
    if given:
        return given if "://" in given else str(Path(given).expanduser().resolve())
    return _storage_root(settings)


def param_space(settings: SearchSettings, storage: str | None) -> dict[str, Any]:
    """Run-level settings at the top; the searcher fills ``train_loop_config`` in each trial.

    Nothing here is a distribution: Tune refuses one in ``param_space`` when the searcher has its
    own space. Tune deep-merges each suggestion into this dict (``SearchGenerator``), so a trial
    with no parameter sampled still gets an empty ``train_loop_config``.
    """
    return trial_settings(settings, storage).param_space()


def _storage_root(settings: SearchSettings) -> str:
    if settings.storage:
        storage = settings.storage
        return storage if "://" in storage else str(Path(storage).resolve())
    return str(Path("~/ray_results").expanduser())


def _search_name(settings: SearchSettings, root: str, stem: str, *, results_dir: Path) -> str:
    """The search's name, decided once for its Ray storage and its results folder.

    ``--name``, else ``<dataset>-<space>``. A name is taken when ``{root}/{name}`` holds a Tune
    experiment or ``{results_dir}/{name}`` is a non-empty folder. A fresh search takes the first
    free one of ``name``, ``name-2``, ``name-3``...; ``--resume`` the latest taken one that Tune
    can restore; ``--overwrite`` (ignored with ``--resume``) ``name`` itself, taken or not.

    Args:
        settings: the search's ``name``, ``dataset``, ``resume`` and ``overwrite``.
        root: the Ray storage root (a folder or a URI).
        stem: the space file's stem, for the default name.
        results_dir: the dataset's results folder, ``<--results-dir>/<dataset name>``.

    Raises:
        CbdtuneError: ``--resume`` with no restorable search of this name.
    """
    from ray import tune

    base = settings.name or f"{'+'.join(settings.datasets)}-{stem}"
    names = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    taken: list[str] = []
    restorable: list[str] = []
    for name in names:
        if tune.Tuner.can_restore(f"{root}/{name}"):
            restorable.append(name)
        elif not _has_results(results_dir / name):
            break
        taken.append(name)
    if settings.resume:
        if not restorable:
            raise CbdtuneError(f"--resume: no search named {base} in {root}; run it without "
                               "--resume first, or pass --name/--storage")
        return restorable[-1]
    if settings.overwrite:
        return base
    return names[len(taken)]


def _has_results(folder: Path) -> bool:
    """True when ``folder`` exists and is not an empty folder (a file there counts too)."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _parent_run(mlc: Any, exp_id: str, name: str, resume: bool, tags: dict[str, Any],
                params: dict[str, Any]) -> tuple[str, bool]:
    """The search's parent run (the latest of this name with ``--resume``), and whether it is
    new."""
    if resume:
        found = mlc.search_runs([exp_id], filter_string=f"tags.`{tracking.SEARCH_TAG}` = '{name}' and "
                                              f"tags.`{tracking.ROLE_TAG}` = "
                                              f"'{tracking.ROLE_SEARCH}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            tracking.reopen_run(mlc, found[0].info.run_id)
            return found[0].info.run_id, False
    run = mlc.create_run(exp_id, run_name=name,
                         tags={tracking.SEARCH_TAG: name,
                               tracking.ROLE_TAG: tracking.ROLE_SEARCH, **tags})
    tracking.log_params(mlc, run.info.run_id, params)
    return run.info.run_id, True


def _describe_parent(s: _Search) -> None:
    """What a new parent run carries besides params: the space file and the dataset (a failure
    here is logged and tagged; it never stops the search)."""
    try:
        with resources.as_file(resolve_path(s.settings.space)) as path:
            s.mlc.log_artifact(s.parent, str(path), artifact_path="space")
        for slug, data in s.datasets.items():
            digest = tracking.log_dataset(s.mlc, s.parent, data)
            tag = tracking.DATASET_SHA256_TAG + (f".{slug}" if s.multi else "")
            tracking.set_tags(s.mlc, s.parent, {tag: digest})
    except Exception as exc:
        log.warning("space file or dataset not logged on the parent run: %s", _first_line(exc))
        tracking.set_tags(s.mlc, s.parent, {tracking.DESCRIBE_ERROR_TAG: _first_line(exc)})


def _inputs(settings: SearchSettings) -> tuple[SearchSpace, ExperimentConfig, dict[str, Any],
                                               str]:
    """Everything checked before Ray starts (the settings checked themselves): space, config,
    datasets (by slug, in the order given), MLflow, storage, results."""
    space = load_space(settings.space)
    if settings.sampler == "grid":
        space.grid()  # a space with no grid fails here, in one line
    late: dict[str, Any] = {"data.dataset": settings.dataset}
    if settings.data_dir:
        late["data.data_dir"] = shown_path(settings.data_dir)
    if settings.seed is not None:
        late["train.seed"] = settings.seed
    if settings.cv_folds is not None:
        late["data.cv_folds"] = settings.cv_folds
    if settings.cv_repeats is not None:
        late["data.cv_repeats"] = settings.cv_repeats
    base = space.base.replace(late, where="command line")
    results.check_results_dir(Path(settings.results_dir))
    check_storage(settings.storage)
    if settings.reuse and settings.encoder_cache:
        check_storage(settings.encoder_cache, option="--encoder-cache")
    check_encoder_cache(settings)
    datasets = _load_datasets(settings, base)
    check_cv_folds(base, datasets, given=settings.cv_folds is not None, space=settings.space)
    uri = tracking.resolve_tracking_uri(settings.mlflow_uri)
    tracking.check_tracking_uri(uri, writable=True)
    return space, base, datasets, uri


def _load_datasets(settings: SearchSettings, base: ExperimentConfig) -> dict[str, Any]:
    """Each dataset of ``--dataset`` loaded, by slug (:func:`_dataset_slug`).

    Raises:
        CbdtuneError: a name that does not load (the loader's line), or two names of one
            dataset (gesture,uwave).
    """
    out: dict[str, Any] = {}
    for name in settings.datasets:
        data = load_dataset(base.replace({"data.dataset": name}, where="--dataset").data,
                            seed=base.train.seed)
        same = [s for s, d in out.items() if d.name == data.name]
        if same:
            raise CbdtuneError(f"--dataset {settings.dataset}: {same[0]} and {name} are one "
                               f"dataset ({data.name}); name it once")
        out[_dataset_slug(name, data.name)] = data
    return out


def _scheduler(settings: SearchSettings, base: ExperimentConfig, space: SearchSpace) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler != "asha":
        return FIFOScheduler()
    # First rung after a third of the pretraining probes (short cross-validated linear probes),
    # then x3 per rung; rungs in the classifier stage compare the mean CV curve's best point.
    # The time attribute is the trial's own report count: a resumed trial continues it (worker.py).
    max_t = max_reports(base, space) + 1
    grace = max(1, math.ceil(reports.probe_count(base.train) / 3))
    return ASHAScheduler(time_attr=reports.ITERATION, max_t=max_t,
                         grace_period=max(1, min(grace, max_t)), reduction_factor=3)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@dataclass
class _Search:
    """One invocation of the search, filled in as Ray and MLflow are set up."""

    settings: SearchSettings
    space: SearchSpace
    base: ExperimentConfig
    datasets: dict[str, Any]  # slug -> Dataset, in the order of --dataset
    uri: str
    argv: list[str]
    metric: str = METRIC
    mode: str = MODE
    where: str = ""  # "local" or "cluster"
    root: str = ""  # Ray storage root
    name: str = ""  # the search's name: Tune experiment, results folder, Optuna study
    max_concurrent: int = 1
    mlc: Any = None
    exp_id: str = ""
    parent: str = ""  # the parent MLflow run
    header: dict[str, Any] = field(default_factory=dict)
    trials: Any = None  # the trials' DataFrame, once Tune returned
    best: Any = None  # the best completed trial's row
    study_url: str | None = None
    model_dir: Path | None = None
    registering: tuple[str, int] | None = None  # registered model name, ms since the epoch

    @property
    def command(self) -> str:
        return " ".join([_cli.prog("cbdtune.search"), *map(shlex.quote, self.argv)])

    @property
    def multi(self) -> bool:
        """A multi-dataset search (``--dataset a,b``)."""
        return len(self.datasets) > 1

    @property
    def data(self) -> Any:
        """The dataset of a single-dataset search."""
        [data] = self.datasets.values()
        return data

    @property
    def label(self) -> str:
        """The dataset's name (gesture's is UWaveGestureLibrary); for several, their slugs
        joined by ``+``: the results folder and the default experiment name."""
        return "+".join(self.datasets) if self.multi else self.data.name

    @property
    def slugs(self) -> tuple[str, ...]:
        """The datasets' slugs of a multi-dataset search (their metrics' prefixes); () for one."""
        return tuple(self.datasets) if self.multi else ()

    @property
    def out_dir(self) -> Path:
        return Path(self.settings.results_dir) / self.label / self.name

    @property
    def experiment_path(self) -> str:
        """Tune's experiment folder (or URI): ``{storage root}/{name}``."""
        return f"{self.root}/{self.name}"


@dataclass(frozen=True)
class SearchResult:
    """What a search leaves (:func:`run_search`).

    ``trials`` is ``trials.parquet`` as a DataFrame (empty when the search stopped before Tune
    returned); ``best_trial`` and ``best_value`` are the best *completed* trial's id and
    ``metric``. ``storage_path`` is Tune's experiment (``--resume`` continues it), ``results_dir``
    the search's results folder, ``mlflow_run_id`` the parent run in ``mlflow_uri``.
    """

    name: str
    status: str  # "finished" | "interrupted"
    exit_code: int  # 0 finished, EXIT_INTERRUPTED (130) interrupted
    metric: str
    mode: str
    trials: Any  # pandas.DataFrame
    best_trial: str | None
    best_value: float | None
    results_dir: Path
    storage_path: str
    mlflow_uri: str
    mlflow_run_id: str
    study_url: str | None = None  # the Optuna study (optuna-dashboard <url>)
    model_dir: Path | None = None  # the refit ensemble (None without refits)


def run_search(settings: SearchSettings, *, argv: list[str] | None = None) -> SearchResult:
    """Run one search to the end, or until Ctrl-C (``status="interrupted"``, exit code 130).

    Once the parent MLflow run exists, every way out ends it: FINISHED, KILLED (Ctrl-C; the
    trials that had not finished end KILLED too) or FAILED (an exception, its first line in the
    tag :data:`~cbdtune.tracking.REASON_TAG`, and the exception propagates), and the ``--resume`` command is
    printed whenever Tune can continue. Ctrl-C works in every phase (trials, refits,
    registration: :func:`_fit`), and a search that does not finish leaves no registered model
    version (:func:`_withdraw_model`).

    Args:
        settings: the search (validated when it was built).
        argv: the command line as typed, for the summary and the ``--resume`` hint; default:
            the flags that give ``settings`` (:meth:`SearchSettings.to_argv`).

    Raises:
        CbdtuneError: an input that fails its check before Ray starts (space, dataset, MLflow
            store, storage, results folder, resources), with one line saying what to do.
    """
    # [1] Validate everything before Ray starts: bad input costs nothing.
    space, base, datasets, uri = _inputs(settings)
    s = _Search(settings, space, base, datasets, uri,
                list(settings.to_argv() if argv is None else argv),
                metric=settings.objectives[0], mode=settings.modes[0])
    # [2] Name the search (a --resume with nothing to resume fails here), then Ray: join a
    # cluster or start one; check that one trial fits.
    _name(s)
    _connect(s)
    status, reason, code = "FAILED", "the search driver stopped", EXIT_INTERRUPTED
    try:
        # [3] MLflow: a parent run for the search (reused by --resume).
        _open_parent(s)
        code = _search(s)
        status, reason = ("KILLED", "interrupted (Ctrl-C)") if code else ("FINISHED", "")
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's loop (refits)
        status, reason, code = "KILLED", "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    except BaseException as exc:
        reason = _first_line(exc)
        raise
    finally:
        if status != "FINISHED":
            _withdraw_model(s)
        _close(s, status, reason)
    return _result(s, code)


def _withdraw_model(s: _Search) -> None:
    """Delete the model versions this invocation registered (a search that did not finish
    registers nothing, whole or half: ``--resume`` registers its model when it finishes), and
    the registered model itself when this invocation created it and no version is left."""
    if s.registering is None or not s.parent:
        return
    name, since = s.registering
    try:
        from mlflow.tracking import MlflowClient

        mlc = MlflowClient(tracking_uri=s.uri, registry_uri=s.uri)
        for v in mlc.search_model_versions(f"name = '{name}'"):
            if v.creation_timestamp >= since and v.run_id in (s.parent, None, ""):
                mlc.delete_model_version(name, v.version)
                log.warning("model %s version %s withdrawn: the search did not finish", name,
                            v.version)
        model = mlc.get_registered_model(name)
        if model.creation_timestamp >= since and not mlc.search_model_versions(
                f"name = '{name}'"):
            mlc.delete_registered_model(name)
    except Exception as exc:  # noqa: BLE001 (MLflow failing must not hide why the search ended)
        log.warning("registered model %s not checked for versions of this search: %s", name,
                    _first_line(exc))


def _result(s: _Search, code: int) -> SearchResult:
    import pandas as pd

    best = s.best
    return SearchResult(
        name=s.name, status="interrupted" if code else "finished", exit_code=code,
        metric=s.metric, mode=s.mode,
        trials=s.trials if s.trials is not None else pd.DataFrame(),
        best_trial=None if best is None else str(best["trial_id"]),
        best_value=None if best is None else float(best[s.metric]),
        results_dir=s.out_dir, storage_path=s.experiment_path, mlflow_uri=s.uri,
        mlflow_run_id=s.parent, study_url=s.study_url, model_dir=s.model_dir)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The command line: its flags as :class:`SearchSettings`, then :func:`run_search`; 0 when
    the search finished, 130 when it was interrupted."""
    settings = SearchSettings.from_args(args)
    return run_search(settings, argv=list(sys.argv[1:] if argv is None else argv)).exit_code


def _name(s: _Search) -> None:
    """The storage root and the search's name, before Ray starts (Tune reads an experiment's
    files without a running Ray)."""
    st = s.settings
    s.root = _storage_root(st)
    s.name = _search_name(st, s.root, Path(s.space.path).stem,
                          results_dir=Path(st.results_dir) / s.label)


def _connect(s: _Search) -> None:
    """Start or join Ray and check that one trial fits."""
    import ray

    from cbdtune.worker import connect

    st = s.settings
    s.where = connect(st.address)
    fits = check_resources(st)  # trainers at once; a multi-dataset trial runs one per dataset
    s.max_concurrent = st.max_concurrent or min(max(1, fits // len(s.datasets)), st.num_samples)
    log.info("search %s: %d trials, %d at once, on a %s Ray (%s); storage %s", s.name,
             st.num_samples, s.max_concurrent, s.where, ray.cluster_resources(),
             s.experiment_path)
    if st.resume and (st.time_budget or st.verbose):
        log.warning("--resume: Tune restores the search's first RunConfig and TuneConfig, so "
                    "--time-budget and --verbose keep the values of its first run")


def _open_parent(s: _Search) -> None:
    """The parent MLflow run: params (no absolute path of this machine), the space file and the
    dataset on a new one; a resumed search reopens its own."""
    s.mlc = tracking.client(s.uri)
    s.exp_id = tracking.experiment_id(
        s.mlc, s.settings.experiment or tracking.default_experiment(s.label))
    a, base = s.settings, s.base
    s.header = {"dataset": s.label, "space": shown_path(a.space, s.space.path),
                "space_sha256": s.space.sha256, "git_commit": tracking.git_commit(),
                "sampler": a.sampler, "scheduler": a.scheduler, "seed": base.train.seed,
                "metric": a.metric, "mode": a.mode, "cv_folds": base.data.cv_folds,
                "cv_repeats": base.data.cv_repeats, "num_samples": a.num_samples,
                "workers_per_trial": a.workers_per_trial, "gpus_per_worker": a.gpus_per_worker,
                "time_budget": a.time_budget or "none"}
    for run_id in tracking.end_orphaned_searches(s.mlc, s.exp_id):
        log.warning("MLflow run %s: its search driver died; ended FAILED", run_id)
    s.parent, created = _parent_run(s.mlc, s.exp_id, s.name, a.resume,
                                    {tracking.COMMAND_TAG: s.command}, s.header)
    tracking.set_tags(s.mlc, s.parent, {tracking.DRIVER_TAG: tracking.driver_id()})
    if created:
        _describe_parent(s)


def _search(s: _Search) -> int:
    """Tune, the results, the views, the refits; 130 when the search was cut short."""
    import ray

    # [4] Tune: each dataset goes to the object store once, for every trial, refit and worker.
    refs = {slug: ray.put(data) for slug, data in s.datasets.items()}
    t0 = time.perf_counter()
    grid = _fit(_tuner(s, refs))
    wall = time.perf_counter() - t0
    # [5] Results. Which trials ended is read from what Tune persisted: after Ctrl-C, Ray 2.60
    # marks every trial TERMINATED in memory, but its experiment state on disk keeps them
    # RUNNING/PENDING (it is written before the trials are stopped).
    states = persisted_trial_states(s.experiment_path) or _memory_states(grid)
    rows, curves = _rows(grid, states, s.metric, s.slugs)
    s.trials = df = results.trials_frame(rows)
    interrupted = _interrupted(s.settings, df, wall)
    s.header.update({"wall_s": round(wall, 1), "ray": s.where})
    write = dict(space=s.space, base=s.base, metric=s.metric, mode=s.mode, command=s.command,
                 header=s.header, datasets=s.slugs,
                 objectives=dict(zip(s.settings.objectives, s.settings.modes, strict=True)))
    paths = results.write(s.out_dir, df, **write)
    s.best = best = results.best_trial(df, s.metric, s.mode)
    _log_best(s, df, best)
    s.study_url = study_url = _log_views(s, df, curves)
    if best is not None and s.settings.refit_top and not interrupted and s.multi:
        print(f"no refit or model: refit and registry are per dataset; for one of them run a "
              f"single-dataset search of the winner, e.g. --dataset {s.settings.datasets[0]} "
              f"--space {s.out_dir / 'best_config.yaml'} --num-samples 1", flush=True)
    elif best is not None and s.settings.refit_top and not interrupted:
        top = results.ranked(df, s.metric, s.mode).head(s.settings.refit_top)
        outcome = _refit_and_register(s, top, refs[next(iter(refs))])
        s.model_dir = outcome["model_dir"]
        paths = results.write(s.out_dir, df, refits=outcome, **write)
    for path in paths.values():
        s.mlc.log_artifact(s.parent, str(path))
    _print_best(df, best, s.metric, s.out_dir, time.perf_counter() - t0, s.name, s.slugs)
    if study_url:
        print(f"optuna study {s.name}: optuna-dashboard {_shown_url(study_url)}", flush=True)
    if interrupted:
        print(f"search {s.name} stopped before its {s.settings.num_samples} trials finished",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, with the signal handlers it found put back when it returns.

    Ray 2.60's Tune installs its own SIGINT (and SIGUSR1) handler for the run
    (``tune.py: _setup_signal_catching``) and restores the previous one only when that handler
    fires: after a run that ended by itself, a Ctrl-C during the refits or the registration only
    set an event nobody reads, and the search went on to finish. Put back, Ctrl-C raises
    ``KeyboardInterrupt`` there again (Python's ``default_int_handler`` where none was set from
    Python).
    """
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()  # Tune installs no handler off the main thread
    saved = {sig: signal.getsignal(sig) for sig in _TUNE_SIGNALS}
    try:
        return tuner.fit()
    finally:
        for sig, handler in saved.items():
            fallback = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler if handler is not None else fallback)


_TUNE_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n))


def _interrupted(settings: SearchSettings, df: Any, wall: float) -> bool:
    """A trial did not end, or fewer trials ran than asked and no time budget ran out."""
    if "status" in df and bool((df["status"] == "unfinished").any()):
        return True
    budget = settings.time_budget_s or math.inf
    return len(df) < settings.num_samples and wall < budget


def _log_best(s: _Search, df: Any, best: Any) -> None:
    """The best completed trial's metrics on the parent run (step = trials in the table)."""
    if best is None:
        return
    keys = (reports.VAL_ACCURACY, reports.VAL_ACCURACY_SE, reports.VAL_F1,
            reports.TEST_ACCURACY, reports.TEST_F1,
            *(reports.dataset_metric(d, k) for d in s.slugs
              for k in (reports.VAL_ACCURACY, reports.TEST_ACCURACY)))
    tracking.log_metrics(s.mlc, s.parent, {f"best_{k}": best.get(k) for k in keys if k in best},
                         step=len(df))
    tracking.set_tags(s.mlc, s.parent, {tracking.BEST_TRIAL_TAG: best["trial_id"]})


def _log_views(s: _Search, df: Any, curves: dict[str, dict[int, float]]) -> str | None:
    """Export the trials as an Optuna study and log Optuna's figures on the parent run; returns
    the study's storage URL (None when that failed: views never fail a search)."""
    from cbdtune import views

    url = views.study_storage(s.uri, Path(s.settings.results_dir))
    try:
        study = views.export_study(df, curves, s.space, storage=url, study_name=s.name,
                                   metric=s.metric, mode=s.mode)
        views.log_views(s.mlc, s.parent, study)
    except Exception as exc:
        log.warning("optuna study and views not written: %s", _first_line(exc))
        tracking.set_tags(s.mlc, s.parent, {tracking.VIEWS_ERROR_TAG: _first_line(exc)})
        return None
    tracking.set_tags(s.mlc, s.parent, {tracking.OPTUNA_STORAGE_TAG: _shown_url(url),
                                        tracking.OPTUNA_STUDY_TAG: s.name})
    return url


def _shown_url(url: str) -> str:
    """``sqlite:///<abs>`` as ``sqlite:///<path relative to the working directory>`` inside it."""
    path = url[len("sqlite:///"):]
    shown = shown_path(path)
    return f"sqlite:///{shown}" if shown != path else url


def _close(s: _Search, status: str, reason: str) -> None:
    """End the trial runs left RUNNING (KILLED) and the parent run; print how to continue."""
    if not s.parent:
        return
    try:
        tracking.end_open_runs(s.mlc, s.exp_id, s.parent, status="KILLED",
                               reason=tracking.TRIAL_INTERRUPTED)
        if reason:
            tracking.set_tags(s.mlc, s.parent, {tracking.REASON_TAG: reason})
        s.mlc.set_terminated(s.parent, status=status)
    except Exception as exc:  # MLflow itself failing must not hide why the search ended
        log.warning("MLflow runs of search %s not ended: %s", s.name, _first_line(exc))
    if status != "FINISHED" and _restorable(s.experiment_path):
        print(f"search {s.name} {'interrupted' if status == 'KILLED' else 'failed'}; continue "
              f"it with:\n  {resume_command(s.argv, s.name)}", file=sys.stderr, flush=True)


def _restorable(path: str) -> bool:
    """Whether ``--resume`` could continue the Tune experiment at ``path``."""
    try:
        from ray import tune

        return bool(tune.Tuner.can_restore(path))
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def resume_command(argv: list[str], name: str) -> str:
    """The command that continues this search: its own flags, ``--name <name> --resume``
    (``--overwrite`` and any earlier ``--name``/``--resume`` dropped)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--name":
            skip = True
        elif arg not in ("--resume", "--overwrite") and not arg.startswith("--name="):
            kept.append(arg)
    return " ".join([_cli.prog("cbdtune.search"), *map(shlex.quote, kept), "--name",
                     shlex.quote(name), "--resume"])


def _tuner(s: _Search, refs: dict[str, Any]) -> Any:
    """The Tuner (fresh, or restored from storage with ``--resume``); ``refs``: each dataset's
    object ref, by slug."""
    from ray import tune

    from cbdtune.callbacks import MLflowTrialCallback, ProgressCallback, SchedulerStateCallback
    from cbdtune.worker import multi_driver_fn, train_driver_fn

    st = s.settings
    if s.multi:  # one TorchTrainer per dataset, the trial reports their aggregate once
        given = dict(zip(s.datasets, st.datasets, strict=True))
        driver = tune.with_parameters(
            multi_driver_fn, datasets=[{slug: (given[slug], ref) for slug, ref in refs.items()}],
            base=s.base.to_dict(), search=s.name)
    else:
        driver = tune.with_parameters(train_driver_fn, data_ref=list(refs.values()),
                                      base=s.base.to_dict(), search=s.name)
    # drivers must not hold the CPUs workers need
    trainable = tune.with_resources(driver, {"cpu": 0, "memory": DRIVER_MEMORY})
    settings = param_space(st, f"{s.experiment_path}/train")
    # Quiet unless --verbose: Ray 2.60's default output engine ignores a progress_reporter
    # passed in (tune.py: "ignoring passed-in ProgressReporter"), and at verbose=0
    # (AirVerbosity.SILENT) it still prints the experiment's configuration box. The legacy
    # engine (RAY_AIR_NEW_OUTPUT=0, read by tune.run) prints nothing at verbose=0, its CLIReporter
    # included. A user's own RAY_AIR_NEW_OUTPUT wins.
    if not st.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if st.resume:
        # ASHA's rungs come back through SchedulerStateCallback's state; a resumed unfinished
        # trial continues its own training_iteration (the worker reports it: worker.Reporter).
        return tune.Tuner.restore(s.experiment_path, trainable, resume_errored=True,
                                  param_space=settings)
    scheduler = _scheduler(st, s.base, s.space)
    callbacks = [MLflowTrialCallback(s.uri, s.exp_id, s.parent, s.base, s.metric, s.mode),
                 ProgressCallback(st.num_samples, s.metric, s.mode),
                 SchedulerStateCallback(scheduler)]
    # Tune checkpoints the experiment (searcher, callbacks) into storage: --resume.
    run_config = tune.RunConfig(
        name=s.name, storage_path=s.root, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=st.max_failures),
        verbose=1 if st.verbose else 0)
    tune_config = tune.TuneConfig(
        metric=s.metric, mode=s.mode, num_samples=st.num_samples, scheduler=scheduler,
        search_alg=make_searcher(s.space, sampler=st.sampler, seed=s.base.train.seed,
                                 metric=list(st.objectives), mode=list(st.modes),
                                 max_concurrent=s.max_concurrent,
                                 baseline=st.baseline,
                                 # a grid visits each point once: no repeated encoders
                                 reuse_share=st.reuse_share
                                 if st.reuse and st.sampler != "grid" else 0.0),
        time_budget_s=st.time_budget_s,
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    return tune.Tuner(trainable, param_space=settings, tune_config=tune_config,
                      run_config=run_config)


def _refit_and_register(s: _Search, top: Any, data_ref: Any) -> dict[str, Any]:
    """Refit the top configurations, save and register their ensemble; the summary's numbers."""
    from cbdtune import refit, serving

    data, uri, parent = s.data, s.uri, s.parent
    trainer_args = trial_settings(s.settings, f"{s.experiment_path}/refit").trainer_args()
    refits = refit.run(top, s.base, data_ref, seeds=s.settings.refit_seeds,
                       trainer_args=trainer_args)
    y_test = data.test.y if data.test is not None else None
    configs = refit.summarise(top, refits, y_test, s.metric)
    members = [(ExperimentConfig.from_dict(r.config, where="refit"), r.weights,
                {"rank": r.rank, "source_trial": r.trial_id, "seed": r.seed})
               for r in refits]
    # A model folder already there is this search's own, from a run that was interrupted
    # before it finished (--resume) or from the search --overwrite replaces.
    model_dir = serving.save_model(s.out_dir / "model", members, class_names=data.class_names,
                                   dataset=data.name,
                                   overwrite=s.settings.resume or s.settings.overwrite)
    ensemble = serving.CBDEnsemble.load(model_dir)
    outcome: dict[str, Any] = {"configs": [c.row() for c in configs], "members": len(refits),
                               "model_dir": model_dir}
    if data.test is not None:  # the ensemble reads test once, through the code users load
        pred = ensemble.predict_proba(data.test.x).argmax(1)
        outcome["ensemble_test_accuracy"] = float(np.mean(pred == data.test.y))
    registered = f"cbdtune-{_dataset_slug(s.settings.dataset, data.name)}"
    s.registering = (registered, int(time.time() * 1000))  # withdrawn unless the search ends
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
    tracking.set_tags(mlc, parent, {tracking.MODEL_TAG: f"models:/{name}/{version}"})


def _dataset_slug(arg: str, name: str) -> str:
    """``gesture`` stays ``gesture``; a folder path becomes its dataset's name."""
    slug = name if ("/" in arg or "\\" in arg) else arg
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in slug)


def persisted_trial_states(experiment: str) -> dict[str, str]:
    """Trial id -> Tune status (``TERMINATED``, ``ERROR``, ``RUNNING``, ``PENDING``...) as the
    newest ``experiment_state-<session>.json`` in the experiment folder has it; ``{}`` when
    there is none or it cannot be read.

    That file is Ray 2.60's experiment checkpoint (``TuneController.save_to_dir``): under
    ``trial_data``, one ``[trial JSON, run metadata JSON]`` pair per trial. Session names are
    timestamps, so the greatest name is the newest, as in Ray's
    ``_find_newest_experiment_checkpoint``.

    Args:
        experiment: ``{storage}/{name}``, a folder or a ``s3://``-style URI.
    """
    import pyarrow.fs

    try:
        if "://" in experiment:
            fs, path = pyarrow.fs.FileSystem.from_uri(experiment)
        else:
            fs, path = pyarrow.fs.LocalFileSystem(), str(Path(experiment).expanduser().absolute())
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        names = sorted(i.base_name for i in infos
                       if fnmatch.fnmatch(i.base_name, "experiment_state-*.json"))
        if not names:
            return {}
        with fs.open_input_stream(f"{path}/{names[-1]}") as f:
            state = json.loads(f.readall())
        trials = (json.loads(trial_json) for trial_json, _ in state["trial_data"])
        return {t["trial_id"]: t["status"] for t in trials}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read Tune's experiment state in %s (%s); trial states from memory",
                    experiment, exc)
        return {}


def _memory_states(grid: Any) -> dict[str, str]:
    """Tune's in-memory trial states: the fallback when the state file cannot be read."""
    return {t.trial_id: t.status for t in grid._experiment_analysis.trials}


def _rows(grid: Any, states: dict[str, str], metric: str, datasets: tuple[str, ...] = ()
          ) -> tuple[list[dict[str, Any]], dict[str, dict[int, float]]]:
    """One row per trial of a ``ResultGrid``, and each trial's ``{iteration: metric}`` curve;
    ``datasets``: a multi-dataset search's slugs (their ``<slug>.<key>`` columns).

    A trial whose persisted state (``states``) is not TERMINATED or ERROR did not end: it is
    ``unfinished``, whatever its last result says.
    """
    rows, curves = [], {}
    for res in grid:
        last = res.metrics or {}
        trial_id = last.get("trial_id") or Path(res.path).name.removeprefix("trial_")
        status, reason = tracking.trial_status(last, errored=res.error is not None,
                                               error=str(res.error or ""))
        if states.get(trial_id) not in ("TERMINATED", "ERROR"):
            status, reason = "unfinished", tracking.TRIAL_INTERRUPTED
        params = (res.config or {}).get("train_loop_config", {})
        rows.append(results.trial_row(trial_id, params, last, status, reason, datasets))
        curves[trial_id] = _curve(res.metrics_dataframe, metric)
    return rows, curves


def _curve(frame: Any, metric: str) -> dict[int, float]:
    """``{training_iteration: metric}`` of every report that has a finite ``metric``."""
    if frame is None or metric not in frame or reports.ITERATION not in frame:
        return {}
    out = {}
    for step, value in zip(frame[reports.ITERATION], frame[metric], strict=True):
        if isinstance(value, (int, float)) and math.isfinite(value) and step == step:
            out[int(step)] = float(value)
    return out


def _print_best(df: Any, best: Any, metric: str, out_dir: Path, wall: float, name: str,
                datasets: tuple[str, ...] = ()) -> None:
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    print(f"\nsearch {name}: {len(df)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
          f" in {wall:.0f} s; results in {out_dir}")
    if best is None:
        print("no trial completed")
        return
    rows = [("best trial", best["trial_id"])]
    per_dataset = [reports.dataset_metric(d, k) for d in datasets
                   for k in (reports.VAL_ACCURACY, reports.TEST_ACCURACY)]
    for key in dict.fromkeys((metric, reports.VAL_F1, reports.TEST_ACCURACY, reports.TEST_F1,
                              reports.SELECTED_STAGE, *per_dataset)):
        if key in best and best[key] == best[key]:
            value = best[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows += [(k, v) for k, v in best.items() if k.startswith("param.")]
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cli(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a tool
    argv = list(sys.argv[1:] if argv is None else argv)
    return _cli.run(functools.partial(main, argv=argv), parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
