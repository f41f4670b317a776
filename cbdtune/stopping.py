"""Early stopping that is fair under noise: ASHA's rungs, but a trial is stopped at a rung only
when it is clearly worse than the rung's cut, its own spread taken into account.

ASHA (Li et al., MLSys 2020, "A System for Massively Parallel Hyperparameter Tuning")
stops a trial at a rung when its value is below the top ``1 / reduction_factor`` of the values
recorded there. On small data the cross-validated value of one configuration moves by its fold
noise (a standard error of 2-3 points on 120 series), more than most differences between
configurations, so a plain comparison stops good trials by chance, and a rung that is still empty
keeps whoever reaches it first. :class:`NoiseAwareASHA` changes two things:

1. No trial is stopped before ``min_completed`` trials have completed at full fidelity (their
   values at every rung are recorded meanwhile, so the first cuts are made among trials that
   were all seen to the end).
2. At a rung, a trial below the cut is stopped only when it is clearly below it:

   - *paired*, when the report carries the per-fold scores (``<metric>_folds``, see
     :data:`cbdtune.reports.FOLDS_SUFFIX`; one float per CV fold, in fold order) of both the
     trial and the trial at the cut: every trial is scored on the same folds (the pairing
     assumes fold ``i`` is the same split in every trial), so the per-fold differences ``d_i``
     remove the folds' shared difficulty. Stopped when
     ``mean(d) + k * se(d) < 0`` (a paired t statistic below ``-k``; ``se(d)`` is the
     standard error of the mean difference). Optuna's ``WilcoxonPruner`` is the same idea with a
     signed-rank test; with the 5 folds of ``data.cv_folds``'s default a one-sided signed-rank
     test at 5 % can only stop a trial that is lower on every fold, and with 3 folds never, so a
     paired margin of ``k`` standard errors is used instead.
   - *standard error*, when fold scores are absent: stopped when ``cut - value > k * se``, with
     ``se`` the trial's own ``<metric>_se`` (:func:`cbdtune.reports.se_of`).
   - *plain*, when the report has neither (one validation split): ASHA's comparison.

``k`` (``se_margin``) defaults to 1. When a trial is as good as the trial at the cut, the paired
rule stops it about 19 % of the time (a t with 4 degrees of freedom below -1) and the
standard-error rule about 24 % (two independent estimates with equal standard errors), against
50 % for ASHA's plain comparison; the trial at the cut was picked for ranking high among noisy
values, which raises all three. A larger ``k`` stops fewer trials.

The trial at the cut is a real trial (so that its folds can be paired): of the ``n`` other trials
recorded at the rung, sorted best first (ties: the first recorded), the
``ceil(n / reduction_factor)``-th, the worst of those ASHA would promote.

Decisions depend only on the order of the results (no random bracket, one bracket), so a search
replayed in the same order stops the same trials.

References:
    Ray 2.60, ``ray/tune/schedulers/async_hyperband.py`` (rungs: ``grace_period *
    reduction_factor**k`` up to ``max_t``; a result is judged at the highest rung it has reached
    and not yet been recorded at) and ``ray/tune/execution/tune_controller.py`` (``stop_trial``
    calls ``on_trial_complete`` for a trial the scheduler stopped, too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from cbdtune import reports

DEFAULT_SE_MARGIN = 1.0  # k: see the module docstring
_EPS = 1e-9  # a difference smaller than this is float rounding, not a difference

# What a rung decision was: counted in ``debug_string`` and ``counts``.
STOPPED = "stopped"
KEPT_WITHIN_NOISE = "kept_within_noise"  # below the cut, but not clearly
KEPT_AT_CUT = "kept_at_or_above_cut"
KEPT_EARLY = "kept_before_min_completed"
DECISIONS = (STOPPED, KEPT_WITHIN_NOISE, KEPT_AT_CUT, KEPT_EARLY)


def default_min_completed(num_samples: int | None) -> int:
    """Trials that must complete before any is stopped: ``max(4, num_samples // 4)``.

    A quarter of the budget seen to the end gives the rungs' cuts a base that does not depend
    on which trials started first; at least 4, so that a cut at the top third (reduction factor
    3) is taken among more than one finished trial. ``num_samples`` unknown or infinite (< 1): 4.
    """
    if num_samples is None or num_samples < 1:
        return 4
    return max(4, num_samples // 4)


def rung_milestones(grace_period: float, max_t: float, reduction_factor: float) -> tuple[float, ...]:
    """The rungs' iterations, ascending: ``grace_period * reduction_factor**k`` up to ``max_t``
    (Ray's ``_Bracket`` with one bracket)."""
    # + 1e-9: log(9) / log(3) may round to 1.999..., which would drop the rung at max_t = 9
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1 + 1e-9)
    return tuple(grace_period * reduction_factor**k for k in range(count))


@dataclass(frozen=True)
class RungEntry:
    """One trial's value at one rung, oriented so that higher is better (``min`` negated).

    Attributes:
        value: the metric times +1 (mode max) or -1 (mode min).
        se: its standard error (``<metric>_se``), or None.
        folds: the per-fold scores, oriented like ``value``, or None.
    """

    value: float
    se: float | None = None
    folds: tuple[float, ...] | None = None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(x: Any) -> float | None:
    """``x`` as a float when it is a finite number (not a bool), else None."""
    return float(x) if _finite(x) else None


def read_entry(result: Mapping[str, Any], metric: str, sign: float) -> RungEntry | None:
    """A result's :class:`RungEntry`; None when the metric is missing or not finite."""
    value = _number(result.get(metric))
    if value is None:
        return None
    se = _number(result.get(reports.se_of(metric)))
    raw = result.get(reports.folds_of(metric))
    folds = [_number(f) for f in raw] if isinstance(raw, (list, tuple)) else []
    paired = len(folds) >= 2 and None not in folds
    return RungEntry(value=sign * value, se=se if se is not None and se >= 0 else None,
                     folds=tuple(sign * f for f in folds if f is not None) if paired else None)


def cut_entry(others: Sequence[RungEntry], reduction_factor: float) -> RungEntry | None:
    """The trial at the rung's cut: the worst of the ``ceil(n / reduction_factor)`` best of the
    ``n`` entries (ties: the first recorded); None for an empty rung."""
    if not others:
        return None
    ranked = sorted(others, key=lambda e: -e.value)  # stable: ties keep the recording order
    return ranked[max(1, math.ceil(len(others) / reduction_factor)) - 1]


def clearly_worse(entry: RungEntry, cut: RungEntry, k: float = DEFAULT_SE_MARGIN) -> str:
    """Which rule judged ``entry`` against ``cut``, and how: the decision name.

    Returns :data:`KEPT_AT_CUT` when ``entry`` is not below ``cut``, :data:`STOPPED` when it is
    clearly below it (paired folds, else its standard error, else plainly; module docstring),
    else :data:`KEPT_WITHIN_NOISE`.
    """
    gap = cut.value - entry.value
    if gap <= _EPS:
        return KEPT_AT_CUT
    if entry.folds is not None and cut.folds is not None and len(entry.folds) == len(cut.folds):
        d = [a - b for a, b in zip(entry.folds, cut.folds, strict=True)]
        n = len(d)
        mean = math.fsum(d) / n
        se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1) / n)
        return STOPPED if mean + k * se < -_EPS else KEPT_WITHIN_NOISE
    if entry.se is not None:
        return STOPPED if gap - k * entry.se > _EPS else KEPT_WITHIN_NOISE
    return STOPPED


