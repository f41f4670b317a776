"""The stratified validation split carved from an archive's train split."""

from __future__ import annotations

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
