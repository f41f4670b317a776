"""Ray Tune callbacks of the search: MLflow runs, one console line per trial, the scheduler's state.

All three run in the search's driver (Tune calls callbacks there), so they can print and log
without a Ray task. Tune pickles them into the experiment's ``tuner.pkl`` and checkpoints their
``get_state()`` with the experiment, so ``--resume`` gets them back as they were.

References:
    Ray 2.60, ``ray/tune/callback.py`` (hooks, ``get_state``/``set_state``) and
    ``ray/tune/execution/tune_controller.py`` (when each hook runs: ``on_trial_complete`` before
    the trial's status becomes TERMINATED, ``on_trial_error`` after it becomes ERROR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cbdtune import reports
from cbdtune.config import ExperimentConfig
from cbdtune.encoder_cache import NOTE_KEY
from cbdtune.tracking import (
    ARTIFACT_ERROR_TAG,
    ENCODER_KEY_TAG,
    ENCODER_SOURCE_RUN_TAG,
    ENCODER_SOURCE_TAG,
    PARENT_TAG,
    REASON_TAG,
    SEARCHED_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    client,
    log_metrics,
    log_params,
    log_trial_artifacts,
    numeric,
    reopen_run,
    set_tags,
    trial_status,
)

# Keys Tune adds to every result that are bookkeeping, not measurements.
TUNE_BOOKKEEPING = {"timestamp", "pid", "time_since_restore", "iterations_since_restore",
                    reports.ITERATION, "done", "time_this_iter_s"}
_ENDED = ("TERMINATED", "ERROR")


@dataclass(frozen=True)
class Standing:
    """Where the search stands when a trial ends: trials ended so far and the best completed."""

    finished: int
    best_value: float | None
    best_trial: str | None


def standing(trials: list[Any], ended: Any, metric: str, mode: str) -> Standing:
    """The search's standing from Tune's trial list, as ``ended`` (just finished) is counted.

    Read from the trials rather than kept in the callback, so it is right after ``--resume``
    (restored trials keep their status and last result). ``ended`` is counted whatever its
    status: Tune calls ``on_trial_complete`` while it is still RUNNING.
    """
    done = [t for t in trials if t is not ended and t.status in _ENDED] + [ended]
    best: tuple[float, str] | None = None
    for t in done:
        status, _ = trial_status(t.last_result, errored=t.status == "ERROR")
        value: Any = (t.last_result or {}).get(metric)
        if status != "completed" or not _finite(value):
            continue
        if best is None or (value > best[0] if mode == "max" else value < best[0]):
            best = (float(value), t.trial_id)
    return Standing(len(done), best[0] if best else None, best[1] if best else None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ProgressCallback(Callback):
    """One line per finished trial on stdout, flushed, so it reaches a log file as it happens::

        trial 3/16 4c464057 completed val_accuracy 0.8583 ± 0.021 (best 0.8667, trial ab12cd34) 47 s

    Args:
        num_samples: the trials the search runs, for ``3/16``.
        metric: the selection metric; ``<metric>_se`` is shown after ``±`` when reported.
        mode: ``max`` or ``min``.
    """

    def __init__(self, num_samples: int, metric: str, mode: str) -> None:
        self.num_samples = num_samples
        self.metric = metric
        self.mode = mode

    def line(self, trials: list[Any], trial: Any, status: str, reason: str) -> str:
        """The line for ``trial`` ending with ``status`` (also used by tests)."""
        now = standing(trials, trial, self.metric, self.mode)
        last = trial.last_result or {}
        parts = [f"trial {now.finished}/{self.num_samples} {trial.trial_id} {status}"]
        value, se = last.get(self.metric), last.get(reports.se_of(self.metric))
        if status != "error" and _finite(value):
            parts.append(f"{self.metric} {value:.4f}" + (f" ± {se:.3f}" if _finite(se) else ""))
        if status == "stopped":
            parts.append(f"after {last.get(reports.ITERATION, '?')} reports")
        elif status in ("error", "diverged") and reason:
            parts.append(f"({reason[:120]})")
        parts.append(f"(best {now.best_value:.4f}, trial {now.best_trial})"
                     if now.best_trial else "(none completed yet)")
        seconds = last.get(reports.TIME_TOTAL_S)
        if _finite(seconds):
            parts.append(f"{seconds:.0f} s")
        return " ".join(parts)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        """The encoder cache's warnings a trial sent with this result (a broken entry found
        and rebuilt, ``cbdtune.session.cache_notes``): its own log lines stay in Ray's
        session folder."""
        note = result.get(NOTE_KEY)
        if note:
            print(f"trial {trial.trial_id}: {note}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        print(self.line(trials, trial, *trial_status(trial.last_result)), flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        status, reason = trial_status(trial.last_result, errored=True, error=_error_text(trial))
        print(self.line(trials, trial, status, reason), flush=True)


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    return Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""


class SchedulerStateCallback(Callback):
    """Keeps the early-stopping scheduler's state in the experiment checkpoint, so ``--resume``
    does not forget its rungs.

    Tune 2.60 checkpoints the searcher and the callbacks, not the scheduler
    (``TuneController.__getstate__`` drops ``_scheduler_alg``; ``tuner.pkl`` holds the scheduler
    as it was built). Without this, a resumed search judges its remaining trials against empty
    rungs, and :class:`~cbdtune.stopping.NoiseAwareASHA` would wait again for trials to
    complete before stopping any. This callback and the ``TuneConfig`` share the scheduler
    object inside ``tuner.pkl`` (one pickle), so restoring the state here restores it in the
    scheduler Tune uses.

    Args:
        scheduler: one with ``get_state()``/``set_state()`` (the search's
            :class:`~cbdtune.stopping.NoiseAwareASHA`), or Ray's ``AsyncHyperBandScheduler``
            (its ``_brackets``, for a search started before the switch); anything else is left
            alone.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any] | None:
        own = getattr(self.scheduler, "get_state", None)
        if callable(own):
            return {"scheduler": own()}
        brackets = getattr(self.scheduler, "_brackets", None)
        if brackets is None:
            return None
        return {"rungs": [[(m, dict(rec)) for m, rec in b._rungs] for b in brackets],
                "num_stopped": getattr(self.scheduler, "_num_stopped", 0)}

    def set_state(self, state: dict[str, Any]) -> None:
        own = getattr(self.scheduler, "set_state", None)
        if callable(own):
            if "scheduler" in state:
                own(state["scheduler"])
            return
        brackets = getattr(self.scheduler, "_brackets", None) or []
        for bracket, saved in zip(brackets, state.get("rungs", []), strict=False):
            for (milestone, recorded), (saved_milestone, values) in zip(bracket._rungs, saved,
                                                                          strict=False):
                if milestone == saved_milestone:
                    recorded.update(values)
        if hasattr(self.scheduler, "_num_stopped"):
            self.scheduler._num_stopped = state.get("num_stopped", 0)


