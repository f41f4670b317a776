"""The Ray Train worker around :func:`cbdtune.pipeline.run_trial` (Ray 2.60, Train V2).

Shaped like Ray's ``train_tune_interop.py``: ``train_fn_per_worker`` runs on every worker of a
``TorchTrainer``; ``train_driver_fn`` builds that trainer and is both the Tune function trainable
(one trial of a search) and a plain function for a single run (``python -m cbdtune.train``).

    [1] resume first: ``ray.train.get_checkpoint()`` -> the pipeline continues from its payload
    [2] the dataset comes through the object store (``data_ref``), loaded once by the driver
    [3] ``prepare_model`` wraps the model in DDP when there are several workers
    [4] every evaluation point goes out through ``ray.train.report`` (:class:`Reporter`), rank 0
        attaching a checkpoint; ``training_iteration`` is the trial's own report count, so a
        trial resumed from a checkpoint continues it
    [5] rank 0 returns the trial's history and final metrics (``Result.return_value``)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from cbdtune import encoder_cache, reports
from cbdtune.config import ConfigError, ExperimentConfig
from cbdtune.data import Dataset, load_dataset
from cbdtune.encoder_cache import NOTE_KEY
from cbdtune.pipeline import refit_trial, run_trial
from cbdtune.runtime import Runtime

CHECKPOINT_FILE = "state.pt"
LOOP_KEY = "train_loop_config"  # the trial's hyperparameters in a Tune config (dotted keys)


@dataclass(frozen=True)
class TrialSettings:
    """How one trial runs, not what it trains: the run-level settings that travel through Tune's
    ``param_space`` next to ``train_loop_config`` (:meth:`param_space`), and
    :func:`make_trainer`'s arguments (:meth:`trainer_args`).

    No defaults: the search decides every value (``cbdtune.search.trial_settings`` builds this
    from its :class:`~cbdtune.settings.SearchSettings`), so a trial never runs on a fallback of
    its own.
    """

    workers: int  # data-parallel workers
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int  # worker-group restarts (from the latest checkpoint) before the trial fails
    storage_path: str | None  # where the trial's Train checkpoints go
    encoder_cache: str | None  # pretrained encoders' root (cbdtune.encoder_cache); None: no reuse

    def trainer_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def in_trial(self) -> bool:
        """Whether a Tune trial runs its work in its own process (:func:`train_driver_fn`)
        instead of through a ``TorchTrainer``: one CPU worker needs neither DDP nor a placement
        group, and a ``TorchTrainer`` costs 7 more Python processes per trial (its worker and
        :data:`TRAINER_PROCESSES` helpers)."""
        return self.workers == 1 and self.gpus_per_worker == 0

    def trial_resources(self) -> dict[str, float]:
        """What the Tune trial actor reserves (``tune.with_resources``): the worker's CPUs when
        it does the work itself (:attr:`in_trial`), else none (its ``TorchTrainer``'s workers
        reserve them; a trial that held CPUs would starve its own workers)."""
        return {"cpu": self.cpus_per_worker if self.in_trial else 0.0}

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: these settings, and an empty ``train_loop_config`` for the
        searcher to fill."""
        return {**self.trainer_args(), LOOP_KEY: {}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialSettings:
        """Read them back from a trial's config.

        Raises:
            ConfigError: a setting is missing (the config was not built by :meth:`param_space`).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ConfigError(f"trial config: no {', '.join(missing)}; build Tune's param_space "
                              "with TrialSettings.param_space()")
        return cls(**{n: config[n] for n in names})


class Reporter:
    """The pipeline's ``report(metrics, payload)`` inside a Ray Train worker.

    Each report is kept in ``history`` (restored from the checkpoint on a resume) and sent with
    ``training_iteration`` = the trial's report count so far. Tune counts iterations itself only
    when a result has none (``Trainable.train`` setdefaults it), and its count restarts at 1 when
    an unfinished trial is resumed (the function trainable saves no Tune checkpoint to restore
    ``_iteration`` from), which made ASHA judge a resumed trial at its first rung again. The
    trial's own count continues: its checkpoint holds every report up to it, and the pipeline
    repeats exactly the reports after it.

    Args:
        history: the reports made before this attempt (from the checkpoint), else empty.
        extra: added to every report (where this attempt runs, what it resumed from).
        rank: the worker's rank; rank 0 alone saves the checkpoint ``payload``.
        send: where reports go; default ``ray.train.report``, looked up at each call.
        notes: the encoder cache's warnings to send with the next report (:func:`cache_notes`).
        checkpoint_cls: the checkpoint class ``send`` takes; default ``ray.train.Checkpoint``.
    """

    def __init__(self, history: list[dict[str, Any]], extra: dict[str, Any], rank: int,
                 send: Callable[..., None] | None = None,
                 notes: list[str] | None = None, checkpoint_cls: Any | None = None) -> None:
        self.history = list(history)
        self.extra = extra
        self.rank = rank
        self.send = send
        self.notes = notes if notes is not None else []
        # Tune's Checkpoint is a class of its own: Tune refuses ray.train's in tune.report.
        self.checkpoint_cls = checkpoint_cls

    def __call__(self, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        metrics = {**metrics, **self.extra}
        if self.notes:  # the encoder cache's warnings since the last report, sent once
            metrics[NOTE_KEY] = "; ".join(self.notes)
            self.notes.clear()
        self.history.append(dict(metrics))
        out = {**metrics, reports.ITERATION: len(self.history)}
        send = self.send or ray.train.report
        if payload is None or self.rank != 0:  # every rank reports; rank 0 alone checkpoints
            send(out)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save({**payload, "history": self.history}, Path(d) / CHECKPOINT_FILE)
            checkpoint_cls = self.checkpoint_cls or ray.train.Checkpoint
            send(out, checkpoint=checkpoint_cls.from_directory(d))


@contextlib.contextmanager
def cache_notes() -> Iterator[list[str]]:
    """The encoder cache's warnings made inside the block (an entry found broken and
    rebuilt), as lines: :class:`Reporter` sends them with the trial's next report, and the
    search's driver prints them (``callbacks.ProgressCallback``); a worker's own log stays in
    Ray's session folder (``log_to_driver=False``)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, NOTE_KEY, False):
                lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    encoder_cache.log.addHandler(handler)
    try:
        yield lines
    finally:
        encoder_cache.log.removeHandler(handler)


