"""Ensemble selection: greedy forward selection with replacement over out-of-fold class
probabilities (Caruana et al., "Ensemble Selection from Libraries of Models", ICML 2004).

Every candidate (a search trial, a baseline) gives its out-of-fold probabilities (N, K) on the same
training series in the same order. The ensemble starts empty (or from the best single models,
Caruana's "sorted ensemble initialisation", Section 2.1) and each round adds, with replacement, the
candidate whose addition gives the lowest log-loss of the equally weighted average of the members
picked so far; a candidate picked twice counts twice (Section 2.1, "selection with replacement").
The ensemble returned is the prefix of the rounds with the lowest log-loss (Section 2.1: the
hillclimb set picks the ensemble size), so a member's weight is its picks over the prefix's length.

On small data the out-of-fold estimate is noisy; log-loss is a proper score that separates models
accuracy ties (auto-sklearn and AutoGluon select on it for the same reason).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from cbdtune.config import CbdtuneError

EPS = 1e-15  # probabilities are clipped to [EPS, 1] before the log (sklearn's log_loss of old)
ROW_SUM_TOL = 1e-3  # float32 probabilities of a softmax sum to 1 within ~1e-6
TIE_TOL = 1e-12  # log-losses this close are a tie, decided by accuracy and then by name


class EnsembleError(CbdtuneError):
    """Candidates or labels that ensemble selection cannot use."""


@dataclass(frozen=True)
class Round:
    """One round of the selection: the member it added and the ensemble's scores after it."""

    index: int  # 1-based
    added: str
    log_loss: float
    accuracy: float


@dataclass(frozen=True, eq=False)
class Selection:
    """The selected ensemble.

    Attributes:
        weights: candidate name -> fraction of the picks, each > 0, summing to 1 (sorted by name).
        counts: candidate name -> number of picks in the kept prefix.
        proba: the ensemble's out-of-fold probabilities, float64 (N, K).
        log_loss: its out-of-fold log-loss.
        accuracy: its out-of-fold accuracy, in [0, 1].
        trace: every round run, kept prefix or not.
        n_rounds: the kept prefix's length (the rounds whose picks the weights count).
    """

    weights: dict[str, float]
    counts: dict[str, int]
    proba: np.ndarray
    log_loss: float
    accuracy: float
    trace: tuple[Round, ...]
    n_rounds: int


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class, probabilities clipped to [EPS, 1].

    Args:
        proba: class probabilities (N, K), rows summing to 1.
        y: int labels (N,) in 0..K-1.

    Returns:
        The log-loss (natural log), as ``sklearn.metrics.log_loss(y, proba, labels=range(K))``.
    """
    p = proba[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.clip(p, EPS, 1.0))))


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose highest probability is the true class (first maximum on ties)."""
    return float(np.mean(proba.argmax(axis=1) == y))