class MLflowTrialCallback(Callback):
    """One nested MLflow run per Tune trial, under the search's parent run.

    Ray's ``MLflowLoggerCallback`` logs what Tune receives; this callback adds what a search over
    CBD needs: nesting under a parent run, the *resolved* config (preset + space + trial values)
    as params and as ``config.yaml``, status and reason tags for trials that ASHA stopped, that
    diverged or that raised, figures, the parent's ``best_<metric>`` after every ended trial
    (step = trials ended so far), and no duplicate run for a trial after ``--resume`` (its state,
    kept in Tune's experiment checkpoint, maps trial ids to run ids; a tag search backs it up).

    Args:
        uri: MLflow tracking URI.
        experiment_id: MLflow experiment of the search.
        parent_run_id: the search's parent run.
        base: the config the trial values are applied to.
        metric: the selection metric, for the parent's best-so-far.
        mode: ``max`` or ``min``.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str,
                 base: ExperimentConfig, metric: str = reports.VAL_ACCURACY,
                 mode: str = "max") -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base = base
        self.metric = metric
        self.mode = mode
        self._runs: dict[str, str] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._client: Any = None

    # -- Tune's callback state: survives an interrupted search -------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment; a live MLflow client does not pickle.
        return {**self.__dict__, "_client": None}

    def get_state(self) -> dict[str, Any]:
        return {"runs": dict(self._runs), "history": {k: list(v) for k, v in self._history.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._runs = dict(state.get("runs", {}))
        self._history = {k: list(v) for k, v in state.get("history", {}).items()}

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def trial_config(self, trial: Any) -> ExperimentConfig:
        return self.base.replace(trial.config.get("train_loop_config", {}), where="trial")

    def _run_for(self, trial: Any) -> tuple[str, bool]:
        """The trial's run id, and whether it existed before (a resumed or retried trial)."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id], True
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                          f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=1)
        existed = bool(found)
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial_{trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id,
                      STATUS_TAG: "running"})
            run_id = run.info.run_id
            log_params(self.client, run_id, self.trial_config(trial).to_dict())
            searched = sorted(trial.config.get("train_loop_config", {}))
            set_tags(self.client, run_id, {SEARCHED_TAG: ",".join(searched)})
        self._runs[trial_id] = run_id
        return run_id, existed

    # -- Tune hooks --------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run_id, existed = self._run_for(trial)
        if existed:  # --resume: the run was ended KILLED when the search was interrupted
            reopen_run(self.client, run_id)
            set_tags(self.client, run_id, {STATUS_TAG: "running"})

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        run_id, _ = self._run_for(trial)
        step = int(result.get(reports.ITERATION, 0))
        metrics = {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING}
        log_metrics(self.client, run_id, metrics, step)
        kept: dict[str, Any] = dict(numeric(metrics))
        kept[reports.STAGE] = result.get(reports.STAGE, "")
        self._history.setdefault(trial.trial_id, []).append(kept)

    def _finish(self, trials: list[Any], trial: Any, status: str, reason: str) -> None:
        run_id, _ = self._run_for(trial)
        tags = {STATUS_TAG: status, **self._encoder_tags(trial.last_result or {})}
        if reason:
            tags[REASON_TAG] = reason
        set_tags(self.client, run_id, tags)
        try:
            log_trial_artifacts(self.client, run_id, self.trial_config(trial),
                                self._history.get(trial.trial_id, []))
        except Exception as exc:  # a figure must never lose the run's status
            set_tags(self.client, run_id, {ARTIFACT_ERROR_TAG: repr(exc)[:500]})
        self.client.set_terminated(run_id, status="FAILED" if status == "error" else "FINISHED")
        metric, mode = getattr(self, "metric", reports.VAL_ACCURACY), getattr(self, "mode", "max")
        now = standing(trials, trial, metric, mode)
        if now.best_value is not None:
            log_metrics(self.client, self.parent_run_id, {f"best_{metric}": now.best_value},
                        step=now.finished)

    def _encoder_tags(self, result: dict[str, Any]) -> dict[str, Any]:
        """Where the trial's encoder came from (``encoder_reused`` is a metric already): its
        key, the trial that pretrained it (``<search>/<trial id>``) and, when that trial is one
        of this experiment's, its MLflow run id."""
        key = result.get(reports.ENCODER_KEY)
        if not key:
            return {}
        source = str(result.get(reports.ENCODER_SOURCE, ""))
        tags = {ENCODER_KEY_TAG: key, ENCODER_SOURCE_TAG: source}
        source_trial = source.rpartition("/")[2]
        run_id = self._runs.get(source_trial)
        if run_id is None and source_trial.replace("_", "").replace("-", "").isalnum():
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{source_trial}'",
                max_results=1)
            run_id = found[0].info.run_id if found else None
        if run_id:
            tags[ENCODER_SOURCE_RUN_TAG] = run_id
        return tags

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self._finish(trials, trial, *trial_status(trial.last_result))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        status, reason = trial_status(trial.last_result, errored=True, error=_error_text(trial))
        self._finish(trials, trial, status, reason)