@dataclass(frozen=True)
class Session:
    """Where a trial's work runs: a Ray Train worker (:func:`train_session`) or the Tune trial's
    own process (:func:`tune_session`), and how it reports from there.

    ``send`` None: ``ray.train.report``, looked up at each call (:class:`Reporter`).
    """

    rank: int
    world: int
    device: torch.device
    threads: int  # torch's CPU threads (0: leave torch's own count)
    checkpoint: Any | None  # the latest checkpoint to resume from (``.as_directory()``)
    send: Callable[..., None] | None
    checkpoint_cls: Any | None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module]


def train_session() -> Session:
    """The :class:`Session` of a Ray Train worker (inside ``train_fn_per_worker``)."""
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; torch is made to agree.
    return Session(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                   threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
                   checkpoint=ray.train.get_checkpoint(), send=None, checkpoint_cls=None,
                   wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


def local_session(cpus: float) -> Session:
    """The :class:`Session` of work done in this process on the CPU: one rank, ``int(cpus)``
    threads (what Ray sets OMP_NUM_THREADS to for a worker with those CPUs), nothing to resume
    from, and reports that go nowhere."""
    return Session(rank=0, world=1, device=torch.device("cpu"), threads=max(1, int(cpus)),
                   checkpoint=None, send=lambda *args, **kwargs: None, checkpoint_cls=None,
                   wrap_model=lambda m: m)


def tune_session(cpus: float) -> Session:
    """The :class:`Session` of a Tune trial that does its work itself
    (:attr:`TrialSettings.in_trial`): :func:`local_session`, reporting and checkpointing through
    Tune. A retry (Tune's ``FailureConfig``) or ``--resume`` continues from
    ``tune.get_checkpoint()``."""
    from ray import tune

    return dataclasses.replace(local_session(cpus), checkpoint=tune.get_checkpoint(),
                               send=tune.report, checkpoint_cls=tune.Checkpoint)


def train_fn_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """One worker of a trial. ``loop_config``: ``{"config": flat dict, "data_ref": [ObjectRef]}``."""
    with cache_notes() as notes:
        return _train_fn(loop_config, notes, train_session())


def _train_fn(loop_config: dict[str, Any], notes: list[str],
              session: Session) -> dict[str, Any] | None:
    """:func:`train_fn_per_worker` in ``session``, its cache warnings going to ``notes``."""
    cfg = ExperimentConfig.from_dict(loop_config["config"], where="trial config")
    rank, device = session.rank, session.device
    if device.type == "cpu":
        threads = cfg.train.num_threads or session.threads
        if threads:
            torch.set_num_threads(threads)

    # [1] resume first
    state: dict[str, Any] | None = None
    if session.checkpoint is not None:
        with session.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)

    # [2] data: through the object store when the driver put it there
    refs = loop_config.get("data_ref")
    data: Dataset = ray.get(refs[0]) if refs else load_dataset(cfg.data, seed=cfg.train.seed)

    # Where this attempt runs and what it resumed from: visible in every result (and MLflow),
    # so a retry after a lost node can be traced.
    where = {"worker_node": ray.get_runtime_context().get_node_id()[:12],
             "resumed_from_stage": state[reports.STAGE] if state else "",
             "resumed_from_epoch": int(state[reports.EPOCH]) if state else -1}
    report = Reporter(state.get("history", []) if state else [], where, rank,  # [4]
                      send=session.send, notes=notes, checkpoint_cls=session.checkpoint_cls)

    # [3] DDP only when data-parallel; the model is already on `device`.
    rt = Runtime(device=device, rank=rank, world_size=session.world,
                 encoder_cache=loop_config.get("encoder_cache"), trial=loop_config.get("trial", ""),
                 wrap_model=session.wrap_model)
    if loop_config.get("refit"):
        return _refit(cfg, data, rt, session.send or ray.train.report, **loop_config["refit"])
    result = run_trial(cfg, data, report, rt=rt, state=state)
    if rank != 0:
        return None
    if loop_config.get("oof") and result.status == "completed":
        keep_oof(cfg, data, result, **loop_config["oof"])
    # [5] what the driver needs to log the run, without a second read of any file
    return {"status": result.status, "reason": result.reason, "final": result.metrics,
            "history": report.history, "resumed": state is not None}


