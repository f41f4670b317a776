"""The Optuna searcher behind the search: Ray's ``OptunaSearch``, told the truth about ASHA, and
made to propose classifier knobs for encoders that are already pretrained.

Ray's ``OptunaSearch.on_trial_complete`` reports every trial that ends without an error to Optuna
as COMPLETE with its last reported value, the ones ASHA stopped at a low rung included, so TPE
would learn from short-fidelity scores as if they were final. Here a trial is COMPLETE only when
its last result is the pipeline's final report (``final == 1``); a stopped trial is told as
PRUNED. Its intermediate values (one per report, through ``on_trial_result``) stay with it.
With two objectives (a multi-objective study) the same holds, without intermediate values.

The multi-fidelity rule this gives is Optuna's own for TPE (``optuna.samplers.TPESampler``):
pruned trials rank below every complete trial, among themselves by how far they got (the later
step first) and then by their value at that step. So TPE's "good" group holds complete trials
first, and a stopped trial counts as evidence against its region, never as a full result.

Encoder reuse: when a trial completes at full fidelity and ranks among the ``reuse_top`` best, a
trial is enqueued (``Study.enqueue_trial``) with that trial's pretraining parameters fixed, the
ones :func:`cbdtune.encoder_cache.determines_encoder` names; TPE samples the rest (the classifier
knobs) as usual, and the pipeline finds that encoder in the cache instead of pretraining it. Ray's
define-by-run path asks Optuna with ``Study.ask()``, which takes enqueued trials first, and an
enqueued value is returned by ``suggest_*`` (the baseline trial relies on the same). At most
``reuse_share`` of the trials suggested are such reuse trials.

No configuration runs twice: a reuse trial whose classifier knobs equal those of a trial already
on its encoder (any trial with the same pretraining parameters, running or ended, errored ones
aside) would repeat that trial exactly. It is told to Optuna as FAIL (user attribute
:data:`DUPLICATE_ATTR`; TPE ignores failed trials) and the encoder is enqueued again, so TPE
samples the knobs anew, at most :data:`MAX_RESAMPLES` times per encoder; then that reuse is
skipped and the trial gets what Optuna proposes next.
"""

from __future__ import annotations

import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from cbdtune.encoder_cache import determines_encoder
from cbdtune.reports import is_final
from cbdtune.space import OPTUNA_PREFIX

REUSE_ATTR = "cbdtune.reuse_of"  # an enqueued reuse trial's user attribute: the parent's number
DUPLICATE_ATTR = "cbdtune.duplicate_of"  # a discarded reuse trial's: the trial it repeated
MAX_RESAMPLES = 8  # fresh samples of the classifier knobs per reused encoder before it is skipped
_ON_ENCODER = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


class FullFidelityOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports trials stopped before their final report as PRUNED, and
    enqueues classifier-only trials on the best trials' encoders.

    Args:
        reuse_share: the most trials that may be reuse trials, as a share of all suggested
            (0 turns reuse off).
        reuse_top: a completed trial's encoder is reused while the trial ranks among this many.
        *args, **kwargs: ``OptunaSearch``'s.
    """

    def __init__(self, *args: Any, reuse_share: float = 0.0, reuse_top: int = 3,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reuse_share = reuse_share
        self.reuse_top = reuse_top
        self._complete: list[float] = []  # values of the full-fidelity trials
        self._n_suggested = 0
        self._n_reuse = 0
        self._resamples: dict[int, int] = {}  # parent trial number -> duplicates discarded

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new and params is not None:
            self._n_suggested += 1
            params = self._distinct(trial_id, params)
        return params

    def _distinct(self, trial_id: str, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """``params``, or, when ``trial_id``'s reuse trial repeats a trial on its encoder, the
        parameters of a fresh ask (module docstring); bounded by :data:`MAX_RESAMPLES` per
        encoder and by the trials waiting in the queue."""
        study: Any = self._ot_study
        resamples = self.__dict__.setdefault("_resamples", {})  # (a searcher pickled before it)
        while params is not None:
            ot_trial = self._ot_trials[trial_id]
            repeated = repeats(ot_trial, study.get_trials(deepcopy=False, states=_ON_ENCODER))
            if repeated is None:
                return params
            parent = int(ot_trial.user_attrs[REUSE_ATTR])
            ot_trial.set_user_attr(DUPLICATE_ATTR, repeated)
            study.tell(ot_trial, state=TrialState.FAIL)
            resamples[parent] = resamples.get(parent, 0) + 1
            if resamples[parent] < MAX_RESAMPLES:
                fixed, _ = split_params(ot_trial.params)
                study.enqueue_trial(fixed, user_attrs={REUSE_ATTR: parent})
            else:
                self._n_reuse -= 1  # skipped: it no longer counts against the share
            del self._ot_trials[trial_id]
            params = super().suggest(trial_id)
        return params

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        full = not error and is_final(result)
        if isinstance(self.metric, list) and not full:
            # Ray would tell [None, None] as COMPLETE (Optuna refuses it, the trial stays
            # RUNNING): no result is PRUNED, or FAIL after an error. A multi-objective study has
            # no intermediate values (Optuna's Trial.report is single-objective), so a pruned
            # trial carries no value and TPE ranks it below every complete one.
            result = None
        elif result is not None and not error and not full:
            result = {k: v for k, v in result.items() if k != self.metric}  # -> PRUNED
        super().on_trial_complete(trial_id, result, error)
        if full and result is not None:
            self._maybe_reuse(trial_id, result.get(self._first(self.metric)))

    @staticmethod
    def _first(value: Any) -> Any:
        """The first objective's metric or mode (reuse ranks trials by it)."""
        return value[0] if isinstance(value, list) else value

    def _maybe_reuse(self, trial_id: str, value: Any) -> None:
        """Enqueue a trial on ``trial_id``'s encoder if it ranks among the best and the share
        of reuse trials allows one more."""
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self._complete.append(float(value))
        ot_trial = self._ot_trials[trial_id]
        fixed, free = split_params(ot_trial.params)
        if not fixed or not free:  # nothing to reuse, or nothing left to sample
            return
        sign = -1.0 if self._first(self.mode) == "max" else 1.0
        rank = sorted(sign * v for v in self._complete).index(sign * float(value))
        if rank >= self.reuse_top:
            return
        if self._n_reuse + 1 > self.reuse_share * (self._n_suggested + 1):
            return
        study: Any = self._ot_study
        study.enqueue_trial(fixed, user_attrs={REUSE_ATTR: ot_trial.number})
        self._n_reuse += 1


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optuna parameters (``train_loop_config/<key>``) -> (those that determine the pretrained
    encoder, the others)."""
    fixed: dict[str, Any] = {}
    free: dict[str, Any] = {}
    for name, value in params.items():
        key = name.removeprefix(OPTUNA_PREFIX)
        (fixed if determines_encoder(key) else free)[name] = value
    return fixed, free


def repeats(trial: Any, others: list[Any]) -> int | None:
    """The number of a trial among ``others`` that ``trial``, a reuse trial, would repeat: same
    encoder parameters and same classifier knobs; None when it repeats none (or is not a reuse
    trial). ``trial`` itself is skipped in ``others``."""
    if REUSE_ATTR not in trial.user_attrs:
        return None
    fixed, free = split_params(trial.params)
    for other in others:
        if other.number == trial.number:
            continue
        other_fixed, other_free = split_params(other.params)
        if other_fixed == fixed and other_free == free:
            return int(other.number)
    return None
