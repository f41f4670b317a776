"""The ridge readout (``train.classifier = "ridge"``): a linear classifier on the frozen encoder's
pooled features of every depth (:class:`cbdtune.model.RidgeHead`), fit in closed form.

The classifier ROCKET and MiniRocket put on their features (Dempster et al., DMKD 2020,
https://arxiv.org/abs/1910.13051): ridge regression on +-1 one-vs-rest targets over standardised
columns, the class with the highest score wins (scikit-learn's ``RidgeClassifier``). It needs no
epochs, learning rate or early stopping. One eigendecomposition per fold gives every point of
the path: of the n x n kernel of the fold's token columns when n <= F, else of their F x F Gram
matrix, so the cost is O(n F min(n, F) + min(n, F)^3) per fold, nothing larger in n; a blend
rescales the level block, a rank-(2C) update the Woodbury identity absorbs per alpha.

Its selection "curve" is the regularisation path instead of epochs. A point of the path is a
(blend, alpha) pair. Without level features the blend is the pooled tokens alone. With
``model.level_features`` it also weighs the two blocks against each other: tokens alone; tokens
and levels, every column alike; tokens and levels, each block with the same total variance;
levels alone. The ridge stage (cbdtune.stages.ridge) scores every point on the folds and keeps the
one with the best mean accuracy; its 1-based index is the stage's ``epoch``, so a refit (and
:mod:`cbdtune.refit`'s seeds) fits the same point on every training series.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cbdtune.config import TrainConfig
from cbdtune.model import CBDClassifier, RidgeHead
from cbdtune.runtime import Runtime, as_tensor, in_batches

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
    head = clf.head
    assert isinstance(head, RidgeHead), "the ridge readout encodes through a RidgeHead"
    columns = in_batches(lambda b: head.features(*clf.features(b)), as_tensor(x), rt, tc)
    return columns.double().cpu().numpy()


def _standardiser(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``center`` and 1/std of training columns (N, F), 0 for a column that counts as constant.

    Constant is :func:`cbdtune.model.heads.constant_columns`: a spread within 1e-5 of the
    column's rms plus 1e-4 of the series' scale, the unit of every column. An absolute 1e-8
    let through the levels of z-normalised archives (spread ~3e-6, rounding) at weight ~1/3e-6.
    """
    from cbdtune.model.heads import constant_columns  # one rule for both heads

    std = z.std(axis=0)
    keep = ~constant_columns(std, np.sqrt(np.mean(z * z, axis=0)))
    return z.mean(axis=0), np.divide(1.0, std, out=np.zeros_like(std), where=keep)


def _blended(head: RidgeHead, inv_std: np.ndarray, blend: tuple[float, float]) -> np.ndarray:
    """``column_weight``: 1/std times the weight of the column's block."""
    weight = inv_std.copy()
    weight[:head.n_pooled] *= blend[0]
    weight[head.n_pooled:] *= blend[1]
    return weight


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    return 2.0 * np.eye(n_classes)[y] - 1.0  # (N, K) in {-1, +1}


@dataclass
class _Basis:
    """One training set's token block A (n, F), standardised and centred, in the eigenbasis of
    its kernel A A^T = u diag(s) u^T (rank r), and its level block B (n, p).

    Every blend and every alpha is solved from it: a blend scales the kernel to
    ``b0^2 A A^T + b1^2 B B^T``, a low-rank (p) update that the Woodbury identity absorbs, so the
    costly part (one eigendecomposition of min(n, F) columns) is paid once per fold."""

    u: np.ndarray  # (n, r)
    s: np.ndarray  # (r,)
    uy: np.ndarray  # (r, K) u^T Yc
    y_perp: np.ndarray  # (n, K) Yc - u u^T Yc
    b: np.ndarray  # (n, p)
    ub: np.ndarray  # (r, p) u^T B
    bp_y: np.ndarray  # (p, K) B_perp^T Y_perp
    bp_b: np.ndarray  # (p, p) B_perp^T B_perp