def _refit(cfg: ExperimentConfig, data: Dataset, rt: Runtime, send: Callable[..., None], *,
           stage: str, epochs: int, temperature: float = 1.0) -> dict[str, Any] | None:
    """A refit (:func:`cbdtune.pipeline.refit_trial`, its logits over ``temperature``): rank 0
    returns its test metrics, test probabilities and the classifier's weights (on the CPU)
    with its resolved config."""
    metrics, clf, proba = refit_trial(cfg, data, stage=stage, epochs=epochs, rt=rt,
                                      temperature=temperature)
    send({**metrics, reports.FINAL: 1})
    if rt.rank != 0:
        return None
    return {"final": metrics, "test_proba": proba,
            "config": dataclasses.replace(cfg, model=clf.model.cfg).to_dict(),
            # Train V2 returns no tensors (they fail to deserialise): numpy arrays instead.
            "weights": {k: v.detach().cpu().numpy() for k, v in clf.state_dict().items()}}


def keep_oof(cfg: ExperimentConfig, data: Dataset, result: Any, *, where: str,
             trial_id: str) -> None:
    """Write a completed trial's out-of-fold probabilities at its selected stage and epoch
    (:mod:`cbdtune.oof`), with its config, pretraining key and folds: the candidates of the
    search's ensemble selection. A trial with none (a stage that keeps none) writes nothing."""
    from cbdtune import oof
    from cbdtune.classify import selection_pool
    from cbdtune.pipeline import steps_to_epochs

    chosen = result.selected
    if chosen is None or chosen.oof_proba is None:
        return
    proba = chosen.oof_proba.detach().cpu().numpy()
    rows = np.flatnonzero(np.isfinite(proba).all(axis=1))  # one validation split: its rows
    pool = selection_pool(data, cfg)
    shaped = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, in_channels=data.n_channels, seq_len=data.seq_len,
        num_classes=data.n_classes))
    key = str(result.metrics.get(reports.ENCODER_KEY) or "") or encoder_cache.pretrain_key(
        steps_to_epochs(shaped, len(data.train.x)), data)
    meta = {"config": cfg.to_dict(), "encoder_key": key, "seed": cfg.train.seed,
            "cv_folds": cfg.data.cv_folds, "cv_repeats": cfg.data.cv_repeats,
            "stage": chosen.stage, "epoch": chosen.epoch, "temperature": chosen.temperature,
            "val_accuracy": chosen.val.get("accuracy"), "holdout": pool.holdout}
    oof.write(where, trial_id, proba=proba[rows], y=pool.y[rows], index=rows,
              fold=oof.fold_assignment(pool.folds, len(pool.y)), meta=meta)


