"""The searcher tells Optuna the truth (a trial ASHA stopped is PRUNED, never COMPLETE), runs no
configuration twice, and samples with the TPE the search builds."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from ray import tune

from cbdtune.searcher import (
    DUPLICATE_ATTR,
    MAX_RESAMPLES,
    REUSE_ATTR,
    FullFidelityOptunaSearch,
    repeats,
)
from cbdtune.space import load_space
from cbdtune.tuning import make_searcher


def _searcher() -> FullFidelityOptunaSearch:
    searcher = FullFidelityOptunaSearch(metric="val_accuracy", mode="max",
                                        sampler=optuna.samplers.RandomSampler(seed=0))
    searcher.set_search_properties("val_accuracy", "max",
                                   {"train_loop_config": {"x": tune.uniform(0.0, 1.0)}})
    return searcher


def _states(searcher: FullFidelityOptunaSearch) -> list[tuple[str, float | None]]:
    return [(t.state.name, t.value) for t in searcher._ot_study.get_trials(deepcopy=False)]


def test_a_stopped_trial_reaches_optuna_as_pruned_with_its_intermediate_values() -> None:
    searcher = _searcher()
    assert searcher.suggest("stopped") is not None
    for step, value in ((1, 0.5), (2, 0.6)):
        searcher.on_trial_result("stopped", {"val_accuracy": value, "training_iteration": step})
    # ASHA's stop: the trial's last result is an intermediate one (no final report)
    searcher.on_trial_complete("stopped", {"val_accuracy": 0.6, "training_iteration": 2})
    [(state, value)] = _states(searcher)
    assert state == "PRUNED"  # Optuna keeps the last intermediate value as a pruned trial's value
    assert value == 0.6
    [trial] = searcher._ot_study.get_trials(deepcopy=False)
    assert trial.intermediate_values == {1: 0.5, 2: 0.6}


def test_a_finished_trial_is_complete_and_an_errored_one_failed() -> None:
    searcher = _searcher()
    searcher.suggest("done")
    searcher.suggest("broken")
    searcher.on_trial_result("done", {"val_accuracy": 0.7, "training_iteration": 1})
    searcher.on_trial_complete("done", {"val_accuracy": 0.8, "training_iteration": 2,
                                        "final": 1})
    searcher.on_trial_complete("broken", None, error=True)
    assert _states(searcher) == [("COMPLETE", 0.8), ("FAIL", None)]


def test_two_objectives_reach_optuna_as_two_values_and_a_stopped_trial_as_pruned() -> None:
    """--metric val_accuracy,time_total_s: a multi-objective study. Ray's own OptunaSearch would
    tell a stopped trial [None, None] as COMPLETE (refused: the trial stayed RUNNING)."""
    metric, mode = ["val_accuracy", "time_total_s"], ["max", "min"]
    searcher = FullFidelityOptunaSearch(metric=metric, mode=mode,
                                        sampler=optuna.samplers.RandomSampler(seed=0))
    searcher.set_search_properties(None, None,  # (the search gives the space to the constructor)
                                   {"train_loop_config": {"x": tune.uniform(0.0, 1.0)}})
    for trial_id in ("done", "stopped", "broken"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_result("stopped", {"val_accuracy": 0.6, "time_total_s": 3.0,
                                         "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"val_accuracy": 0.6, "time_total_s": 3.0,
                                           "training_iteration": 1})
    searcher.on_trial_complete("done", {"val_accuracy": 0.8, "time_total_s": 9.5,
                                        "training_iteration": 4, "final": 1})
    searcher.on_trial_complete("broken", {"val_accuracy": 0.1, "time_total_s": 1.0}, error=True)
    study = searcher._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    by_state = {t.state.name: t.values for t in study.get_trials(deepcopy=False)}
    assert by_state == {"COMPLETE": [0.8, 9.5], "PRUNED": None, "FAIL": None}
    assert [t.values for t in study.best_trials] == [[0.8, 9.5]]


# ---- no configuration runs twice: reuse trials differ from every trial on their encoder -------


def _encoder_space(trial: optuna.Trial) -> None:
    """One pretraining parameter (it names the encoder) and one classifier knob of 2 values."""
    trial.suggest_float("train_loop_config/train.pretrain_lr", 1e-4, 1e-3, log=True)
    trial.suggest_categorical("train_loop_config/model.level_features", [True, False])


def _reuse_searcher(seed: int) -> FullFidelityOptunaSearch:
    return FullFidelityOptunaSearch(space=_encoder_space, metric="val_accuracy", mode="max",
                                    sampler=optuna.samplers.RandomSampler(seed=seed),
                                    reuse_share=1.0, reuse_top=3)


def _finish(searcher: FullFidelityOptunaSearch, trial_id: str, value: float) -> None:
    searcher.on_trial_complete(trial_id, {"val_accuracy": value, "training_iteration": 3,
                                          "final": 1})


def _ran(searcher: FullFidelityOptunaSearch) -> list[dict]:
    return [t.params for t in searcher._ot_study.get_trials(deepcopy=False)
            if t.state != optuna.trial.TrialState.FAIL]


@pytest.mark.parametrize("seed", range(4))
def test_a_reuse_trial_differs_from_every_trial_on_its_encoder_in_a_classifier_knob(
        seed: int) -> None:
    """Trial 0 completes: a reuse trial on its encoder is enqueued. With two knob values, the
    first reuse trial must take the other one; the second reuse of that encoder has no value
    left, so it is skipped and the trial gets a fresh encoder."""
    searcher = _reuse_searcher(seed)
    first = searcher.suggest("t0")
    _finish(searcher, "t0", 0.9)
    second = searcher.suggest("t1")  # the reuse trial: t0's encoder, the other knob value
    lr = "train.pretrain_lr"
    assert second["train_loop_config"][lr] == first["train_loop_config"][lr]
    assert second != first
    _finish(searcher, "t1", 0.95)  # enqueues another trial on the same encoder: no knob left
    third = searcher.suggest("t2")
    assert third["train_loop_config"][lr] != first["train_loop_config"][lr]
    ran = _ran(searcher)
    assert len(ran) == 3
    assert all(a != b for i, a in enumerate(ran) for b in ran[i + 1:])
    discarded = [t for t in searcher._ot_study.get_trials(deepcopy=False)
                 if t.state == optuna.trial.TrialState.FAIL]
    assert all(DUPLICATE_ATTR in t.user_attrs for t in discarded)
    # the reuse of t1's encoder (t0's) was sampled MAX_RESAMPLES times, then skipped
    parent = searcher._ot_trials["t1"].number
    assert sum(t.user_attrs[REUSE_ATTR] == parent for t in discarded) == MAX_RESAMPLES
    assert searcher._n_reuse == 1


def test_repeats_names_the_trial_a_reuse_trial_would_repeat() -> None:
    study = optuna.create_study()
    a = study.ask()
    _encoder_space(a)
    study.tell(a, 0.5)
    study.enqueue_trial(dict(a.params), user_attrs={REUSE_ATTR: a.number})
    b = study.ask()
    _encoder_space(b)
    others = study.get_trials(deepcopy=False)
    assert repeats(b, others) == a.number
    c = study.ask()  # not a reuse trial: never called a repeat
    _encoder_space(c)
    assert repeats(c, study.get_trials(deepcopy=False)) is None


# ---- TPE as the search builds it ---------------------------------------------------------------


def test_the_search_builds_a_multivariate_grouped_tpe_with_a_constant_liar() -> None:
    """The sampler the search hands Ray's OptunaSearch is the study's sampler (Ray passes it
    through unchanged), with the settings the conditional space and concurrent trials need; and
    it proposes trials of the default space through Ray's ask/tell, concurrently, past TPE's
    random start-up trials."""
    limiter = make_searcher(load_space("default"), sampler="tpe", seed=0,
                            metric="val_accuracy", mode="max", max_concurrent=2)
    searcher = limiter.searcher
    sampler = searcher._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate is True
    assert sampler._group is True
    assert sampler._constant_liar is True
    rng = np.random.default_rng(0)
    for i in range(14):  # two at a time, as Tune runs them with --max-concurrent 2
        assert searcher.suggest(f"a{i}") is not None
        assert searcher.suggest(f"b{i}") is not None
        for t in (f"a{i}", f"b{i}"):
            _finish(searcher, t, float(rng.uniform(0.5, 1.0)))
    states = [t.state for t in searcher._ot_study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 28
