"""MLflow logging for trials: parameters, metric series, final metrics, config and figures.

Used by ``python -m cbdtune.train`` (one run) and by the search's Tune callback (a parent run per
search, a nested run per trial). Everything goes through ``MlflowClient`` with explicit run ids,
so several trials can log concurrently from one driver and a resumed search can find and reuse
the run a trial already has (tag ``cbdtune.trial_id``) instead of creating a duplicate.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from cbdtune.config import CbdtuneError, ExperimentConfig

DEFAULT_STORE = "mlflow.db"  # sqlite in the working directory (MLflow 3.17's file store raises)
TRIAL_TAG = "cbdtune.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests runs by


def resolve_tracking_uri(uri: str | None) -> str:
    """``None`` -> ``sqlite:///<cwd>/mlflow.db``; anything else is returned unchanged."""
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def check_tracking_uri(uri: str, *, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the tracking store cannot be reached.

    Raises:
        CbdtuneError: an HTTP server that does not answer ``/health``, or a sqlite file whose
            folder does not exist.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise CbdtuneError(f"--mlflow-uri {uri}: /health answered {resp.status}; "
                                       "is it an MLflow tracking server?")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CbdtuneError(f"--mlflow-uri {uri}: cannot reach the MLflow server ({reason}); "
                               "start it (mlflow server --host 127.0.0.1 --port 5000) or fix "
                               "the URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise CbdtuneError(f"--mlflow-uri {uri}: folder {folder} does not exist; create it "
                               "or choose another path")


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: Any, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(name)


def git_commit() -> str:
    """The repository's HEAD (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a result dict (MLflow metrics); bools and strings dropped."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for chunk in _chunks(entries, 100):  # MLflow's batch limit for params
        mlflow_client.log_batch(run_id, params=chunk)


def log_metrics(mlflow_client: Any, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
    for chunk in _chunks(entries, 1000):  # MLflow's batch limit for metrics
        mlflow_client.log_batch(run_id, metrics=chunk)


def set_tags(mlflow_client: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def log_trial_artifacts(mlflow_client: Any, run_id: str, cfg: ExperimentConfig | None,
                        history: list[dict[str, Any]]) -> None:
    """The resolved config (YAML) and the learning-curve and spectrum-energy figures (PNG)."""
    from cbdtune import figures

    if cfg is not None:
        mlflow_client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    for name, fig in (("learning_curve.png", figures.learning_curve(history)),
                      ("spectrum_energy.png", figures.spectrum_energy(history))):
        if fig is None:
            continue
        mlflow_client.log_figure(run_id, fig, name)
        figures.close(fig)


def log_single_run(uri: str, experiment: str, cfg: ExperimentConfig, history: list[dict[str, Any]],
                   final: dict[str, Any], *, status: str, reason: str = "",
                   tags: dict[str, Any] | None = None) -> str:
    """Log one finished trial as one run (``python -m cbdtune.train``). Returns the run id."""
    c = client(uri)
    run = c.create_run(experiment_id(c, experiment),
                       tags={"cbdtune.status": status, "cbdtune.git_commit": git_commit(),
                             **(tags or {})})
    run_id = run.info.run_id
    log_params(c, run_id, cfg.to_dict())
    for step, metrics in enumerate(history, start=1):
        log_metrics(c, run_id, metrics, step)
    if reason:
        set_tags(c, run_id, {"cbdtune.reason": reason})
    log_trial_artifacts(c, run_id, cfg, history)
    c.set_terminated(run_id, status="FINISHED" if status == "completed" else "FAILED")
    return run_id


def default_experiment(dataset: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"cbdtune-{dataset}"


# Keys Tune adds to every result that are bookkeeping, not measurements.
_TUNE_BOOKKEEPING = {"timestamp", "pid", "time_since_restore", "iterations_since_restore",
                     "training_iteration", "done", "time_this_iter_s"}


def trial_status(last: dict[str, Any] | None, *, errored: bool = False,
                 error: str = "") -> tuple[str, str]:
    """``(status, reason)`` of a finished Tune trial from its last result."""
    if errored:
        return "error", error.strip().splitlines()[-1][:500] if error.strip() else "trial raised"
    last = last or {}
    if last.get("final") == 1 and last.get("diverged") == 1:
        return "diverged", str(last.get("reason", "loss became NaN/inf"))
    if last.get("final") == 1:
        return "completed", ""
    it = last.get("training_iteration", "?")
    return "stopped", f"stopped early by the scheduler (ASHA) after {it} reports"


class MLflowTrialCallback(Callback):
    """One nested MLflow run per Tune trial, under the search's parent run.

    Ray's ``MLflowLoggerCallback`` logs what Tune receives; this callback adds what a search over
    CBD needs: nesting under a parent run, the *resolved* config (preset + space + trial values)
    as params and as ``config.yaml``, status and reason tags for trials that ASHA stopped, that
    diverged or that raised, figures, and no duplicate run for a trial after ``--resume`` (its
    state, kept in Tune's experiment checkpoint, maps trial ids to run ids; a tag search backs
    it up).

    Args:
        uri: MLflow tracking URI.
        experiment_id: MLflow experiment of the search.
        parent_run_id: the search's parent run.
        base: the config the trial values are applied to.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str,
                 base: ExperimentConfig) -> None:
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base = base
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

    def _run_for(self, trial: Any) -> str:
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                          f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
            max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial_{trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id,
                      "cbdtune.status": "running"})
            run_id = run.info.run_id
            cfg = self.trial_config(trial)
            log_params(self.client, run_id, cfg.to_dict())
            searched = sorted(trial.config.get("train_loop_config", {}))
            set_tags(self.client, run_id, {"cbdtune.searched": ",".join(searched)})
        self._runs[trial_id] = run_id
        return run_id

    # -- Tune hooks --------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        run_id = self._run_for(trial)
        step = int(result.get("training_iteration", 0))
        metrics = {k: v for k, v in result.items() if k not in _TUNE_BOOKKEEPING}
        log_metrics(self.client, run_id, metrics, step)
        kept = {k: v for k, v in numeric(metrics).items()}
        kept["stage"] = result.get("stage", "")
        self._history.setdefault(trial.trial_id, []).append(kept)

    def _finish(self, trial: Any, status: str, reason: str) -> None:
        run_id = self._run_for(trial)
        tags = {"cbdtune.status": status}
        if reason:
            tags["cbdtune.reason"] = reason
        set_tags(self.client, run_id, tags)
        try:
            log_trial_artifacts(self.client, run_id, self.trial_config(trial),
                                self._history.get(trial.trial_id, []))
        except Exception as exc:  # a figure must never lose the run's status
            set_tags(self.client, run_id, {"cbdtune.artifact_error": repr(exc)[:500]})
        self.client.set_terminated(run_id, status="FAILED" if status == "error" else "FINISHED")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self._finish(trial, *trial_status(trial.last_result))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = ""
        path = getattr(trial, "error_file", None)
        if path and Path(path).is_file():
            error = Path(path).read_text(errors="replace")
        self._finish(trial, *trial_status(trial.last_result, errored=True, error=error))