class NoiseAwareASHA(FIFOScheduler):
    """ASHA with one bracket that stops a trial only when it is clearly worse than the rung's cut.

    Paper: none (a search-level choice); the rule and its defaults are in the module docstring.

    Args:
        time_attr: the result key that counts a trial's progress (monotonic): the report count.
        metric: the result key compared; None: the one ``tune.TuneConfig`` passes.
        mode: ``"max"`` or ``"min"``; None: the one ``tune.TuneConfig`` passes.
        max_t: the last iteration a rung may sit at (as in ASHA; trials are not stopped at it, a
            trial ends itself with its final report).
        grace_period: the first rung's iteration, >= 1.
        reduction_factor: > 1; the next rung is this many times later, and the cut keeps the
            best ``1 / reduction_factor`` of a rung.
        min_completed: trials completed at full fidelity (final report, not diverged) before any
            trial is stopped; None: :func:`default_min_completed` of Tune's ``num_samples``.
        se_margin: ``k``, the margin in standard errors (>= 0).

    Raises:
        ValueError: a bad argument, or no metric/mode by the time a trial is added.
    """

    def __init__(self, *, time_attr: str = reports.ITERATION, metric: str | None = None,
                 mode: str | None = None, max_t: float = 100, grace_period: float = 1,
                 reduction_factor: float = 3, min_completed: int | None = None,
                 se_margin: float = DEFAULT_SE_MARGIN) -> None:
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in (0, max_t={max_t}], but got {grace_period}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, but got {reduction_factor}")
        if min_completed is not None and min_completed < 0:
            raise ValueError(f"min_completed must be >= 0, but got {min_completed}")
        if not se_margin >= 0:
            raise ValueError(f"se_margin must be >= 0, but got {se_margin}")
        if mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', but got {mode!r}")
        super().__init__()
        self._time_attr = time_attr
        self._metric = metric
        self._mode = mode
        self._reduction_factor = reduction_factor
        self._min_completed = min_completed
        self._se_margin = se_margin
        self._max_t = max_t
        # rung iteration -> trial id -> entry, in recording order (decisions depend on it)
        self._rungs: dict[float, dict[str, RungEntry]] = {
            m: {} for m in rung_milestones(grace_period, max_t, reduction_factor)}
        self._completed: list[str] = []
        self._stopped: list[str] = []
        self._counts = dict.fromkeys(DECISIONS, 0)

    # ---- Tune's hooks ----------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Take ``metric``/``mode`` from ``tune.TuneConfig`` and ``num_samples`` from the
        experiment (Tune passes ``Experiment.public_spec``); False when both sides set one."""
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        if self._min_completed is None and "num_samples" in spec:
            self._min_completed = default_min_completed(spec["num_samples"])
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._metric or self._mode not in ("max", "min"):
            raise ValueError(f"{type(self).__name__} has no metric ({self._metric}) or mode "
                             f"({self._mode}): pass them to it or to tune.TuneConfig")

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        """CONTINUE, or STOP when the trial reached a rung clearly below its cut."""
        rung, entry = self._rung_and_entry(trial.trial_id, result)
        if rung is None or entry is None:
            return TrialScheduler.CONTINUE
        decision = self._decide(self._rungs[rung], entry)
        self._rungs[rung][trial.trial_id] = entry
        self._counts[decision] += 1
        if decision == STOPPED:
            self._stopped.append(trial.trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        """Count a trial completed at full fidelity; record its last value at a rung it passed
        without a report there (as ASHA does). Tune calls this for stopped trials too."""
        if trial.trial_id in self._stopped or reports.is_diverged(result):
            return
        rung, entry = self._rung_and_entry(trial.trial_id, result)
        if rung is not None and entry is not None:
            self._rungs[rung][trial.trial_id] = entry
        t = _number(result.get(self._time_attr))
        at_max = t is not None and t >= self._max_t
        if (reports.is_final(result) or at_max) and trial.trial_id not in self._completed:
            self._completed.append(trial.trial_id)

    def debug_string(self) -> str:
        c = self._counts
        rungs = " | ".join(f"iter {m:g}: {len(rec)}" for m, rec in self._rungs.items())
        return (f"Using NoiseAwareASHA: {c[STOPPED]} stopped, "
                f"{c[KEPT_WITHIN_NOISE] + c[KEPT_AT_CUT] + c[KEPT_EARLY]} kept "
                f"({c[KEPT_WITHIN_NOISE]} within noise of the cut, {c[KEPT_AT_CUT]} at or above "
                f"it, {c[KEPT_EARLY]} before {self.min_completed} trials completed); "
                f"{len(self._completed)} completed; recorded per rung: {rungs}")

    # ---- state -----------------------------------------------------------------------------

    @property
    def min_completed(self) -> int:
        """The trials to complete before any stop (the default when Tune gave no num_samples)."""
        return default_min_completed(None) if self._min_completed is None else self._min_completed

    @property
    def counts(self) -> dict[str, int]:
        """Rung decisions so far, by name (:data:`DECISIONS`)."""
        return dict(self._counts)

    def get_state(self) -> dict[str, Any]:
        """What ``--resume`` needs (JSON-able): the rungs, completed and stopped trials, counts."""
        return {"rungs": [[m, [[t, e.value, e.se, list(e.folds) if e.folds else None]
                               for t, e in rec.items()]] for m, rec in self._rungs.items()],
                "completed": list(self._completed), "stopped": list(self._stopped),
                "counts": dict(self._counts), "min_completed": self._min_completed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`'s output (rungs at other iterations are ignored)."""
        for m, rec in state.get("rungs", []):
            if m in self._rungs:
                self._rungs[m] = {t: RungEntry(v, se, tuple(f) if f else None)
                                  for t, v, se, f in rec}
        self._completed = list(state.get("completed", []))
        self._stopped = list(state.get("stopped", []))
        self._counts.update(state.get("counts", {}))
        if self._min_completed is None:
            self._min_completed = state.get("min_completed")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w", encoding="utf-8") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as f:
            self.set_state(json.load(f))

    # ---- the rule --------------------------------------------------------------------------

    def _rung_and_entry(self, trial_id: str, result: Mapping[str, Any]
                        ) -> tuple[float | None, RungEntry | None]:
        """The highest rung ``result`` reached and the trial is not recorded at, and its entry."""
        t = _number(result.get(self._time_attr))
        if t is None or self._metric is None:
            return None, None
        for milestone in sorted(self._rungs, reverse=True):
            if t >= milestone:
                if trial_id in self._rungs[milestone]:
                    return None, None  # judged here already; lower rungs too
                sign = -1.0 if self._mode == "min" else 1.0
                return milestone, read_entry(result, self._metric, sign)
        return None, None

    def _decide(self, recorded: Mapping[str, RungEntry], entry: RungEntry) -> str:
        cut = cut_entry(list(recorded.values()), self._reduction_factor)
        if cut is None or cut.value - entry.value <= _EPS:
            return KEPT_AT_CUT
        if len(self._completed) < self.min_completed:
            return KEPT_EARLY
        return clearly_worse(entry, cut, self._se_margin)
