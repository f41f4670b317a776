"""The Ray Train worker around :func:`cbdtune.pipeline.run_trial` (Ray 2.60, Train V2).

Shaped like Ray's ``train_tune_interop.py``: ``train_fn_per_worker`` runs on every worker of a
``TorchTrainer``; ``train_driver_fn`` builds that trainer and is both the Tune function trainable
(one trial of a search) and a plain function for a single run (``python -m cbdtune.train``).

    [1] resume first: ``ray.train.get_checkpoint()`` -> the pipeline continues from its payload
    [2] the dataset comes through the object store (``data_ref``), loaded once by the driver
    [3] ``prepare_model`` wraps the model in DDP when there are several workers
    [4] every evaluation point goes out through ``ray.train.report``
        (:class:`cbdtune.session.Reporter`), rank 0 attaching a checkpoint;
        ``training_iteration`` is the trial's own report count, so a trial resumed from a
        checkpoint continues it
    [5] rank 0 returns the trial's history and final metrics (``Result.return_value``)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from cbdtune import encoder_cache, reports
from cbdtune.config import ExperimentConfig
from cbdtune.data import Dataset, load_dataset
from cbdtune.pipeline import refit_trial, run_trial
from cbdtune.runtime import Runtime
from cbdtune.session import (
    CHECKPOINT_EVERY_S,
    CHECKPOINT_FILE,
    LOOP_KEY,
    Reporter,
    Session,
    TrialSettings,
    cache_notes,
    local_session,
    train_session,
    tune_session,
)


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
                      send=session.send, notes=notes, checkpoint_cls=session.checkpoint_cls,
                      checkpoint_every_s=CHECKPOINT_EVERY_S)

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
    from cbdtune.pipeline import for_data

    chosen = result.selected
    if chosen is None or chosen.oof_proba is None:
        return
    proba = chosen.oof_proba.detach().cpu().numpy()
    rows = np.flatnonzero(np.isfinite(proba).all(axis=1))  # one validation split: its rows
    pool = selection_pool(data, cfg)
    key = str(result.metrics.get(reports.ENCODER_KEY) or "") or encoder_cache.pretrain_key(
        for_data(cfg, data), data)
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
