"""The Optuna searcher behind the search: Ray's ``OptunaSearch``, told the truth about ASHA.

Ray's ``OptunaSearch.on_trial_complete`` reports every trial that ends without an error to Optuna
as COMPLETE with its last reported value, the ones ASHA stopped at a low rung included, so TPE
would learn from short-fidelity scores as if they were final. Here a trial is COMPLETE only when
its last result is the pipeline's final report (``final == 1``); a stopped trial is told as
PRUNED. Its intermediate values (one per report, through ``on_trial_result``) stay with it.

The multi-fidelity rule this gives is Optuna's own for TPE (``optuna.samplers.TPESampler``):
pruned trials rank below every complete trial, among themselves by how far they got (the later
step first) and then by their value at that step. So TPE's "good" group holds complete trials
first, and a stopped trial counts as evidence against its region, never as a full result.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

FINAL_KEY = "final"  # set to 1 by the pipeline's last report of a trial (cbdtune.pipeline)


class FullFidelityOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports trials stopped before their final report as PRUNED."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if result is not None and not error and result.get(FINAL_KEY) != 1:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            result = {k: v for k, v in result.items() if k not in metrics}  # -> PRUNED
        super().on_trial_complete(trial_id, result, error)
