"""The ridge readout (``train.classifier = "ridge"``): a linear classifier on the frozen encoder's
pooled features of every depth (:class:`cbdtune.model.RidgeHead`), fit in closed form.

The classifier ROCKET and MiniRocket put on their features (Dempster et al., DMKD 2020,
https://arxiv.org/abs/1910.13051): ridge regression on +-1 one-vs-rest targets over standardised
columns, the class with the highest score wins (scikit-learn's ``RidgeClassifier``). On a few
hundred series it needs no epochs, learning rate or early stopping, and one SVD per fold gives
every regularisation strength at once.

Its selection "curve" is the regularisation path instead of epochs. A point of the path is a
(blend, alpha) pair. Without level features the blend is the pooled tokens alone. With
``model.level_features`` it also weighs the two blocks against each other: tokens alone; tokens
and levels, every column alike; tokens and levels, each block with the same total variance;
levels alone. :func:`cbdtune.classify.fit_stage` scores every point on the folds and keeps the
one with the best mean accuracy; its 1-based index is the stage's ``epoch``, so a refit (and
:mod:`cbdtune.refit`'s seeds) fits the same point on every training series.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cbdtune.config import TrainConfig
from cbdtune.model import CBDClassifier, RidgeHead
from cbdtune.runtime import Runtime, as_tensor, in_batches, macro_f1

ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-3.0, 7.5, 0.5))  # over standardised columns


def blends(head: RidgeHead) -> list[tuple[float, float]]:
    """(token block weight, level block weight) pairs the path tries, in order."""
    if not head.n_stats:
        return [(1.0, 0.0)]
    per_block = math.sqrt(head.n_pooled / head.n_stats)  # the blocks' total variances equal
    return [(1.0, 0.0), (1.0, 1.0), (1.0, per_block), (0.0, 1.0)]


def path(head: RidgeHead) -> list[tuple[tuple[float, float], float]]:
    """Every (blend, alpha) point, indexed from 0; the stage's ``epoch`` is index + 1."""
    return [(b, a) for b in blends(head) for a in ALPHAS]


def encode(clf: CBDClassifier, x: np.ndarray, rt: Runtime, tc: TrainConfig) -> np.ndarray:
    """The head's columns for raw series (N, C, L): (N, n_pooled [+ n_stats]), float64."""
    clf.eval()
    columns = in_batches(lambda b: clf.head.features(*clf.features(b)), as_tensor(x), rt, tc)
    return columns.double().cpu().numpy()


def _standardiser(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``center`` and 1/std (0 for a constant column) of training columns (N, F)."""
    std = z.std(axis=0)
    return z.mean(axis=0), np.divide(1.0, std, out=np.zeros_like(std), where=std > 1e-8)


def _blended(head: RidgeHead, inv_std: np.ndarray, blend: tuple[float, float]) -> np.ndarray:
    """``column_weight``: 1/std times the weight of the column's block."""
    weight = inv_std.copy()
    weight[:head.n_pooled] *= blend[0]
    weight[head.n_pooled:] *= blend[1]
    return weight


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    return 2.0 * np.eye(n_classes)[y] - 1.0  # (N, K) in {-1, +1}


def _solutions(z: np.ndarray, targets: np.ndarray, alphas: tuple[float, ...]) -> list[np.ndarray]:
    """Ridge weights (p, K) on centred columns for every alpha, from one thin SVD."""
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ (targets - targets.mean(axis=0))
    return [vt.T @ ((s / (s * s + a))[:, None] * uty) for a in alphas]


def path_scores(head: RidgeHead, z: np.ndarray, y: np.ndarray, train_idx: np.ndarray,
                val_idx: np.ndarray, n_classes: int) -> list[dict[str, float]]:
    """One fold: accuracy, macro-F1 and mean squared error of the +-1 targets on ``val_idx`` at
    every point of :func:`path`, each fit on ``train_idx`` alone."""
    t_tr, t_va = _targets(y[train_idx], n_classes), _targets(y[val_idx], n_classes)
    center, inv_std = _standardiser(z[train_idx])
    scores = []
    for blend in blends(head):
        weight = _blended(head, inv_std, blend)
        z_tr, z_va = (z[train_idx] - center) * weight, (z[val_idx] - center) * weight
        for w in _solutions(z_tr, t_tr, ALPHAS):
            out = z_va @ w + t_tr.mean(axis=0)
            pred = out.argmax(axis=1)
            scores.append({"accuracy": float(np.mean(pred == y[val_idx])),
                           "loss": float(np.mean((out - t_va) ** 2)),
                           "f1": macro_f1(pred, y[val_idx], n_classes)})
    return scores


def fit(head: RidgeHead, z: np.ndarray, y: np.ndarray, point: int, n_classes: int) -> None:
    """Fit the head's buffers on columns ``z`` (N, F) at path point ``point`` (0-based)."""
    blend, alpha = path(head)[point]
    center, inv_std = _standardiser(z)
    weight = _blended(head, inv_std, blend)
    targets = _targets(y, n_classes)
    (w,) = _solutions((z - center) * weight, targets, (alpha,))
    device = head.weight.device
    for name, value in (("center", center), ("column_weight", weight), ("weight", w.T),
                        ("bias", targets.mean(axis=0))):
        getattr(head, name).copy_(torch.as_tensor(value, dtype=torch.float32, device=device))
