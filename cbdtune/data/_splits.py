"""Model-selection splits of an archive's train split: one stratified validation split, or
stratified (repeated) k-fold cross-validation folds."""

from __future__ import annotations

import warnings

import numpy as np


def stratified_split(y: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into train and validation parts, class by class.

    Each class with ``n`` members gives ``round(n * val_fraction)`` of them to validation, kept
    within ``1 .. n-1`` so that every class with two or more members appears in both parts (a
    class with one member stays in train). Rounding per class keeps each class's proportion
    within one member of the target.

    Args:
        y: int labels [N].
        val_fraction: target share of validation, in (0, 1).
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same split, in any
            process (the global ``np.random`` is never used).

    Returns:
        ``(train_idx, val_idx)``, each sorted ascending so the archive's order is kept.
    """
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for label in np.unique(y):  # sorted, so the rng is consumed in a fixed order
        members = rng.permutation(np.flatnonzero(y == label))
        n = members.size
        n_val = int(np.clip(round(n * val_fraction), 1, n - 1)) if n >= 2 else 0
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    empty = np.empty(0, dtype=np.int64)
    train_idx = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def stratified_folds(y: np.ndarray, k: int, seed: int,
                     repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold cross-validation folds over ``0..N-1``, repeated with fresh shuffles.

    scikit-learn's ``RepeatedStratifiedKFold``: within one repeat the validation parts are
    disjoint and cover every index once, and each class is spread over the folds as evenly as its
    size allows. ``k`` is lowered to the size of the largest class when no class could fill it
    (a class smaller than ``k`` then misses from some folds' validation parts).

    Args:
        y: int labels [N].
        k: folds per repeat, >= 2.
        seed: seeds the shuffles; the same seed gives the same folds in any process.
        repeats: independent repetitions (repeated k-fold, for tiny datasets).

    Returns:
        ``k * repeats`` pairs ``(train_idx, val_idx)``, each sorted ascending.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold  # ~2 s to import: only here

    k = min(k, int(np.bincount(y).max()), len(y))
    if k < 2:
        raise ValueError(f"cross-validation needs two series of one class, got labels {y}")
    splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed % 2**32)
    with warnings.catch_warnings():  # "The least populated class has only n members": expected
        warnings.simplefilter("ignore", UserWarning)
        return [(np.sort(tr).astype(np.int64), np.sort(va).astype(np.int64))
                for tr, va in splitter.split(np.zeros(len(y)), y)]
