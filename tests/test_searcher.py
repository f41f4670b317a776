"""The searcher tells Optuna the truth: a trial ASHA stopped is PRUNED, never COMPLETE."""

from __future__ import annotations

import optuna
from ray import tune

from cbdtune.searcher import FullFidelityOptunaSearch


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
