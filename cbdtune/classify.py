"""The classifier stages of a trial, scored by cross-validation and refit on every training series.

Selection (``data.cv_folds = k > 0``, the default): one classifier per stratified fold of the
training split, all trained in lockstep, epoch by epoch, so that after every epoch the *mean CV
curve* (accuracy and loss averaged over the folds' held-out parts) is known. The stage's estimate
is that curve at one epoch count, the one with the best mean accuracy (ties: lower mean loss),
not a per-fold argmax; its standard error is the folds' spread there over sqrt(k). The refit
then trains one classifier on every training series for that many epochs, and that classifier
is what reads the test split and what a user takes away.

With ``data.cv_folds = 0`` there is one fold, the validation split, and the weights of the
selected epoch are kept and tested: the paper's protocol with the selection made on validation.

    pool (train [+ val]) --folds--> k fold classifiers, lockstep --mean curve--> epoch e*
                         --refit--> one classifier on all of train, e* epochs -> test once

What differs between stages (what they read from the encoder, how they fit and refit, their
head) lives in the stage objects of :mod:`cbdtune.stages`, found by name; this module holds what
they share: the pool and its folds, the lockstep loop of the epoch stages (:func:`fit_lockstep`),
the temperature, and the by-name entry points :func:`fit_stage`, :func:`refit` and
:func:`new_classifier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor, nn

from cbdtune import reports, stages
from cbdtune.config import ExperimentConfig, TrainConfig
from cbdtune.data import Dataset, stratified_folds
from cbdtune.model import CBDClassifier, CBDModel, ClassifierHead
from cbdtune.runtime import (
    Report,
    Runtime,
    as_tensor,
    autocast,
    check_finite,
    evaluate,
    for_epoch,
    fused,
    in_batches,
    make_loader,
    progress_bar,
)

if TYPE_CHECKING:
    from cbdtune.stages.base import EpochStage

@dataclass(frozen=True)
class Pool:
    """The labelled series a stage selects on, and its folds (index pairs into them)."""

    x: np.ndarray  # (N, C, L) raw series
    y: np.ndarray  # (N,)
    folds: list[tuple[np.ndarray, np.ndarray]]
    holdout: bool  # one fold = the validation split (cv_folds = 0)


def selection_pool(data: Dataset, cfg: ExperimentConfig) -> Pool:
    """Cross-validation folds over ``data.train``, or the train/validation split as one fold."""
    if cfg.data.cv_folds:
        folds = stratified_folds(data.train.y, cfg.data.cv_folds, cfg.train.seed,
                                 cfg.data.cv_repeats)
        return Pool(data.train.x, data.train.y, folds, holdout=False)
    n, m = len(data.train), len(data.val)
    return Pool(np.concatenate([data.train.x, data.val.x]),
                np.concatenate([data.train.y, data.val.y]),
                [(np.arange(n), np.arange(n, n + m))], holdout=True)


def probe_pool(data: Dataset, cfg: ExperimentConfig) -> Pool:
    """The pool of the pretraining probes: :func:`selection_pool`, or, when it holds more than
    ``train.probe_max_series`` series, a stratified subsample of that many (drawn with
    ``train.seed``; under CV with its own folds, with one validation split from each part).

    The probes only rank encoders for ASHA, and the ridge readout's eigendecomposition is
    O(n^3) in the fold's size n (cbdtune.ridge); the classifier stages and the refit use every
    series."""
    pool = selection_pool(data, cfg)
    cap, seed = cfg.train.probe_max_series, cfg.train.seed
    if not cap or len(pool.y) <= cap:
        return pool
    if not pool.holdout:
        keep = stratified_subsample(pool.y, cap, seed)
        return Pool(pool.x[keep], pool.y[keep],
                    stratified_folds(pool.y[keep], cfg.data.cv_folds, seed, cfg.data.cv_repeats),
                    holdout=False)
    tr, va = pool.folds[0]
    n = round(cap * len(tr) / len(pool.y))
    parts = [idx[stratified_subsample(pool.y[idx], size, seed)]
             for idx, size in ((tr, n), (va, cap - n))]
    keep = np.concatenate(parts)
    return Pool(pool.x[keep], pool.y[keep], [(np.arange(n), np.arange(n, cap))], holdout=True)


def stratified_subsample(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` indices of ``y`` (sorted), each class's share kept: ``size`` times it, rounded
    down, plus one for the classes of the largest remainders (Hamilton's apportionment); the
    members drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(y, return_counts=True)  # sorted: the rng is used in a fixed order
    quota = counts * size / len(y)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[:size - take.sum()]] += 1
    parts = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(labels, take,
                                                                          strict=True)]
    return np.sort(np.concatenate(parts))


# ---- a stage by name (the registry: cbdtune.stages) ---------------------------------------------


def new_classifier(model: CBDModel, cfg: ExperimentConfig, stage: str, rt: Runtime,
                   salt: int = 0) -> CBDClassifier:
    """Stage ``stage``'s classifier: its encoder and a seeded new head (fold ``salt``)."""
    return stages.get(stage).classifier(model, cfg, rt, salt)


