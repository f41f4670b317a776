"""Ensemble selection (Caruana et al., ICML 2004) on synthetic out-of-fold probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from cbdtune.config import CbdtuneError
from cbdtune.ensemble import EnsembleError, blend, log_loss, restrict, select

N, K = 200, 3


def _labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, K, N)


def _noisy(y: np.ndarray, right: float, seed: int) -> np.ndarray:
    """Probabilities that put ``right`` on the true class of a random ~80% of rows (else on a
    wrong class) and spread the rest evenly."""
    rng = np.random.default_rng(seed)
    target = np.where(rng.random(len(y)) < 0.8, y, (y + 1) % K)
    p = np.full((len(y), K), (1.0 - right) / (K - 1))
    p[np.arange(len(y)), target] = right
    return p


def _uniform() -> np.ndarray:
    return np.full((N, K), 1.0 / K)


def test_select_picks_the_better_model() -> None:
    y = _labels()
    good, bad = _noisy(y, 0.7, seed=1), _uniform()
    sel = select({"bad": bad, "good": good}, y, rounds=10)
    assert sel.weights == {"good": 1.0}
    assert sel.log_loss == pytest.approx(log_loss(good, y))
    assert sel.trace[0].added == "good"


def test_select_weights_sum_to_one_and_match_the_proba() -> None:
    y = _labels(1)
    cands = {f"m{i}": _noisy(y, 0.5 + 0.1 * i, seed=10 + i) for i in range(4)}
    sel = select(cands, y, rounds=15)
    assert sum(sel.weights.values()) == pytest.approx(1.0)
    assert all(w > 0 for w in sel.weights.values())
    np.testing.assert_allclose(sel.proba, blend(sel.weights, cands))
    np.testing.assert_allclose(sel.proba.sum(axis=1), 1.0)
    assert len(sel.trace) == 15 and 1 <= sel.n_rounds <= 15


def test_select_repeats_a_model_with_weight_picks_over_rounds() -> None:
    # Two models that are each confident and right on complementary halves: the best mix of
    # three picks is 2:1 towards the model right on the larger share.
    y = np.zeros(90, dtype=np.int64)
    a = np.tile([0.9, 0.1], (90, 1))
    b = np.tile([0.9, 0.1], (90, 1))
    a[60:] = [0.02, 0.98]  # a is wrong (and sure) on the last 30
    b[:30] = [0.02, 0.98]  # b is wrong on the first 30
    b[30:] = [0.3, 0.7]  # and leans wrong elsewhere: a is the better single model
    sel = select({"a": a, "b": b}, y, rounds=6)  # picks a, b, a, a, b, a: the best prefix is 3
    assert [r.added for r in sel.trace] == ["a", "b", "a", "a", "b", "a"]
    assert sel.n_rounds == 3
    assert sel.counts == {"a": 2, "b": 1}
    assert sel.weights == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    np.testing.assert_allclose(sel.proba, (2 * a + b) / 3)


def test_select_keeps_the_best_prefix() -> None:
    y = _labels(2)
    good = _noisy(y, 0.8, seed=3)
    # Round 2 must add something; adding the uniform model or good again cannot beat good alone.
    sel = select({"good": good, "uniform": _uniform()}, y, rounds=4)
    assert sel.weights == {"good": 1.0}
    assert sel.log_loss <= min(r.log_loss for r in sel.trace) + 1e-12


def test_select_ties_go_to_accuracy_then_name() -> None:
    y = _labels(3)
    p = _noisy(y, 0.6, seed=4)
    sel = select({"z": p, "a": p.copy()}, y, rounds=1)
    assert sel.weights == {"a": 1.0}


def test_select_init_starts_from_the_best_singles() -> None:
    y = _labels(4)
    cands = {"good": _noisy(y, 0.8, seed=5), "fair": _noisy(y, 0.6, seed=6),
             "uniform": _uniform()}
    sel = select(cands, y, rounds=2, init=2)
    assert [r.added for r in sel.trace] == ["good", "fair"]


def test_restrict_keeps_cbd_members_only() -> None:
    y = _labels(5)
    cands = {"minirocket": _noisy(y, 0.9, seed=7), "trial_1": _noisy(y, 0.6, seed=8),
             "trial_2": _noisy(y, 0.5, seed=9)}
    assert "minirocket" in select(cands, y, rounds=5).weights
    cbd = restrict(cands, lambda name: name.startswith("trial_"))
    assert list(cbd) == ["trial_1", "trial_2"]
    assert set(select(cbd, y, rounds=5).weights) <= {"trial_1", "trial_2"}
    with pytest.raises(EnsembleError, match="keeps none"):
        restrict(cands, lambda name: False)


@pytest.mark.parametrize(("bad", "match"), [
    (np.full((N, K), 0.5), "rows must sum to 1"),
    (np.full((N - 1, K), 1.0 / K), "must be \\(N, K\\)"),
    (np.full((N, K), np.nan), "finite"),
    (np.full((N, 2), 0.5), "labels must be in"),
])
def test_select_rejects_bad_probabilities_with_one_line(bad: np.ndarray, match: str) -> None:
    y = _labels(6)
    y[0] = K - 1  # the K=2 case must see a label out of range
    with pytest.raises(CbdtuneError, match=match) as info:
        select({"ok": _uniform(), "bad": bad}, y)
    assert "\n" not in str(info.value) and "'bad'" in str(info.value)


def test_select_rejects_bad_rounds_and_no_candidates() -> None:
    y = _labels(7)
    with pytest.raises(EnsembleError, match="no candidates"):
        select({}, y)
    with pytest.raises(EnsembleError, match="rounds must be"):
        select({"u": _uniform()}, y, rounds=0)
    with pytest.raises(EnsembleError, match="init"):
        select({"u": _uniform()}, y, rounds=3, init=2)
