"""The fair stopping rule (cbdtune.stopping): Tune's scheduler hooks called directly, no Ray cluster.

Rungs at iterations 1, 3 and 9 (grace 1, reduction factor 3, max_t 10). Four trials complete at
0.90, 0.92, 0.94 and 0.96: at rung 1 the cut keeps the best ceil(4/3) = 2 of them, so the trial at
the cut is the one at 0.94.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from cbdtune import reports
from cbdtune.stopping import (
    KEPT_AT_CUT,
    KEPT_EARLY,
    KEPT_WITHIN_NOISE,
    STOPPED,
    NoiseAwareASHA,
    RungEntry,
    clearly_worse,
    cut_entry,
    default_min_completed,
)

METRIC = reports.VAL_ACCURACY
STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE
FINISHED = (0.90, 0.92, 0.94, 0.96)  # the four completed trials' values (module docstring)


def _trial(trial_id: str) -> Any:
    return SimpleNamespace(trial_id=trial_id)


def _result(it: int, value: float, se: float | None = None, folds: list[float] | None = None,
            metric: str = METRIC, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {reports.ITERATION: it, metric: value, **extra}
    if se is not None:
        out[reports.se_of(metric)] = se
    if folds is not None:
        out[reports.folds_of(metric)] = folds
    return out


def _scheduler(mode: str = "max", metric: str = METRIC, num_samples: int = 16,
               **kwargs: Any) -> NoiseAwareASHA:
    s = NoiseAwareASHA(max_t=10, grace_period=1, reduction_factor=3, **kwargs)
    assert s.set_search_properties(metric, mode, num_samples=num_samples)
    return s


def _report(s: NoiseAwareASHA, trial_id: str, result: dict[str, Any]) -> str:
    trial = _trial(trial_id)
    s.on_trial_add(None, trial)
    return s.on_trial_result(None, trial, result)


def _complete(s: NoiseAwareASHA, trial_id: str, value: float, se: float = 0.02,
              folds: list[float] | None = None, metric: str = METRIC) -> None:
    """A trial that reports at rung 1 and completes (final report at iteration 10)."""
    assert _report(s, trial_id, _result(1, value, se, folds, metric)) == CONTINUE
    s.on_trial_complete(None, _trial(trial_id),
                        _result(10, value, se, folds, metric, **{reports.FINAL: 1,
                                                                 reports.DIVERGED: 0}))


def _with_finished(mode: str = "max", metric: str = METRIC, sign: float = 1.0,
                   folds: dict[float, list[float]] | None = None) -> NoiseAwareASHA:
    s = _scheduler(mode, metric)
    for i, v in enumerate(FINISHED):
        _complete(s, f"done{i}", sign * v, folds=(folds or {}).get(v), metric=metric)
    assert s.min_completed == 4 and s.debug_string().count("4 completed") == 1
    return s


def test_stopping_trial_within_noise_of_cut_continues() -> None:
    s = _with_finished()
    # 0.93 is below the cut (0.94) by less than its own standard error (0.02)
    assert _report(s, "close", _result(1, 0.93, se=0.02)) == CONTINUE
    assert s.counts[KEPT_WITHIN_NOISE] == 1 and s.counts[STOPPED] == 0
    # plain ASHA, given the same results, stops it: the difference this module makes
    asha = AsyncHyperBandScheduler(max_t=10, grace_period=1, reduction_factor=3)
    asha.set_search_properties(METRIC, "max")
    for i, v in enumerate(FINISHED):
        asha.on_trial_add(None, _trial(f"done{i}"))
        asha.on_trial_result(None, _trial(f"done{i}"), _result(1, v))
    asha.on_trial_add(None, _trial("close"))
    assert asha.on_trial_result(None, _trial("close"), _result(1, 0.93, se=0.02)) == STOP


def test_stopping_trial_clearly_below_cut_stops() -> None:
    s = _with_finished()
    assert _report(s, "bad", _result(1, 0.85, se=0.02)) == STOP
    assert s.counts[STOPPED] == 1
    assert "1 stopped" in s.debug_string() and "4 kept" in s.debug_string()
    # Tune calls on_trial_complete for a trial the scheduler stopped: it is not a completed one
    s.on_trial_complete(None, _trial("bad"), _result(1, 0.85, se=0.02))
    assert "4 completed" in s.debug_string()


def test_stopping_trial_above_cut_continues() -> None:
    s = _with_finished()
    assert _report(s, "good", _result(1, 0.95, se=0.001)) == CONTINUE
    assert s.counts[KEPT_AT_CUT] == 5  # the four finished trials and this one


def test_stopping_nothing_stopped_before_min_completed() -> None:
    s = _scheduler(num_samples=16)
    assert s.min_completed == default_min_completed(16) == 4
    for i, v in enumerate(FINISHED[:3]):
        _complete(s, f"done{i}", v)
    # far below every trial, with no noise: still kept while 3 < 4 trials completed
    assert _report(s, "early", _result(1, 0.10, se=0.0)) == CONTINUE
    assert s.counts[KEPT_EARLY] == 1 and s.counts[STOPPED] == 0
    # a diverged final report does not count as completed
    s.on_trial_complete(None, _trial("early"), _result(10, 0.0, **{reports.FINAL: 1,
                                                                   reports.DIVERGED: 1}))
    assert _report(s, "early2", _result(1, 0.10, se=0.0)) == CONTINUE
    _complete(s, "done3", FINISHED[3])
    assert _report(s, "late", _result(1, 0.10, se=0.0)) == STOP


def test_stopping_default_min_completed_scales_with_budget() -> None:
    assert [default_min_completed(n) for n in (None, -1, 1, 16, 17, 40, 100)] == [
        4, 4, 4, 4, 4, 10, 25]
    assert _scheduler(num_samples=40).min_completed == 10
    assert _scheduler(num_samples=40, min_completed=2).min_completed == 2  # explicit wins


def test_stopping_mode_min() -> None:
    s = _with_finished("min", reports.VAL_LOSS, sign=-1.0)  # losses -0.90 ... -0.96
    # the cut is the 2nd lowest loss (-0.94): a loss above it by less than its se continues,
    # far above it stops, below it continues
    assert _report(s, "close", _result(1, -0.93, se=0.02, metric=reports.VAL_LOSS)) == CONTINUE
    assert _report(s, "bad", _result(1, -0.80, se=0.02, metric=reports.VAL_LOSS)) == STOP
    assert _report(s, "good", _result(1, -0.99, se=0.0, metric=reports.VAL_LOSS)) == CONTINUE
    assert s.counts[STOPPED] == 1


def test_stopping_paired_folds_consistent_loss_stops_crossing_continues() -> None:
    cut_folds = [0.90, 0.98, 0.94, 0.90, 0.98]  # the trial at the cut (mean 0.94)
    s = _with_finished(folds={0.94: cut_folds})
    se = 0.03  # larger than the 0.02 gap: the standard-error rule alone would keep both
    lower = [f - 0.02 for f in cut_folds]  # lower on every fold
    crossing = [0.98, 0.90, 0.90, 0.98, 0.84]  # same mean 0.92, above the cut on two folds
    assert _report(s, "lower", _result(1, 0.92, se, lower)) == STOP
    assert _report(s, "crossing", _result(1, 0.92, se, crossing)) == CONTINUE
    # without folds the same values fall back to the standard error: kept
    assert _report(s, "no_folds", _result(1, 0.92, se)) == CONTINUE
    assert s.counts[STOPPED] == 1 and s.counts[KEPT_WITHIN_NOISE] == 2


def test_stopping_clearly_worse_rules() -> None:
    cut = RungEntry(0.94, 0.02, (0.9, 1.0, 0.92))
    assert clearly_worse(RungEntry(0.95), cut) == KEPT_AT_CUT
    assert clearly_worse(RungEntry(0.90), cut) == STOPPED  # no spread: ASHA's comparison
    assert clearly_worse(RungEntry(0.90, 0.05), cut) == KEPT_WITHIN_NOISE
    assert clearly_worse(RungEntry(0.90, 0.05), cut, k=0.5) == STOPPED  # 0.04 > 0.5 * 0.05
    # folds of another length cannot be paired: the standard error decides
    assert clearly_worse(RungEntry(0.92, 0.05, (0.9, 0.94)), cut) == KEPT_WITHIN_NOISE


def test_stopping_cut_is_worst_of_those_kept() -> None:
    entries = [RungEntry(v) for v in (0.5, 0.9, 0.7, 0.8, 0.6, 0.9)]
    assert cut_entry(entries, 3).value == 0.9  # ceil(6/3) = 2 kept: 0.9, 0.9
    assert cut_entry(entries[:4], 3).value == 0.8  # ceil(4/3) = 2 kept: 0.9, 0.8
    assert cut_entry(entries[:1], 3).value == 0.5
    assert cut_entry([], 3) is None


def _replay(s: NoiseAwareASHA) -> list[str]:
    decisions = []
    for i, v in enumerate((0.9, 0.7, 0.95, 0.5, 0.8, 0.93, 0.6)):
        decisions.append(_report(s, f"t{i}", _result(1, v, se=0.02)))
        if i < 5 and decisions[-1] == CONTINUE:
            s.on_trial_complete(None, _trial(f"t{i}"), _result(10, v, **{reports.FINAL: 1}))
    decisions.append(_report(s, "t0", _result(3, 0.9, se=0.02)))  # the next rung
    return decisions


def test_stopping_same_results_same_decisions() -> None:
    a, b = _scheduler(min_completed=3), _scheduler(min_completed=3)
    first = _replay(a)
    assert first == _replay(b) and STOP in first and CONTINUE in first
    assert a.debug_string() == b.debug_string()


def test_stopping_state_round_trips_through_json() -> None:
    a = _with_finished()
    restored = _scheduler()
    restored.set_state(json.loads(json.dumps(a.get_state())))
    assert restored.get_state() == a.get_state()
    assert _report(restored, "bad", _result(1, 0.85, se=0.02)) == STOP


def test_stopping_judges_each_rung_once() -> None:
    s = _with_finished()
    assert _report(s, "x", _result(1, 0.95, se=0.0)) == CONTINUE
    # a second report at the same rung is not judged again, however bad
    assert _report(s, "x", _result(2, 0.10, se=0.0)) == CONTINUE
    # a result without the metric or the time attribute is left alone
    assert _report(s, "y", {reports.ITERATION: 1}) == CONTINUE
    assert _report(s, "y", {METRIC: 0.1}) == CONTINUE


def test_stopping_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reduction_factor"):
        NoiseAwareASHA(reduction_factor=1)
    with pytest.raises(ValueError, match="grace_period"):
        NoiseAwareASHA(max_t=3, grace_period=4)
    with pytest.raises(ValueError, match="se_margin"):
        NoiseAwareASHA(se_margin=-1)
    with pytest.raises(ValueError, match="no metric"):
        NoiseAwareASHA().on_trial_add(None, _trial("a"))
    # metric given to both the scheduler and Tune: Tune raises on False
    assert not NoiseAwareASHA(metric=METRIC, mode="max").set_search_properties(METRIC, "max")


def test_stopping_accepts_tune_trial_objects() -> None:
    from ray.tune.experiment import Trial

    s = _with_finished()
    trial = Trial("__fake", config={}, stub=True)
    s.on_trial_add(None, trial)
    assert s.on_trial_result(None, trial, _result(1, 0.85, se=0.02)) == STOP


# ---- wired into the search --------------------------------------------------------------------


def test_stopping_is_the_search_asha_with_its_stated_defaults() -> None:
    """``--scheduler asha`` builds NoiseAwareASHA: one rung, at report 4 of the default space (a
    third of its 10 probes; the ridge readout after them costs seconds, so no rung there),
    rungs into the classifier stage when trained heads are searched, min_completed
    max(4, num_samples // 4)."""
    from ray.tune.schedulers import FIFOScheduler

    from cbdtune.settings import SearchSettings
    from cbdtune.space import load_space
    from cbdtune.tuning import asha_rungs, scheduler

    space = load_space("default")
    assert asha_rungs(space.base, space) == (4, 9)
    heads = load_space("trained_heads")
    grace, max_t = asha_rungs(heads.base, heads)
    assert max_t > reports.probe_count(heads.base.train) + 1  # rungs in the classifier stage
    for num_samples, min_completed in ((16, 4), (8, 4), (40, 10)):
        s = scheduler(SearchSettings(datasets=("gesture",), num_samples=num_samples),
                      space.base, space)
        assert isinstance(s, NoiseAwareASHA)
        assert s.min_completed == min_completed
        assert sorted(s._rungs) == [4]
        assert s.set_search_properties(METRIC, "max", num_samples=num_samples)  # Tune's call
    none = scheduler(SearchSettings(datasets=("gesture",), scheduler="none"), space.base, space)
    assert type(none) is FIFOScheduler


def test_stopping_state_survives_resume_through_the_callback() -> None:
    """--resume: Tune checkpoints the callbacks, not the scheduler; SchedulerStateCallback
    carries NoiseAwareASHA's rungs and completed trials across, so the resumed search stops a
    clearly worse trial at once instead of waiting for min_completed trials again."""
    import pickle

    from cbdtune.callbacks import SchedulerStateCallback

    before = _with_finished()
    saved = pickle.loads(pickle.dumps(SchedulerStateCallback(before).get_state()))
    fresh = _scheduler()
    # tuner.pkl pickles the TuneConfig and the callbacks together: one scheduler object
    cb, after = pickle.loads(pickle.dumps((SchedulerStateCallback(fresh), fresh)))
    assert cb.scheduler is after
    assert _report(_scheduler(), "bad", _result(1, 0.85, se=0.02)) == CONTINUE  # forgot: waits
    cb.set_state(saved)
    assert after.get_state() == before.get_state()
    assert _report(after, "bad", _result(1, 0.85, se=0.02)) == STOP