def refit_here(cfg: ExperimentConfig, data_ref: Any, *, stage: str, epochs: int,
               encoder_cache: str | None, cpus: float,
               temperature: float = 1.0) -> dict[str, Any]:
    """A refit of one CPU worker (:attr:`TrialSettings.in_trial`) run in this process, e.g. a
    Ray task given ``cpus`` CPUs: what a ``TorchTrainer``'s rank 0 would return
    (:func:`_refit`), without the trainer's 6 more processes. Its one report goes nowhere (a
    refit's caller reads the returned metrics)."""
    loop_config = _loop_config(cfg, data_ref, encoder_cache=encoder_cache, trial="",
                               refit={"stage": stage, "epochs": epochs,
                                      "temperature": temperature})
    with cache_notes() as notes:
        out = _train_fn(loop_config, notes, local_session(cpus))
    if out is None:  # rank 0 always returns; this is for the type checker
        raise RuntimeError("refit returned nothing")
    return out


def make_trainer(cfg: ExperimentConfig, *, data_ref: Any | None, name: str,
                 workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 storage_path: str | None = None, max_failures: int = 0,
                 encoder_cache: str | None = None, trial: str = "",
                 callbacks: list[Any] | None = None,
                 train_fn: Callable[[dict[str, Any]], Any] | None = None,
                 refit: dict[str, Any] | None = None,
                 oof: dict[str, str] | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` for one trial.

    Args:
        cfg: the trial's configuration.
        data_ref: ``ray.put(dataset)``; None makes each worker load the dataset itself.
        name: the Train run's name; for Tune trials ``trial_id=<id>`` (no timestamps: restoring a
            run depends on the name, as Ray's interop example warns).
        workers: data-parallel workers.
        gpus_per_worker: fractions share one GPU between trials (e.g. 0.25).
        cpus_per_worker: CPUs reserved per worker (also the torch thread count on CPU).
        storage_path: where checkpoints go (a folder or a cloud URI).
        max_failures: worker-group restarts (from the latest checkpoint) before the trial fails.
        encoder_cache: where pretrained encoders are reused from and stored; None: nowhere.
        trial: ``<search>/<trial id>``, recorded with an encoder this trial pretrains.
        callbacks: Train callbacks, e.g. ``TuneReportCallback()`` inside a Tune trial.
        train_fn: the per-worker function (default :func:`train_fn_per_worker`).
        refit: ``{"stage": ..., "epochs": ...}`` runs a refit instead of a selecting trial.
        oof: ``{"where": folder, "trial_id": id}``: a completed trial's chief writes its
            out-of-fold probabilities there (:func:`keep_oof`); None: nowhere.
    """
    use_gpu = gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                      resources_per_worker=resources)
    run_config = ray.train.RunConfig(
        name=name, storage_path=storage_path, callbacks=callbacks or [],
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
    )
    loop_config = _loop_config(cfg, data_ref, encoder_cache=encoder_cache, trial=trial,
                               refit=refit, oof=oof)
    # Train V2 (Ray 2.60's default) keeps rank 0's return value; ray.train's static names are
    # Train V1's, rebound at import, whose loop must return None.
    return TorchTrainer(train_fn or train_fn_per_worker,  # type: ignore[arg-type]
                        train_loop_config=loop_config, scaling_config=scaling,
                        run_config=run_config)


def fit_trainer(trainer: TorchTrainer) -> dict[str, Any]:
    """``trainer.fit()``; returns rank 0's return value (its history and final metrics), or
    ``{}`` when it returned none.

    Raises:
        ray.train.TrainingFailedError: the run failed past ``max_failures``.
    """
    result = trainer.fit()
    # Train V2's Result; the static ray.train.Result is Train V1's, without return_value.
    return result.return_value or {}  # type: ignore[attr-defined]


def _loop_config(cfg: ExperimentConfig, data_ref: Any | None, *, encoder_cache: str | None,
                 trial: str, refit: dict[str, Any] | None = None,
                 oof: dict[str, str] | None = None) -> dict[str, Any]:
    """What :func:`train_fn_per_worker` reads (the data ref in a list: Ray hands it over
    unresolved)."""
    return {"config": cfg.to_dict(), "data_ref": [data_ref] if data_ref is not None else None,
            "refit": refit, "encoder_cache": encoder_cache, "trial": trial, "oof": oof}


def _trial_inputs(config: dict[str, Any], base: dict[str, Any] | None
                  ) -> tuple[TrialSettings, ExperimentConfig, str, bool]:
    """A Tune trial's run settings, its config (``base`` with the trial's hyperparameters over
    it), its trial id (``"single"`` outside Tune) and whether it runs inside Tune."""
    from ray import tune  # here, not at import: `import cbdtune.train` stays free of ray.tune

    run = TrialSettings.from_config(config)
    cfg = ExperimentConfig.from_dict(base or {}, where="search base config")
    cfg = cfg.replace(dict(config[LOOP_KEY]), where="trial config")
    trial_id = tune.get_context().get_trial_id()
    return run, cfg, trial_id or "single", trial_id is not None


def oof_folder(storage_path: str | None) -> str | None:
    """Where a search's trials keep their out-of-fold probabilities, from their
    ``storage_path`` (``<experiment>/train``): ``<experiment>/oof`` (:mod:`cbdtune.oof`)."""
    from cbdtune import oof

    return oof.folder_of_trial_storage(storage_path)


def train_driver_fn(config: dict[str, Any], data_ref: list[Any] | None = None,
                    base: dict[str, Any] | None = None, search: str = "") -> dict[str, Any] | None:
    """A Tune function trainable (or a plain call): run one trial through a ``TorchTrainer``,
    or, inside Tune with one CPU worker (:attr:`TrialSettings.in_trial`), in this process.

    Why in this process: inside a Tune trial a ``TorchTrainer.fit()`` of one worker starts 7
    actors, each a Python process of its own that imports Ray (the worker and
    :data:`TRAINER_PROCESSES` helpers), so a search started 8 processes per trial, 4x-17x the raylet's expected count on 2 CPUs (its "N PYTHON worker processes have
    been started" warning) and seconds of imports per trial on a small machine.
    The trial then reports and checkpoints through Tune (:func:`tune_session`); Tune's
    ``FailureConfig`` retries it from its latest checkpoint as Train's would.

    ``config`` holds the run-level :class:`TrialSettings` at the top and the trial's
    hyperparameters as dotted keys under ``train_loop_config``, as in Ray's interop example.
    They override ``base``, the search's fixed configuration (passed with
    ``tune.with_parameters`` so Tune's tables and the searcher see only what is searched).
    ``search`` names the search, for the record an encoder this trial pretrains keeps.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    run, cfg, trial_id, in_tune = _trial_inputs(config, base)
    ref = data_ref[0] if data_ref else None
    trial = f"{search}/{trial_id}" if search else trial_id
    where = oof_folder(run.storage_path) if in_tune else None
    keep = {"where": where, "trial_id": trial_id} if where else None
    if in_tune and run.in_trial:
        with cache_notes() as notes:
            _train_fn(_loop_config(cfg, ref, encoder_cache=run.encoder_cache, trial=trial,
                                   oof=keep), notes, tune_session(run.cpus_per_worker))
        return None
    trainer = make_trainer(
        cfg, data_ref=ref, name=f"trial_id={trial_id}", trial=trial,
        callbacks=[TuneReportCallback()] if in_tune else None, oof=keep, **run.trainer_args())
    out = fit_trainer(trainer)
    # Inside Tune the worker's reports already reached Tune; a returned dict would be one more
    # result. Called directly, the caller gets rank 0's history and final metrics.
    return None if in_tune else out


def multi_driver_fn(config: dict[str, Any], datasets: list[dict[str, Any]] | None = None,
                    base: dict[str, Any] | None = None, search: str = "") -> dict[str, Any] | None:
    """A Tune function trainable for a multi-dataset search: one configuration, one
    ``TorchTrainer`` per dataset, one report.

    ``datasets`` is ``[{slug: (dataset name, ray.put(dataset))}]`` (in a list, so Tune hands the
    object refs over unresolved). The trainers start together, each ``.fit()`` in a thread of its
    own; Ray runs them side by side as far as the cluster's CPUs and GPUs allow and queues the
    rest. They carry no ``TuneReportCallback``: their reports would interleave in one trial.
    Rank 0 of each returns its final report, and the trial reports once to Tune,
    :func:`cbdtune.reports.aggregate` of them (``<slug>.<key>`` per dataset). Called outside Tune
    it returns that report instead.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ray import tune

    run, cfg, trial_id, in_tune = _trial_inputs(config, base)

    def fit(slug: str, name: str, ref: Any) -> dict[str, Any]:
        trainer = make_trainer(cfg.replace({"data.dataset": name}, where=f"dataset {slug}"),
                               data_ref=ref, name=f"trial_id={trial_id}-{slug}",
                               trial=f"{search}/{trial_id}" if search else trial_id,
                               **run.trainer_args())
        return fit_trainer(trainer)

    entries = (datasets or [{}])[0]
    with ThreadPoolExecutor(max_workers=max(1, len(entries))) as pool:
        futures = {slug: pool.submit(fit, slug, name, ref)
                   for slug, (name, ref) in entries.items()}
    finals = {slug: _final_of(future) for slug, future in futures.items()}
    metrics = {**reports.aggregate(finals), reports.ITERATION: 1}
    if not in_tune:
        return metrics
    tune.report(metrics)
    return None


def _final_of(future: Any) -> dict[str, Any]:
    """A dataset's final report from its trainer's future; a trainer that raised (after its
    own retries) gives a failed one with the error's last line (the worker's exception)."""
    try:
        return dict(future.result().get("final") or {})
    except Exception as exc:
        text = str(exc).strip()
        line = text.splitlines()[-1] if text else type(exc).__name__
        return {reports.FINAL: 1, reports.DIVERGED: 1, reports.REASON: f"failed: {line[:300]}"}


# The actors (each one Python process) a TorchTrainer.fit() of Ray 2.60 starts besides its
# workers, counted in a search (benchmarks/workers.py): Train V2's controller, its
# PlacementGroupCleaner, SynchronizationActor, DatasetManager (made even with no datasets) and
# PreemptionWatcher, and inside Tune the _QueueActor of TuneReportCallback.
TRAINER_PROCESSES = 6

# Ray Train V2's controller polls its workers every 2 s and a worker's ``ray.train.report``
# waits for that poll: about 1.9 s per report on a small trial (measured here), 400 s of idle
# time for the paper's 200 classifier epochs. Polling every 0.25 s brings it to ~0.23 s.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def connect(address: str | None = None) -> str:
    """Join the Ray cluster at ``address``, else at ``$RAY_ADDRESS``, else start a local Ray of
    this process's own. Returns ``"cluster"`` or ``"local"``.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the job, so the same command runs unchanged on a
    laptop and on a cluster. Without either, a Ray that another process runs on this machine is
    not joined (``address="local"``; plain ``ray.init()`` would join the latest one started):
    pass ``--address auto`` for that. A local Ray listens on 127.0.0.1 only
    (:func:`_loopback_only`).
    """
    if ray.is_initialized():
        return "cluster"
    # The job-level env vars merge with a submitted job's own (unless it sets the same keys).
    env = {k: v for k, v in TRAIN_POLL_ENV.items() if k not in os.environ}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {}
    if address == "local" and "RAY_API_SERVER_ADDRESS" not in os.environ:
        # Ray Train's PlacementGroupCleaner asks the state API whether a trial's controller is
        # alive, at the address its process finds: with a second Ray on this machine (another
        # search) that lookup fails ("multiple active Ray instances") and the placement group
        # of every trial ASHA stops is never freed, until no CPU is left and the search hangs.
        # So this Ray's dashboard gets a port chosen here, and its workers are told where it is.
        kwargs["dashboard_port"] = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    # log_to_driver=False: workers' logs stay in Ray's session folder; progress is Tune's.
    init = functools.partial(ray.init, address=address, log_to_driver=False,
                             runtime_env={"env_vars": env} if env else None, **kwargs)
    if address != "local":
        init()
        return "cluster"
    with _loopback_only():
        init(_node_ip_address=LOOPBACK)
    return "local"


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray whose every server listens on 127.0.0.1 only.

    A local Ray of Ray 2.60 on Linux takes the machine's address as its node IP, and its
    dashboard agent, metrics export port and monitor bind to 0.0.0.0 (``dashboard/agent.py``:
    all interfaces unless the node IP is a localhost one). ``ray.init(_node_ip_address=
    "127.0.0.1")`` alone is turned back into the machine's address
    (``services.resolve_ip_for_localhost``), except where Ray runs without clusters, as it
    does on macOS and Windows: ``ray_constants.ENABLE_RAY_CLUSTER`` off (env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray's own processes read at import). A
    search's local Ray is one node: nothing else needs to reach it.
    """
    from ray._private import ray_constants  # TODO: private; re-check on a Ray upgrade

    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
