"""The tuning phase of a search: Ray joined or started, the Tuner built and run, and Tune's
state read back into one row per trial.

:func:`connect` checks that a trial fits the cluster and puts each dataset in the object store
once; :func:`tune` runs the Tuner (fresh, or restored with ``--resume``) and returns a
:class:`Tuned`. The searcher (Optuna, :mod:`cbdtune.searcher`) and ASHA are built here;
trials log to MLflow through :mod:`cbdtune.callbacks`, under the parent run they are given.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbdtune import reports, results, stages, tracking
from cbdtune.config import CbdtuneError, ExperimentConfig, preset
from cbdtune.plan import SearchPlan, encoder_root
from cbdtune.settings import SearchSettings
from cbdtune.space import SearchSpace

log = logging.getLogger("cbdtune.search")

DRIVER_MEMORY = 256 * 1024**2  # a trial driver: its own work (one CPU worker) or a TorchTrainer's wait
KEEP_CHECKPOINTS = 2  # a trial's latest checkpoints (a TorchTrainer kept as many)
_TUNE_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGUSR1") if hasattr(signal, n))


@dataclass(frozen=True)
class Cluster:
    """The Ray the search runs on (:func:`connect`)."""

    where: str  # "local" or "cluster"
    max_concurrent: int  # trials at once
    data_refs: Mapping[str, Any]  # each dataset's object ref, by slug


@dataclass(frozen=True)
class Tuned:
    """What Tune left (:func:`tune`)."""

    trials: Any  # pandas.DataFrame, one row per trial (results.trials_frame)
    curves: dict[str, dict[int, float]]  # trial id -> {iteration: metric}
    wall_s: float  # seconds in Tune
    started: float  # time.perf_counter() when Tune started
    interrupted: bool  # a trial did not end, or fewer ran than asked (no budget ran out)


def connect(plan: SearchPlan) -> Cluster:
    """Start or join Ray, check that one trial fits, put each dataset in the object store once
    (for every trial, refit and worker)."""
    import ray

    from cbdtune.session import connect as join

    st = plan.settings
    where = join(st.address)
    fits = check_resources(st)  # trainers at once; a multi-dataset trial runs one per dataset
    at_once = trials_at_once(st, fits, len(plan.datasets), multi=plan.multi)
    log.info("search %s: %d trials, %d at once, on a %s Ray (%s); storage %s", plan.name,
             st.num_samples, at_once, where, ray.cluster_resources(), plan.experiment_path)
    if st.resume and (st.time_budget or st.verbose):
        log.warning("--resume: Tune restores the search's first RunConfig and TuneConfig, so "
                    "--time-budget and --verbose keep the values of its first run")
    refs = {slug: ray.put(data) for slug, data in plan.datasets.items()}
    return Cluster(where=where, max_concurrent=at_once, data_refs=refs)


def trials_at_once(settings: SearchSettings, fits: int, datasets: int, *, multi: bool) -> int:
    """How many trials run at once: ``--max-concurrent``, else as many as fit (at most
    ``num_samples``).

    A trial of one CPU worker reserves its CPUs (:func:`tuner`), so Ray never runs more than
    ``fits`` of them on a fixed cluster; a larger ``--max-concurrent`` would only have the
    searcher suggest configurations that wait, without the results of those running. It is
    lowered to ``fits`` then (not with ``--allow-autoscale``: nodes may come).
    """
    if not settings.max_concurrent:
        return min(max(1, fits // datasets), settings.num_samples)
    if (multi or settings.allow_autoscale or settings.max_concurrent <= fits
            or not trial_settings(settings, None).in_trial):
        return settings.max_concurrent
    log.warning("--max-concurrent %d: %d trials fit at once (each reserves %g CPU); %d at once",
                settings.max_concurrent, fits, settings.cpus_per_worker, fits)
    return fits


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


def trial_settings(settings: SearchSettings, storage: str | None) -> Any:
    """The run-level settings every trial of this search runs with (the worker's
    :class:`~cbdtune.session.TrialSettings`, built from the search's settings only)."""
    from cbdtune.session import TrialSettings

    return TrialSettings(workers=settings.workers_per_trial,
                         cpus_per_worker=settings.cpus_per_worker,
                         gpus_per_worker=settings.gpus_per_worker,
                         max_failures=settings.max_failures, storage_path=storage,
                         encoder_cache=encoder_root(settings))


def param_space(settings: SearchSettings, storage: str | None) -> dict[str, Any]:
    """Run-level settings at the top; the searcher fills ``train_loop_config`` in each trial.

    Nothing here is a distribution: Tune refuses one in ``param_space`` when the searcher has its
    own space. Tune deep-merges each suggestion into this dict (``SearchGenerator``), so a trial
    with no parameter sampled still gets an empty ``train_loop_config``.
    """
    return trial_settings(settings, storage).param_space()


def max_reports(cfg: ExperimentConfig, space: SearchSpace | None = None) -> int:
    """How many results one trial of the space reports at most: the pipeline's report budget
    (:func:`cbdtune.reports.report_budget`) with searched epoch counts at their upper bound and
    ``train.classifier`` at ``both`` when searched. ASHA stops every trial at ``max_t``, so it
    must not fall short of a trial's last (final) report."""
    for p in space.params if space else ():
        if p.key.startswith("train.") and p.key.endswith("epochs") and p.high is not None:
            cfg = cfg.replace({p.key: int(p.high)})
        if p.key == "train.classifier" and stages.BOTH in (p.choices or ()):
            cfg = cfg.replace({p.key: stages.BOTH})
    return reports.report_budget(cfg)


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


def _sampler(name: str, seed: int, space: SearchSpace) -> Any:
    import optuna

    if name == "grid":  # every point once, in an order shuffled by the seed
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return tpe_sampler(seed)


def tpe_sampler(seed: int) -> Any:
    """Optuna's TPE as the search needs it: multivariate and grouped, with a constant liar.

    The space is conditional (:meth:`SearchSpace.define_by_run` suggests a key only where its
    ``when`` holds), so ``group=True`` splits it into the subspaces that trials share and models
    each one jointly (multivariate TPE, Falkner et al., ICML 2018's BOHB uses the same kind of
    joint density) instead of one parameter at a time. Trials run concurrently:
    ``constant_liar=True`` counts the running ones as bad results, so that a new trial is not
    proposed next to one still running. Ray's ``OptunaSearch`` hands this sampler unchanged to
    ``optuna.create_study`` and asks it through ``Study.ask()`` / ``Study.tell()``
    (``ray/tune/search/optuna/optuna_search.py``: ``_setup_study``, ``suggest``), so running
    trials are in the study as RUNNING, which is what the liar reads.
    """
    import warnings

    import optuna

    with warnings.catch_warnings():  # group is "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True)


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


def asha_rungs(base: ExperimentConfig, space: SearchSpace | None = None) -> tuple[int, int]:
    """``(grace_period, max_t)`` of the search's early stopping, in reports: rungs sit at
    ``grace_period * 3**k <= max_t``.

    The first rung after a third of the pretraining probes (cross-validated probes of the frozen
    encoder), then x3 per rung. Under a closed-form readout (ridge; the only classifier, not
    searched) a trial costs seconds once its pretraining is done, so the last rung is the report
    before the last probe: a later one would only turn a finished CV value into a stopped trial
    (seen on gesture: a trial stopped at report 12 of 13, its CV value final). Otherwise rungs
    continue into the classifier stages, up to the trial's last report.
    """
    max_t = max_reports(base, space) + 1
    probes = reports.probe_count(base.train)
    grace = max(1, math.ceil(probes / 3))
    searched = {p.key for p in space.params} if space else set()
    closed_form = (all(stages.spec(s).closed_form for s in reports.stages(base.train))
                   and "train.classifier" not in searched)
    if closed_form and probes - 1 >= grace:
        max_t = probes - 1
    return max(1, min(grace, max_t)), max_t


def scheduler(settings: SearchSettings, base: ExperimentConfig, space: SearchSpace) -> Any:
    """Noise-aware ASHA on the trials' report count (``--scheduler asha``), else Tune's FIFO.

    :class:`cbdtune.stopping.NoiseAwareASHA`: no trial is stopped before
    ``max(4, num_samples // 4)`` trials have completed, and a trial below a rung's cut is stopped
    only when it is below it by more than one standard error (paired fold scores when the
    reports carry them); rungs from :func:`asha_rungs`. The time attribute is the trial's own report count: a resumed trial
    continues it (worker.py).
    """
    from ray.tune.schedulers import FIFOScheduler

    from cbdtune.stopping import NoiseAwareASHA, default_min_completed

    if settings.scheduler != "asha":
        return FIFOScheduler()
    grace, max_t = asha_rungs(base, space)
    return NoiseAwareASHA(time_attr=reports.ITERATION, max_t=max_t, grace_period=grace,
                          reduction_factor=3,
                          min_completed=default_min_completed(settings.num_samples))


def tune(plan: SearchPlan, cluster: Cluster, parent: tracking.RunRef) -> Tuned:
    """Run the trials (to the end, the time budget, or Ctrl-C) and read back what they left.

    Which trials ended is read from what Tune persisted: after Ctrl-C, Ray 2.60 marks every
    trial TERMINATED in memory, but its experiment state on disk keeps them RUNNING/PENDING (it
    is written before the trials are stopped).
    """
    started = time.perf_counter()
    grid = fit(tuner(plan, cluster, parent))
    wall = time.perf_counter() - started
    states = persisted_trial_states(plan.experiment_path) or _memory_states(grid)
    rows, curves = trial_rows(grid, states, plan.metric, plan.slugs)
    df = results.trials_frame(rows)
    return Tuned(trials=df, curves=curves, wall_s=wall, started=started,
                 interrupted=interrupted(plan.settings, df, wall))


def tuner(plan: SearchPlan, cluster: Cluster, parent: tracking.RunRef) -> Any:
    """The Tuner (fresh, or restored from storage with ``--resume``)."""
    from ray import tune as ray_tune

    from cbdtune.callbacks import MLflowTrialCallback, ProgressCallback, SchedulerStateCallback

    st = plan.settings
    # A trial of one CPU worker works in its own process and reserves the worker's CPUs; a
    # TorchTrainer's driver (several workers, a GPU, several datasets) must not hold the CPUs
    # its workers need (session.TrialSettings.trial_resources).
    cpus = {"cpu": 0.0} if plan.multi else trial_settings(st, None).trial_resources()
    trainable = ray_tune.with_resources(_driver(plan, cluster),
                                        {**cpus, "memory": DRIVER_MEMORY})
    settings = param_space(st, f"{plan.experiment_path}/train")
    # Quiet unless --verbose: Ray 2.60's default output engine ignores a progress_reporter
    # passed in (tune.py: "ignoring passed-in ProgressReporter"), and at verbose=0
    # (AirVerbosity.SILENT) it still prints the experiment's configuration box. The legacy
    # engine (RAY_AIR_NEW_OUTPUT=0, read by tune.run) prints nothing at verbose=0, its CLIReporter
    # included. A user's own RAY_AIR_NEW_OUTPUT wins.
    if not st.verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if st.resume:
        # The scheduler's rungs come back through SchedulerStateCallback's state; a resumed unfinished
        # trial continues its own training_iteration (the worker reports it: session.Reporter).
        return ray_tune.Tuner.restore(plan.experiment_path, trainable, resume_errored=True,
                                      param_space=settings)
    asha = scheduler(st, plan.base, plan.space)
    callbacks = [MLflowTrialCallback(plan.uri, parent.experiment_id, parent.run_id, plan.base,
                                     plan.metric, plan.mode),
                 ProgressCallback(st.num_samples, plan.metric, plan.mode),
                 SchedulerStateCallback(asha)]
    # Tune checkpoints the experiment (searcher, callbacks) into storage: --resume.
    run_config = ray_tune.RunConfig(
        name=plan.name, storage_path=plan.root, callbacks=callbacks,
        failure_config=ray_tune.FailureConfig(max_failures=st.max_failures),
        checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        verbose=1 if st.verbose else 0)
    tune_config = ray_tune.TuneConfig(
        metric=plan.metric, mode=plan.mode, num_samples=st.num_samples, scheduler=asha,
        search_alg=make_searcher(plan.space, sampler=st.sampler, seed=plan.base.train.seed,
                                 metric=list(st.metrics), mode=list(st.modes),
                                 max_concurrent=cluster.max_concurrent,
                                 baseline=st.baseline,
                                 # a grid visits each point once: no repeated encoders
                                 reuse_share=st.reuse_share
                                 if st.reuse and st.sampler != "grid" else 0.0),
        time_budget_s=st.time_budget_s,
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
    return ray_tune.Tuner(trainable, param_space=settings, tune_config=tune_config,
                          run_config=run_config)


def _driver(plan: SearchPlan, cluster: Cluster) -> Any:
    """The trial's function trainable, with the datasets' object refs bound."""
    from ray import tune as ray_tune

    from cbdtune.worker import multi_driver_fn, train_driver_fn

    refs = cluster.data_refs
    if plan.multi:  # one TorchTrainer per dataset, the trial reports their aggregate once
        given = dict(zip(plan.datasets, plan.settings.datasets, strict=True))
        return ray_tune.with_parameters(
            multi_driver_fn, datasets=[{slug: (given[slug], ref) for slug, ref in refs.items()}],
            base=plan.base.to_dict(), search=plan.name)
    return ray_tune.with_parameters(train_driver_fn, data_ref=list(refs.values()),
                                    base=plan.base.to_dict(), search=plan.name)


def fit(tuner: Any) -> Any:
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
    saved = {sig: _not_tunes(signal.getsignal(sig)) for sig in _TUNE_SIGNALS}
    try:
        return tuner.fit()
    finally:
        for sig, handler in saved.items():
            fallback = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler if handler is not None else fallback)


def _not_tunes(handler: Any) -> Any:
    """``handler``, or None when it is Tune's own: one left installed by an earlier Tune run in
    this process that ended without going through :func:`fit` (putting it back would swallow
    Ctrl-C again)."""
    return None if str(getattr(handler, "__module__", "")).startswith("ray.") else handler


def interrupted(settings: SearchSettings, df: Any, wall: float) -> bool:
    """A trial did not end, or fewer trials ran than asked and no time budget ran out."""
    if "status" in df and bool((df["status"] == "unfinished").any()):
        return True
    budget = settings.time_budget_s or math.inf
    return len(df) < settings.num_samples and wall < budget


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


def trial_rows(grid: Any, states: dict[str, str], metric: str, datasets: tuple[str, ...] = ()
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