def restrict(candidates: Mapping[str, np.ndarray],
             keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
    """The candidates whose name ``keep`` accepts, e.g. only the CBD trials.

    Args:
        candidates: name -> out-of-fold probabilities (N, K).
        keep: predicate on a candidate's name.

    Returns:
        A new dict of the kept candidates, in the original order.

    Raises:
        EnsembleError: ``keep`` accepts none of them.

    Example:
        >>> cbd = restrict(oof, lambda name: not name.startswith("minirocket"))  # doctest: +SKIP
    """
    kept = {name: p for name, p in candidates.items() if keep(name)}
    if not kept:
        raise EnsembleError(f"ensemble selection: the restriction keeps none of the "
                            f"{len(candidates)} candidates ({', '.join(sorted(candidates))}); "
                            f"loosen it or add candidates")
    return kept


def blend(weights: Mapping[str, float], probas: Mapping[str, np.ndarray]) -> np.ndarray:
    """The weighted average of the members' probabilities (e.g. on the test split).

    Args:
        weights: name -> weight (a :attr:`Selection.weights`), summing to 1.
        probas: name -> probabilities (M, K); must hold every weighted name.

    Returns:
        float64 (M, K).

    Raises:
        EnsembleError: no weights, a weighted member has no probabilities, or the shapes differ.
    """
    missing = sorted(set(weights) - set(probas))
    if not weights:
        raise EnsembleError("ensemble blend: no members; blend a Selection's weights")
    if missing:
        raise EnsembleError(f"ensemble blend: no probabilities for member(s) {', '.join(missing)}; "
                            f"predict with every member of the selection")
    shapes = {np.shape(probas[name]) for name in weights}
    if len(shapes) != 1:
        raise EnsembleError(f"ensemble blend: members' probabilities differ in shape "
                            f"{sorted(shapes)}; predict every member on the same series")
    out = np.zeros(shapes.pop(), dtype=np.float64)
    for name, w in weights.items():
        out += w * np.asarray(probas[name], dtype=np.float64)
    return out


def select(candidates: Mapping[str, np.ndarray], y: np.ndarray, *, rounds: int = 25,
           init: int = 0) -> Selection:
    """Greedy forward ensemble selection with replacement (Caruana et al., ICML 2004, Section 2).

    Each round adds the candidate that gives the lowest log-loss of the average of the picks; ties
    (within ``TIE_TOL``) go to the higher accuracy, then to the name first in sort order, so the
    result does not depend on the mapping's order.

    Args:
        candidates: name -> out-of-fold probabilities (N, K) on the same training series, in the
            same order; finite, in [0, 1], rows summing to 1 (within ``ROW_SUM_TOL``).
        y: int labels (N,) in 0..K-1.
        rounds: picks in all, initialisation included, >= 1.
        init: start from this many best single candidates, each picked once (Caruana's sorted
            initialisation; 0 = start empty), 0 <= init <= min(rounds, number of candidates).

    Returns:
        The :class:`Selection`: the prefix of the picks with the lowest log-loss.

    Raises:
        EnsembleError: no candidates, shapes that differ, non-finite values, rows that do not sum
            to 1, labels out of range, or ``rounds``/``init`` out of range.
    """
    names = sorted(candidates)
    stack, y = _validated(candidates, names, y, rounds, init)
    singles = [(log_loss(p, y), -accuracy(p, y), n) for n, p in zip(names, stack, strict=True)]
    order = [names.index(n) for *_, n in sorted(singles)]
    total = np.zeros_like(stack[0])
    picks: list[int] = []
    trace: list[Round] = []
    for r in range(rounds):
        if r < init:
            best = order[r]
        else:
            best = _best_addition(stack, total, len(picks), y, names)
        picks.append(best)
        total += stack[best]
        mean = total / len(picks)
        trace.append(Round(r + 1, names[best], log_loss(mean, y), accuracy(mean, y)))
    # The best prefix; the first on ties (the smaller ensemble).
    keep = min(range(rounds), key=lambda i: (trace[i].log_loss, -trace[i].accuracy, i)) + 1
    counts = Counter(names[i] for i in picks[:keep])
    proba = np.mean(stack[picks[:keep]], axis=0)
    return Selection(weights={n: counts[n] / keep for n in sorted(counts)},
                     counts={n: counts[n] for n in sorted(counts)}, proba=proba,
                     log_loss=trace[keep - 1].log_loss, accuracy=trace[keep - 1].accuracy,
                     trace=tuple(trace), n_rounds=keep)


def _best_addition(stack: np.ndarray, total: np.ndarray, n_picked: int, y: np.ndarray,
                   names: list[str]) -> int:
    """Index of the candidate whose addition to ``total`` (the sum of the picks so far) gives the
    lowest log-loss; ties by accuracy, then by name (``names`` is sorted, so the lower index)."""
    trial = (total[None] + stack) / (n_picked + 1)  # (M, N, K): every candidate added at once
    rows = np.arange(len(y))
    losses = -np.mean(np.log(np.clip(trial[:, rows, y], EPS, 1.0)), axis=1)
    accs = np.mean(trial.argmax(axis=2) == y[None], axis=1)
    tied = np.flatnonzero(losses <= losses.min() + TIE_TOL)
    return int(tied[np.argmax(accs[tied])])  # argmax: the first (lowest name) of equal accuracies


def _validated(candidates: Mapping[str, np.ndarray], names: list[str], y: np.ndarray,
               rounds: int, init: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidates stacked as float64 (M, N, K) in ``names`` order, and ``y`` as int64."""
    if not names:
        raise EnsembleError("ensemble selection: no candidates; complete at least one trial or "
                            "add a baseline")
    if rounds < 1 or not 0 <= init <= min(rounds, len(names)):
        raise EnsembleError(f"ensemble selection: rounds must be >= 1 and init in 0..min(rounds, "
                            f"{len(names)} candidates), but got rounds={rounds}, init={init}")
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise EnsembleError(f"ensemble selection: labels must be ints of shape (N,), but got "
                            f"dtype {y.dtype} shape {y.shape}")
    arrays = [np.asarray(candidates[n], dtype=np.float64) for n in names]
    for name, p in zip(names, arrays, strict=True):
        _check_proba(name, p, y)
    widths = {p.shape[1] for p in arrays}
    if len(widths) != 1:
        raise EnsembleError(f"ensemble selection: candidates disagree on the number of classes "
                            f"{sorted(widths)}; every candidate must score the same K classes")
    return np.stack(arrays), y.astype(np.int64)


def _check_proba(name: str, p: np.ndarray, y: np.ndarray) -> None:
    """One candidate's probabilities: (N, K) with N = len(y), labels < K, finite, rows sum to 1."""
    where = f"ensemble selection: candidate {name!r}"
    if p.ndim != 2 or p.shape[0] != len(y):
        raise EnsembleError(f"{where}: probabilities must be (N, K) with N={len(y)} labels, but "
                            f"got shape {p.shape}; give out-of-fold predictions on every series")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise EnsembleError(f"{where}: labels must be in 0..{p.shape[1] - 1} for K={p.shape[1]} "
                            f"classes, but got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0:
        raise EnsembleError(f"{where}: probabilities must be finite and in [0, 1]; check the "
                            f"trial's out-of-fold predictions")
    worst = float(np.max(np.abs(p.sum(axis=1) - 1.0), initial=0.0))
    if worst > ROW_SUM_TOL:
        raise EnsembleError(f"{where}: rows must sum to 1 (within {ROW_SUM_TOL}), but one is off "
                            f"by {worst:.3g}; pass probabilities (a softmax), not scores")