def fit_stage(model: CBDModel, pool: Pool, cfg: ExperimentConfig, rt: Runtime, stage: str,
              n_classes: int, report: Report | None = None) -> StageResult:
    """Fit stage ``stage`` on the folds of ``pool`` and select its point
    (:meth:`cbdtune.stages.base.Stage.fit`)."""
    return stages.get(stage).fit(model, pool, cfg, rt, n_classes, report)


def refit(model: CBDModel, x: np.ndarray, y: np.ndarray, cfg: ExperimentConfig, rt: Runtime,
          stage: str, epochs: int, *, temperature: float = 1.0) -> CBDClassifier:
    """One classifier of ``stage`` on every series given, at its selected point ``epochs`` (no
    validation); its logits are divided by ``temperature`` (:attr:`StageResult.temperature`)."""
    clf = stages.get(stage).refit(model, x, y, cfg, rt, epochs)
    clf.temperature.fill_(temperature)
    return clf.eval()


# ---- one fold's classifier ---------------------------------------------------------------------


class FoldRun:
    """One classifier on one fold: its module, optimizer, LR schedule and batches.

    ``inputs`` are what the stage reads (:meth:`cbdtune.stages.base.Stage.inputs`), indexed like
    the pool. ``val_idx`` None trains without scoring (the refit).
    """

    def __init__(self, clf: CBDClassifier, stage: EpochStage, inputs: tuple[Tensor, ...],
                 y: Tensor, train_idx: np.ndarray, val_idx: np.ndarray | None,
                 cfg: ExperimentConfig, rt: Runtime) -> None:
        tc = cfg.train
        self.clf, self.stage, self.tc, self.rt = clf, stage.name, tc, rt
        self.trainable: nn.Module = stage.trainable(clf)
        head = clf.head
        assert isinstance(head, ClassifierHead), f"{stage.name}: an epoch stage trains a ClassifierHead"
        inputs = stage.head_inputs(inputs, head)
        if head.n_stats:
            head.fit_stats(stage.train_stats(inputs, train_idx).to(rt.device))
        self.forward = self.trainable
        self.wrapped = rt.wrap_model(self.trainable)
        self.opt = torch.optim.Adam([p for p in self.trainable.parameters() if p.requires_grad],
                                    lr=tc.classifier_lr, fused=fused(rt.device))  # [C] Adam
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience)
        train = tuple(t[train_idx] for t in inputs) + (y[train_idx],)
        per_rank = max(1, tc.batch_size // rt.world_size)
        self.loader = make_loader(train, per_rank, shuffle=True, seed=tc.seed, rt=rt)
        self.val = None if val_idx is None else (
            tuple(t[val_idx].to(rt.device) for t in inputs), y[val_idx])
        self.logits = torch.empty(0)  # the last score's held-out logits

    def train_epoch(self, epoch: int, augment: Callable[[Tensor], Tensor] | None) -> float:
        self.trainable.train()
        total, n = 0.0, 0
        for *xb, yb in for_epoch(self.loader, epoch, self.tc.seed):
            xb = [t.to(self.rt.device, non_blocking=True) for t in xb]
            if augment is not None:
                xb[0] = augment(xb[0])
            yb = yb.to(self.rt.device, non_blocking=True)
            with autocast(self.rt, self.tc):
                loss = F.cross_entropy(self.wrapped(*xb).float(), yb,
                                       label_smoothing=self.tc.label_smoothing)
            check_finite(loss.item(), f"{self.stage} epoch {epoch}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(yb)
            n += len(yb)
        return total / max(n, 1)

    def score(self, n_classes: int) -> dict[str, float]:
        """The held-out metrics; their logits (N_val, K, float32, CPU) stay in ``logits``."""
        assert self.val is not None
        self.trainable.eval()
        inputs, y = self.val
        with torch.no_grad(), autocast(self.rt, self.tc):
            self.logits = torch.cat([self.forward(*(t[i:i + 256] for t in inputs)).float()
                                     for i in range(0, len(y), 256)]).cpu()
        logits = self.logits
        return evaluate(lambda i: logits[i], torch.arange(len(y)), y, n_classes)

    def state(self) -> dict[str, Tensor]:
        return snapshot(self.clf)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """A copy of ``module``'s state_dict that later training does not change."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- an epoch stage: k folds in lockstep, the mean CV curve ------------------------------------


@dataclass
class StageResult:
    """A stage's estimate at the selected epoch count, and what it needs to be tested."""

    stage: str
    epoch: int  # the selected epoch count (from 1)
    val: dict[str, float]  # mean over folds at that epoch: accuracy, loss, f1; accuracy_se
    folds: int
    weights: dict[str, Tensor] | None = None  # the holdout fold's classifier at ``epoch``
    # Out-of-fold class probabilities (N_pool, K) at ``epoch``: each pool series' held-out
    # prediction (the mean over repeats), NaN for a series no fold holds out. ``_raw`` before
    # temperature scaling, the other after; ``temperature`` is fitted on them (fit_temperature).
    oof_proba_raw: Tensor | None = None
    oof_proba: Tensor | None = None
    temperature: float = 1.0
    # Each fold's accuracy, loss and f1 at ``epoch`` (fold order): what a report carries as
    # ``val_<metric>_folds`` (cbdtune.reports.folds_of) for ASHA's paired comparison.
    fold_scores: dict[str, list[float]] = field(default_factory=dict)

    def key(self) -> tuple[float, float]:
        """Ordering: the higher mean accuracy, then the lower mean loss."""
        return self.val["accuracy"], -self.val["loss"]

    def metrics(self) -> dict[str, Any]:
        """``val_accuracy``, ``val_accuracy_se``, ``val_loss``, ``val_f1`` and their
        ``..._folds`` lists: the report keys of this estimate."""
        return reports.val_metrics(self.val, self.fold_scores)


def fit_lockstep(stage: EpochStage, model: CBDModel, pool: Pool, cfg: ExperimentConfig,
                 rt: Runtime, n_classes: int, report: Report | None = None) -> StageResult:
    """Train one classifier per fold in lockstep; select the epoch count on the mean CV curve.

    Reports after every epoch: the mean training loss, the mean held-out accuracy and loss at
    this epoch (``val_accuracy_epoch``, ``val_loss``) and ``val_accuracy``, the stage's estimate
    if it stopped here (the best point of the mean curve so far): what ASHA compares at a rung.
    Each metric's per-fold scores at its point go with it (``val_accuracy_folds``, ...).
    Stops early after ``train.early_stop_patience`` epochs without a better point.
    """
    tc = cfg.train
    inputs, y = stage.inputs(model, pool.x, cfg, rt), as_tensor(pool.y)
    runs = [FoldRun(stage.classifier(model, cfg, rt, salt=i), stage, inputs, y, tr, va, cfg, rt)
            for i, (tr, va) in enumerate(pool.folds)]
    aug = stage.augment(tc)
    best: StageResult | None = None
    best_logits: list[Tensor] = []
    bar = progress_bar(tc.classifier_epochs, stage.name, rt) if report is not None else None
    for epoch in range(1, tc.classifier_epochs + 1):
        train_loss = float(np.mean([r.train_epoch(epoch, aug) for r in runs]))
        scores = [r.score(n_classes) for r in runs]
        point = mean_point(scores)
        for r, s in zip(runs, scores, strict=True):
            # Under CV the schedule follows the training loss, which the refit has too.
            r.sched.step(s["loss"] if pool.holdout else train_loss)
        if best is None or (point["accuracy"], -point["loss"]) > best.key():
            best = StageResult(stage.name, epoch, point, len(runs),
                               runs[0].state() if pool.holdout else None,
                               fold_scores=fold_scores(scores))
            best_logits = [r.logits for r in runs]
        if bar is not None:
            bar.set_postfix(cv_acc=f"{point['accuracy']:.3f}", refresh=False)
            bar.update(1)
        if report is not None:
            report(_epoch_report(stage.name, epoch, train_loss, best, point, scores,
                                 runs[0].opt.param_groups[0]["lr"]), None)
        if tc.early_stop_patience and epoch - best.epoch >= tc.early_stop_patience:
            break
    if bar is not None:
        bar.close()
    assert best is not None, "train.classifier_epochs must be >= 1"
    return calibrated(best, pool, [lg.double().numpy() for lg in best_logits])


def _epoch_report(stage: str, epoch: int, train_loss: float, best: StageResult,
                  point: dict[str, float], scores: list[dict[str, float]],
                  lr: float) -> dict[str, Any]:
    """One epoch's report: ``val_accuracy`` (and its se and folds) at the best point so far,
    the loss and f1 (and their folds) at this epoch."""
    so_far, now = best.metrics(), reports.val_metrics(point, fold_scores(scores))
    acc = (reports.VAL_ACCURACY, reports.VAL_ACCURACY_SE, reports.folds_of(reports.VAL_ACCURACY))
    at_epoch = (reports.VAL_LOSS, reports.VAL_F1, *map(reports.folds_of, (reports.VAL_LOSS,
                                                                           reports.VAL_F1)))
    return {reports.STAGE: stage, reports.EPOCH: epoch, reports.TRAIN_LOSS: train_loss,
            **{k: so_far[k] for k in acc}, reports.VAL_ACCURACY_EPOCH: point["accuracy"],
            **{k: now[k] for k in at_epoch}, reports.LR: lr}


def train_for(stage: EpochStage, model: CBDModel, x: np.ndarray, y: np.ndarray,
              cfg: ExperimentConfig, rt: Runtime, epochs: int) -> CBDClassifier:
    """One classifier of an epoch stage on every series given, for exactly ``epochs`` epochs."""
    inputs = stage.inputs(model, x, cfg, rt)
    clf = stage.classifier(model, cfg, rt)
    run = FoldRun(clf, stage, inputs, as_tensor(y), np.arange(len(y)), None, cfg, rt)
    aug = stage.augment(cfg.train)
    for epoch in range(1, epochs + 1):
        run.sched.step(run.train_epoch(epoch, aug))
    return clf


# ---- calibration: one temperature on the out-of-fold scores ----------------------------------


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 that minimises the log-loss of softmax(scores / T) (N, K) on labels
    ``y`` (temperature scaling, Guo et al., ICML 2017): a bounded 1-D search over log T."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.long)

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(s / math.exp(log_t), t))

    found = minimize_scalar(loss, bounds=(math.log(1e-3), math.log(1e3)), method="bounded",
                            options={"xatol": 1e-4})
    return float(math.exp(found.x)) if loss(found.x) < loss(0.0) else 1.0


def calibrated(result: StageResult, pool: Pool, held_out: list[np.ndarray]) -> StageResult:
    """``result`` with its temperature fitted on the folds' held-out scores ``held_out`` (one
    (N_val, K) array per fold, at the selected point) and the out-of-fold probabilities before
    and after it; the holdout classifier's weights carry the temperature."""
    val_idx = np.concatenate([va for _, va in pool.folds])
    scores = np.concatenate(held_out)
    temperature = fit_temperature(scores, pool.y[val_idx])
    probas = []
    for t in (1.0, temperature):
        p = torch.as_tensor(scores / t).softmax(-1).numpy()
        total = np.zeros((len(pool.y), p.shape[1]))
        np.add.at(total, val_idx, p)
        count = np.bincount(val_idx, minlength=len(pool.y))[:, None]
        with np.errstate(invalid="ignore"):  # a series no fold holds out: NaN
            probas.append(torch.as_tensor(total / count, dtype=torch.float32))
    weights = result.weights
    if weights is not None:
        weights = {**weights, "temperature": torch.tensor(temperature, dtype=torch.float32)}
    return replace(result, weights=weights, oof_proba_raw=probas[0], oof_proba=probas[1],
                   temperature=temperature)


def mean_point(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean CV curve at one epoch, with the standard error of the accuracy over folds."""
    acc = np.array([s["accuracy"] for s in scores])
    se = float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else math.nan
    return {"accuracy": float(acc.mean()), "accuracy_se": se,
            "loss": float(np.mean([s["loss"] for s in scores])),
            "f1": float(np.mean([s["f1"] for s in scores]))}


def fold_scores(scores: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each fold's accuracy, loss and f1, in fold order (the lists under ``val_*_folds``)."""
    return {k: [float(s[k]) for s in scores] for k in ("accuracy", "loss", "f1")}


def predict_proba(clf: CBDClassifier, x: np.ndarray, rt: Runtime, tc: TrainConfig) -> np.ndarray:
    """Class probabilities (N, K) of raw series, eval mode, batches of 256: the softmax of the
    classifier's logits over its temperature (``forward`` divides by it)."""
    clf.eval()
    return in_batches(clf, as_tensor(x), rt, tc).softmax(-1).cpu().numpy()


# ---- input augmentation (fine-tuning: train.augment_*; pretraining: train.pretrain_augment) ----


def augmenter(jitter: float = 0.0, scale: float = 0.0,
              crop: float = 0.0) -> Callable[[Tensor], Tensor] | None:
    """Random jitter (x each series' std), per-channel scaling (std of the factor around 1) and
    window crop (share of the length cut, then stretched) of raw series, or None when all are 0.

    Draws from torch's global generator (seeded per trial), so a run is reproducible.
    """
    if not (jitter or scale or crop):
        return None

    def augment(x: Tensor) -> Tensor:  # (B, C, L)
        if crop:
            x = window_crop(x, crop)
        std = x.std(dim=-1, keepdim=True, correction=0)
        if scale:
            x = x * (1 + scale * torch.randn(*x.shape[:2], 1, device=x.device))
        if jitter:
            x = x + jitter * std * torch.randn_like(x)
        return x

    return augment


def window_crop(x: Tensor, fraction: float) -> Tensor:
    """A random window of ``1 - fraction`` of each series, stretched back to its length."""
    B, C, L = x.shape
    keep = max(2, round(L * (1 - fraction)))
    start = torch.randint(0, L - keep + 1, (B,), device=x.device)
    idx = start[:, None] + torch.arange(keep, device=x.device)  # (B, keep)
    window = x.gather(-1, idx[:, None, :].expand(B, C, keep))
    return F.interpolate(window, size=L, mode="linear", align_corners=True)
