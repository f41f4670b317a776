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
