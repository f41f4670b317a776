"""One trial: pretrain the CBD model, then linear-probe and/or fine-tune a classifier. Plain PyTorch.

Protocol (spec section 4) with two corrections: the authors select the best *test* accuracy over
all (checkpoint, epoch) pairs; here every choice is made on the training split, by stratified
k-fold cross-validation (default) or on one validation split carved from it, and the test split
is read exactly once, by the classifier the trial ends with (:mod:`cbdtune.classify`).

The functions know nothing of Ray. The Ray Train worker (``cbdtune.worker``) passes a
:class:`Runtime` (device, rank, world size, a DDP wrapper) and a ``report`` callable; tests pass
``Runtime()`` and ``list.append``-like callables.

    pretrain ──(every probe_every epochs: short CV linear probe -> val_accuracy, the ASHA signal)─┐
    each stage: k fold classifiers in lockstep -> mean CV curve, per epoch ──────────────────────┤
    best stage at its CV-chosen epoch count -> refit on all of train -> test once -> final report ┘

Pretraining is label-free and sees every training series once per trial, the series each fold
holds out included: the CV estimate is slightly optimistic, in the same way for every trial.
Being label-free, it is also shared: with ``Runtime.encoder_cache`` set, a trial whose
pretraining key (:mod:`cbdtune.encoder_cache`) is stored loads that encoder, replays its
pretraining reports and goes straight to the classifier stages.

:func:`refit_trial` is the same pipeline without selection: pretrain with a given seed, train the
given stage for a given number of epochs on all of train, test once, and hand back the
classifier (the search's refits and ensemble).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cbdtune import classify, encoder_cache, reports, stages
from cbdtune.classify import Pool, StageResult, selection_pool
from cbdtune.config import ExperimentConfig
from cbdtune.data import Dataset
from cbdtune.losses import dual_constraint_loss
from cbdtune.model import CBDClassifier, CBDModel, build_model
from cbdtune.model.diagnostics import diagnose
from cbdtune.runtime import (
    Report,
    Runtime,
    TrialDiverged,
    as_tensor,
    autocast,
    batches_per_epoch,
    check_finite,
    for_epoch,
    fused,
    macro_f1,
    make_loader,
    progress_bar,
    resolve_device,
    seed_everything,
)


@dataclass
class TrialResult:
    status: str  # "completed" | "diverged"
    metrics: dict[str, Any]  # the final report
    reason: str = ""
    classifier: CBDClassifier | None = None  # what read the test split (None if diverged)
    # the selected stage at its selected point: its CV estimate, temperature and out-of-fold
    # probabilities (None if diverged)
    selected: StageResult | None = None


def _diagnostic_batch(data: Dataset, rt: Runtime) -> Tensor:
    """Up to 64 labelled series the trial may look at: validation if any, else train."""
    x = data.val.x if len(data.val) else data.train.x
    return as_tensor(x[:64]).to(rt.device)


# ---- pretraining (Eq. 14) ----------------------------------------------------------------------


def pretrain_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
                   cfg: ExperimentConfig, rt: Runtime, gen: torch.Generator,
                   epoch: int) -> dict[str, float]:
    """One epoch of masked pretraining; returns the mean of every loss term."""
    model.train()
    s = cfg.train.pretrain_augment
    augment = classify.augmenter(jitter=s, scale=s, crop=s)
    sums: dict[str, float] = {}
    n = 0
    for (xb,) in for_epoch(loader, epoch, cfg.train.seed):
        xb = xb.to(rt.device, non_blocking=True)
        if augment is not None:  # input and reconstruction target alike
            xb = augment(xb)
        with autocast(rt, cfg.train):
            out = model(xb, generator=gen)
            terms = dual_constraint_loss(xb, out, cfg.loss)
        total = terms["total"]
        check_finite(total.item(), f"pretrain epoch {epoch}",
                      {k: v.item() for k, v in terms.items() if k != "total"})
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(xb)
        n += len(xb)
    return {f"{reports.LOSS_PREFIX}{k}": v / max(n, 1) for k, v in sums.items()}


def pretrain(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
             report: Report, *, state: dict[str, Any] | None = None,
             probes: bool = True) -> CBDModel:
    """Masked pretraining on the training split (labels unused) with fidelity probes.

    Every ``train.probe_every`` epochs (and after the last) a short linear probe on frozen
    features, cross-validated like the classifier stages, gives ``val_accuracy``: the signal ASHA
    stops trials on during pretraining. Each such evaluation point is reported with a checkpoint
    payload so that a retried trial resumes from it. ``probes=False`` (a refit) reports nothing.

    Args:
        model: the freshly built (or checkpoint-restored) model, on ``rt.device``.
        data: train/val splits are used; test is never touched here.
        cfg: the experiment; ``train.pretrain_*`` and ``loss`` are read.
        rt: device and data-parallel layout.
        report: called at each evaluation point with (metrics, checkpoint payload).
        state: a payload from an earlier report of this stage to resume from.

    Raises:
        TrialDiverged: a loss term became NaN or infinite.
    """
    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.pretrain_lr, weight_decay=tc.weight_decay,
                            betas=(tc.beta1, tc.beta2), fused=fused(rt.device))
    # Masks differ between data-parallel ranks; the draw sequence is part of the checkpoint.
    gen = torch.Generator(device=rt.device).manual_seed(tc.seed * 1000 + rt.rank)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["mask_rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws continue where they stopped
        start = int(state[reports.EPOCH])
    if tc.pretrain_epochs == 0:
        return model
    wrapped = rt.wrap_model(model)
    per_rank = max(1, tc.batch_size // rt.world_size)  # same global batch for any worker count
    loader = make_loader((as_tensor(data.train.x),), per_rank, shuffle=True, seed=tc.seed, rt=rt,
                         drop_last=tc.drop_last)
    bar = progress_bar(tc.pretrain_epochs, reports.PRETRAIN, rt, initial=start)
    for epoch in range(start + 1, tc.pretrain_epochs + 1):
        losses = pretrain_epoch(wrapped, loader, opt, cfg, rt, gen, epoch)
        if bar is not None:
            bar.set_postfix(loss=f"{losses['loss.total']:.4f}", refresh=False)
            bar.update(1)
        if probes and (epoch % tc.probe_every == 0 or epoch == tc.pretrain_epochs):
            probe = _fidelity_probe(model, data, cfg, rt)
            metrics = {reports.STAGE: reports.PRETRAIN, reports.EPOCH: epoch, **losses,
                       **probe, **diagnose(model, _diagnostic_batch(data, rt))}
            # A snapshot: state_dict() tensors alias the live weights, which keep training.
            payload = copy.deepcopy({reports.STAGE: reports.PRETRAIN, reports.EPOCH: epoch,
                                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "mask_rng": gen.get_state(),
                                     "torch_rng": torch.get_rng_state()})
            report(metrics, payload)
    if bar is not None:
        bar.close()
    return model


def _fidelity_probe(model: CBDModel, data: Dataset, cfg: ExperimentConfig,
                    rt: Runtime) -> dict[str, Any]:
    """A short linear probe (``train.probe_epochs``) on the current encoder, on the same folds as
    the classifier stages (or the ridge readout: ``train.probe``); the mean CV metrics at its
    best epoch (path point, for the ridge) as report keys, with their per-fold scores. A pool of
    more than ``train.probe_max_series`` series is subsampled (:func:`classify.probe_pool`).

    It runs on a fork of torch's RNG: the head's dropout draws would otherwise shift the
    pretraining dropout after it, making the encoder depend on how often it is probed and on the
    head (cbdtune.encoder_cache keys encoders on what pretraining reads alone)."""
    short = replace(cfg.train, classifier_epochs=max(1, cfg.train.probe_epochs),
                    early_stop_patience=0)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        result = classify.fit_stage(model, classify.probe_pool(data, cfg),
                                    replace(cfg, train=short), rt,
                                    stages.probe_stage(cfg.train.probe), data.n_classes)
    return result.metrics()


# ---- the trial ---------------------------------------------------------------------------------


def steps_to_epochs(cfg: ExperimentConfig, n_train: int) -> ExperimentConfig:
    """The pretraining budget as epochs over ``n_train`` series: ``train.pretrain_steps`` as the
    epochs that reach it (at least that many steps), then cut to ``train.pretrain_max_steps``
    (the most epochs whose steps fit, at least 1); probed as often as ``pretrain_epochs`` /
    ``probe_every`` says (the report count ASHA was set up with, or fewer). The result has
    ``pretrain_steps`` and ``pretrain_max_steps`` 0: resolved once."""
    tc = cfg.train
    if not (tc.pretrain_steps or tc.pretrain_max_steps):
        return cfg
    per_epoch = batches_per_epoch(n_train, tc.batch_size, tc.drop_last)
    epochs = math.ceil(tc.pretrain_steps / per_epoch) if tc.pretrain_steps else tc.pretrain_epochs
    if tc.pretrain_max_steps:
        epochs = min(epochs, max(1, tc.pretrain_max_steps // per_epoch))
    resolved = replace(tc, pretrain_steps=0, pretrain_max_steps=0)
    if epochs == tc.pretrain_epochs:  # the cap does not bind (or no pretraining at all)
        return replace(cfg, train=resolved)
    every = math.ceil(epochs / max(1, reports.probe_count(tc)))
    return replace(cfg, train=replace(resolved, pretrain_epochs=epochs, probe_every=every))


def for_data(cfg: ExperimentConfig, data: Dataset) -> ExperimentConfig:
    """The config a trial on ``data`` runs: the dataset's shape filled in and a budget in steps
    resolved (:func:`steps_to_epochs`)."""
    mc = replace(cfg.model, in_channels=data.n_channels, seq_len=data.seq_len,
                 num_classes=data.n_classes)
    return steps_to_epochs(replace(cfg, model=mc), len(data.train.x))


def build_for(data: Dataset, cfg: ExperimentConfig) -> tuple[ExperimentConfig, CBDModel]:
    """:func:`for_data`'s config and the model it builds (seeded)."""
    cfg = for_data(cfg, data)
    seed_everything(cfg.train.seed)
    return cfg, build_model(cfg.model)