def _eigenbasis(a: np.ndarray, log: Callable[[str], None] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(u, s, v)``: the kernel's eigenbasis of ``a`` (n, F); ``v`` (F, r) when it came from the
    F x F Gram matrix (n > F), else None. Eigenvalues below rounding are dropped (their
    directions are solved as eigenvalue 0)."""
    n, f = a.shape
    t0 = time.perf_counter()
    if n <= f:
        s, u = np.linalg.eigh(a @ a.T)  # numpy runs a @ a.T as one symmetric rank-k update
        v = None
    else:
        s, v = np.linalg.eigh(a.T @ a)
    keep = s > max(float(s.max(initial=0.0)), 1e-300) * max(n, f) * np.finfo(float).eps
    s = s[keep]
    if v is not None:
        v = v[:, keep]
        u = (a @ v) / np.sqrt(s)
    else:
        u = u[:, keep]
    if log is not None:
        log(f"eigenbasis of {'kernel' if v is None else 'Gram'} {min(n, f)}x{min(n, f)} "
            f"(rank {len(s)}) in {time.perf_counter() - t0:.1f} s")
    return u, s, v


def _basis(b: np.ndarray, yc: np.ndarray, u: np.ndarray, s: np.ndarray) -> _Basis:
    uy, ub = u.T @ yc, u.T @ b
    y_perp, b_perp = yc - u @ uy, b - u @ ub
    return _Basis(u, s, uy, y_perp, b, ub, b_perp.T @ y_perp, b_perp.T @ b_perp)


def _dual(basis: _Basis, blend: tuple[float, float], alpha: float,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dual solution ``a`` = (b0^2 A A^T + b1^2 B B^T + alpha I)^-1 Yc of one (blend, alpha),
    as ``(u^T a (r, K), B^T a (p, K), x (p, K))``: x is the Woodbury correction's coefficients,
    a = u (d uy - d ub x) + (y_perp - B_perp x) / alpha with d = 1 / (b0^2 s + alpha)."""
    c0, c1 = blend[0] ** 2, blend[1] ** 2
    d = 1.0 / (c0 * basis.s + alpha)
    bt_mi_y = basis.ub.T @ (d[:, None] * basis.uy) + basis.bp_y / alpha
    bt_mi_b = basis.ub.T @ (d[:, None] * basis.ub) + basis.bp_b / alpha
    p = basis.b.shape[1]
    if c1 > 0 and p:
        x = np.linalg.solve(np.eye(p) / c1 + bt_mi_b, bt_mi_y)
    else:
        x = np.zeros_like(bt_mi_y)
    return d[:, None] * (basis.uy - basis.ub @ x), bt_mi_y - bt_mi_b @ x, x


def _split_blocks(head: RidgeHead | None, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_pooled = z.shape[1] if head is None else head.n_pooled
    return z[:, :n_pooled], z[:, n_pooled:]


def solutions(z: np.ndarray, targets: np.ndarray, alphas: tuple[float, ...]) -> list[np.ndarray]:
    """Ridge weights (p, K) on centred columns ``z`` for every alpha (scikit-learn's ``Ridge``
    with an intercept), from one eigendecomposition: the plain path, without level blocks
    (the MiniRocket baseline's, :mod:`cbdtune.baselines`)."""
    yc = targets - targets.mean(axis=0)
    empty = np.zeros((len(z), 0))
    u, s, _ = _eigenbasis(z)
    basis = _basis(empty, yc, u, s)
    out = []
    for alpha in alphas:
        uta, _, _ = _dual(basis, (1.0, 0.0), alpha)
        dual = basis.u @ uta + basis.y_perp / alpha
        out.append(z.T @ dual)
    return out


def path_outputs(head: RidgeHead, z: np.ndarray, y: np.ndarray, train_idx: np.ndarray,
                 val_idx: np.ndarray, n_classes: int,
                 log: Callable[[str], None] | None = None) -> np.ndarray:
    """One fold: the readout's scores (P, len(val_idx), K) on ``val_idx`` at every point of
    :func:`path`, each fit on ``train_idx`` alone (columns standardised on ``train_idx``).

    One eigendecomposition of the fold's token block serves every blend and alpha."""
    targets = _targets(y[train_idx], n_classes)
    mean = targets.mean(axis=0)
    z_tr = z[train_idx]
    center, inv_std = _standardiser(z_tr)
    z_tr -= center
    z_tr *= inv_std  # standardised in place: the fold's (n, F) copy is the only large one
    z_va = (z[val_idx] - center) * inv_std
    a_tr, b_tr = _split_blocks(head, z_tr)
    a_va, b_va = _split_blocks(head, z_va)
    u, s, v = _eigenbasis(a_tr, log)
    # q = A_val A^T u: the validation rows' kernel against the training rows, in the eigenbasis
    q = (a_va @ v) * np.sqrt(s) if v is not None else (a_va @ a_tr.T) @ u
    basis = _basis(b_tr, targets - mean, u, s)
    del z_tr, a_tr, u
    out = np.empty((len(path(head)), len(val_idx), n_classes))
    for i, (blend, alpha) in enumerate(path(head)):
        uta, bta, _ = _dual(basis, blend, alpha)
        out[i] = blend[0] ** 2 * (q @ uta) + blend[1] ** 2 * (b_va @ bta) + mean
    return out


def point_scores(out: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and mean squared error of the +-1 targets of scores (N, K)."""
    pred = out.argmax(axis=1)
    return {"accuracy": float(np.mean(pred == y)),
            "loss": float(np.mean((out - _targets(y, n_classes)) ** 2)),
            "f1": fast_macro_f1(pred, y, n_classes)}


def fast_macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """:func:`cbdtune.runtime.macro_f1` (scikit-learn's macro F1 over the classes present in
    ``true`` or ``pred``, 0 where undefined) from one confusion count: the path scores it at
    every point of every fold, where scikit-learn's checks cost more than the solve."""
    k = max(n_classes, int(pred.max(initial=0)) + 1, int(true.max(initial=0)) + 1)
    tp = np.bincount(true[pred == true], minlength=k).astype(float)
    n_true, n_pred = np.bincount(true, minlength=k), np.bincount(pred, minlength=k)
    present = (n_true + n_pred) > 0
    denom = n_true + n_pred
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def path_scores(head: RidgeHead, z: np.ndarray, y: np.ndarray, train_idx: np.ndarray,
                val_idx: np.ndarray, n_classes: int) -> list[dict[str, float]]:
    """One fold: :func:`point_scores` on ``val_idx`` at every point of :func:`path`."""
    outputs = path_outputs(head, z, y, train_idx, val_idx, n_classes)
    return [point_scores(out, y[val_idx], n_classes) for out in outputs]


def fit(head: RidgeHead, z: np.ndarray, y: np.ndarray, point: int, n_classes: int,
        log: Callable[[str], None] | None = None) -> None:
    """Fit the head's buffers on columns ``z`` (N, F) at path point ``point`` (0-based)."""
    blend, alpha = path(head)[point]
    center, inv_std = _standardiser(z)
    targets = _targets(y, n_classes)
    zs = (z - center) * inv_std
    a, b = _split_blocks(head, zs)
    u, s, _ = _eigenbasis(a, log)
    basis = _basis(b, targets - targets.mean(axis=0), u, s)
    uta, _, x = _dual(basis, blend, alpha)
    dual = u @ uta + (basis.y_perp - (b - u @ basis.ub) @ x) / alpha  # (N, K)
    w = np.concatenate([blend[0] * (a.T @ dual), blend[1] * (b.T @ dual)])  # X^T a, X = [b0 A, b1 B]
    weight = _blended(head, inv_std, blend)
    device = head.weight.device
    for name, value in (("center", center), ("column_weight", weight), ("weight", w.T),
                        ("bias", targets.mean(axis=0))):
        getattr(head, name).copy_(torch.as_tensor(value, dtype=torch.float32, device=device))