def _prepare(cfg: ExperimentConfig, data: Dataset, rt: Runtime,
             state: dict[str, Any] | None) -> tuple[ExperimentConfig, CBDModel]:
    if cfg.train.num_threads and rt.device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads)
    cfg, model = build_for(data, cfg)
    model.to(rt.device)
    if state is not None:
        model.load_state_dict(state["model"])
    if cfg.train.compile:
        model.compile()
    return cfg, model


def run_trial(cfg: ExperimentConfig, data: Dataset, report: Report, *,
              rt: Runtime | None = None, state: dict[str, Any] | None = None) -> TrialResult:
    """Pretrain -> classifier stage(s), cross-validated -> refit -> test once.

    Args:
        cfg: the whole experiment (validated).
        data: train/val/test splits; test is read once, at the end.
        report: ``report(metrics, payload)`` at every evaluation point; the last call carries the
            final metrics (``final=1``, ``val_accuracy`` and ``val_accuracy_se`` at the selected
            stage and epoch count, ``test_accuracy``, ``test_f1``).
        rt: device and data-parallel layout; ``Runtime(resolve_device(cfg.train))`` if None.
        state: a checkpoint payload from an earlier ``report`` of this trial to resume from.

    Returns:
        A :class:`TrialResult`; ``status="diverged"`` with the reason when a loss became NaN/inf
        (that reason is also in the final report).
    """
    rt = rt or Runtime(device=resolve_device(cfg.train))
    t0 = time.perf_counter()
    cfg, model = _prepare(cfg, data, rt, state)
    done = {s: StageResult(**v) for s, v in (state or {}).get("stages", {}).items()}
    encoder: dict[str, Any] = {}  # where the pretrained encoder came from (_pretrained)

    def report_with_stages(metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        metrics = {**metrics, **encoder}  # every report after pretraining names its encoder
        if payload is not None:
            payload = {**payload, "stages": {s: vars(r) for s, r in done.items()},
                       "encoder": dict(encoder)}
        report(metrics, payload)

    try:
        encoder.update(_pretrained(model, data, cfg, rt, report_with_stages, state))
        pool = selection_pool(data, cfg)
        _fit_stages(model, pool, cfg, rt, data.n_classes, done, report_with_stages)
        chosen = max(done.values(), key=StageResult.key)
        clf = _final_classifier(model, data, cfg, rt, chosen, pool.holdout)
    except TrialDiverged as exc:
        # val_accuracy 0: a diverged configuration ranks below every trial that trained.
        final = {reports.STAGE: reports.FINAL_STAGE, reports.FINAL: 1, reports.DIVERGED: 1,
                 reports.REASON: str(exc), reports.VAL_ACCURACY: 0.0,
                 reports.WALL_S: time.perf_counter() - t0, **encoder}
        report(final, None)
        return TrialResult(status="diverged", metrics=final, reason=str(exc))

    final = _final_metrics(model, clf, data, cfg, rt, chosen, done, holdout=pool.holdout,
                           t0=t0, encoder=encoder)
    report(final, None)
    return TrialResult(status="completed", metrics=final, classifier=clf, selected=chosen)


def _fit_stages(model: CBDModel, pool: Pool, cfg: ExperimentConfig, rt: Runtime, n_classes: int,
                done: dict[str, StageResult], report: Report) -> None:
    """Fit the classifier stages not in ``done`` (one restored from a checkpoint keeps its
    selection), adding each to ``done`` and reporting its close with a checkpoint."""
    for stage in reports.stages(cfg.train):
        if stage in done:  # finished before a restart: re-use its selection
            continue
        done[stage] = classify.fit_stage(model, pool, cfg, rt, stage, n_classes, report)
        report({reports.STAGE: stage, reports.EPOCH: done[stage].epoch, reports.STAGE_DONE: 1,
                **done[stage].metrics()},
               {reports.STAGE: stage, reports.EPOCH: done[stage].epoch,
                "model": copy.deepcopy(model.state_dict())})


def _final_metrics(model: CBDModel, clf: CBDClassifier, data: Dataset, cfg: ExperimentConfig,
                   rt: Runtime, chosen: StageResult, done: dict[str, StageResult], *,
                   holdout: bool, t0: float, encoder: dict[str, Any]) -> dict[str, Any]:
    """A completed trial's final report: the selected stage's validation metrics, each stage's
    val accuracy, the test metrics (the test split's only read), wall time and diagnostics."""
    final = {reports.SELECTED_STAGE: chosen.stage, reports.SELECTED_EPOCH: chosen.epoch,
             reports.CV_FOLDS: chosen.folds if not holdout else 0,
             **chosen.metrics(),
             **{reports.stage_metric(s): r.val["accuracy"] for s, r in done.items()},
             reports.TEMPERATURE: chosen.temperature,
             **_test_once(clf, data, cfg, rt)[0]}
    final.update({reports.STAGE: reports.FINAL_STAGE, reports.FINAL: 1, reports.DIVERGED: 0,
                  reports.WALL_S: time.perf_counter() - t0,
                  reports.N_PARAMS: sum(p.numel() for p in model.parameters()), **encoder})
    final.update(diagnose(model, _diagnostic_batch(data, rt)))
    return final


def _pretrained(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
                report: Report, state: dict[str, Any] | None) -> dict[str, Any]:
    """Pretrain ``model``, or load it from the encoder cache (``rt.encoder_cache``) and replay
    the cached pretraining reports; store what it pretrains (rank 0).

    A trial resumed inside pretraining finishes its own and stores it; one resumed after it
    carries the provenance in its checkpoint. Data-parallel ranks agree on a hit (each reads the
    cache); they take no claim (see cbdtune.encoder_cache).

    Returns:
        What the final report carries: ``encoder_reused`` (0/1), ``encoder_key`` (``""``
        without a cache) and ``encoder_source_run`` (the trial that pretrained the encoder).
    """
    own = {reports.ENCODER_REUSED: 0, reports.ENCODER_KEY: "", reports.ENCODER_SOURCE: rt.trial}
    if state is not None and state[reports.STAGE] != reports.PRETRAIN:
        return dict(state.get("encoder") or own)
    if not rt.encoder_cache or cfg.train.pretrain_epochs == 0:
        pretrain(model, data, cfg, rt, report, state=state)
        return own
    cache, key = encoder_cache.EncoderCache(rt.encoder_cache), encoder_cache.pretrain_key(cfg, data)
    claim = cache.claim(key) if rt.world_size == 1 and state is None else contextlib.nullcontext()
    with claim:
        entry = _cached(cache, key, model, rt) if state is None else None
        if entry is not None:
            reused = {**own, reports.ENCODER_REUSED: 1, reports.ENCODER_KEY: key,
                      reports.ENCODER_SOURCE: str(entry.meta.get("source", ""))}
            for metrics in encoder_cache.replay(entry.meta["reports"], cfg.train):
                report({**metrics, **reused}, None)
            return reused
        made = list(state.get("pretrain_reports", [])) if state else []

        def keep(metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
            made.append(dict(metrics))  # in the checkpoint too, for a resumed trial to store
            report(metrics, None if payload is None else {**payload, "pretrain_reports": list(made)})

        pretrain(model, data, cfg, rt, keep, state=state)
        if rt.is_chief:
            try:
                cache.put(key, encoder_cache.encoder_state(model, rt.device),
                          {"inputs": encoder_cache.key_inputs(cfg, data), "reports": made,
                           "source": rt.trial})
            except OSError as exc:  # the trial goes on; the next one with this key pretrains
                encoder_cache.log.warning("encoder cache %s: cannot store %s (%s)",
                                          rt.encoder_cache, key[:12], exc)
    return {**own, reports.ENCODER_KEY: key}


def _cached(cache: encoder_cache.EncoderCache, key: str, model: CBDModel,
            rt: Runtime) -> encoder_cache.Entry | None:
    """The entry for ``key`` loaded into ``model`` when every rank has one that fits, else None
    (an entry that does not fit is removed)."""
    entry = cache.get(key)
    if entry is not None:
        problem = encoder_cache.mismatch(model, entry)
        if problem:
            cache.discard(key, problem)
            entry = None
    if not _on_every_rank(entry is not None, rt):
        return None
    assert entry is not None
    encoder_cache.restore(model, entry, rt.device)
    return entry


def _on_every_rank(flag: bool, rt: Runtime) -> bool:
    """Whether ``flag`` holds on every data-parallel rank."""
    if rt.world_size == 1 or not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=rt.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _final_classifier(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
                      chosen: StageResult, holdout: bool) -> CBDClassifier:
    """Under CV, a refit on every training series at the chosen epoch count; with one validation
    split, that split's classifier at its selected epoch (the paper's protocol)."""
    if not holdout:
        return classify.refit(model, data.train.x, data.train.y, cfg, rt, chosen.stage,
                              chosen.epoch, temperature=chosen.temperature)
    clf = classify.new_classifier(model, cfg, chosen.stage, rt)
    assert chosen.weights is not None
    clf.load_state_dict(chosen.weights)
    clf.eval()
    return clf


def _test_once(clf: CBDClassifier, data: Dataset, cfg: ExperimentConfig,
               rt: Runtime) -> tuple[dict[str, float], np.ndarray]:
    """Test metrics and class probabilities (N_test, K) from one pass over the test split
    (none and an empty array without one)."""
    if data.test is None:
        return {}, np.empty((0, data.n_classes), dtype=np.float32)
    proba = classify.predict_proba(clf, data.test.x, rt, cfg.train)
    pred = proba.argmax(1)
    return {reports.TEST_ACCURACY: float(np.mean(pred == data.test.y)),
            reports.TEST_F1: macro_f1(pred, data.test.y, data.n_classes)}, proba


def refit_trial(cfg: ExperimentConfig, data: Dataset, *, stage: str, epochs: int,
                rt: Runtime | None = None, temperature: float = 1.0,
                ) -> tuple[dict[str, Any], CBDClassifier, np.ndarray]:
    """Pretrain (``cfg.train.seed``), train ``stage`` for ``epochs`` epochs on every training
    series, read the test split once. The classifier's logits are divided by ``temperature``
    (a trial's final ``temperature``, fitted on its out-of-fold predictions).

    Returns:
        ``(metrics, classifier, test probabilities (N_test, K) or an empty array)``.
    """
    rt = rt or Runtime(device=resolve_device(cfg.train))
    t0 = time.perf_counter()
    cfg, model = _prepare(cfg, data, rt, None)
    root = rt.encoder_cache
    reused = bool(root and cfg.train.pretrain_epochs) and _cached(
        encoder_cache.EncoderCache(str(root)), encoder_cache.pretrain_key(cfg, data),
        model, rt) is not None
    if not reused:  # a refit reads the cache (the trial's seed is often a refit seed), never stores
        pretrain(model, data, cfg, rt, lambda _m, _s: None, probes=False)
    clf = classify.refit(model, data.train.x, data.train.y, cfg, rt, stage, epochs,
                         temperature=temperature)
    test, proba = _test_once(clf, data, cfg, rt)
    metrics: dict[str, Any] = {reports.STAGE: reports.REFIT_STAGE, reports.SEED: cfg.train.seed,
                               reports.REFIT_STAGE_KEY: stage, reports.REFIT_EPOCHS: epochs,
                               reports.ENCODER_REUSED: int(reused), **test,
                               reports.WALL_S: time.perf_counter() - t0}
    return metrics, clf, proba
