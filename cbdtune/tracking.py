"""MLflow helpers: the tracking store's checks, params, metrics, tags, trial artifacts, datasets.

Used by ``python -m cbdtune.train`` (one run) and by the search (a parent run per search, a
nested run per trial, logged by :class:`cbdtune.callbacks.MLflowTrialCallback`). Everything goes
through ``MlflowClient`` with explicit run ids, so several trials can log concurrently from one
driver. Nothing here imports Ray: ``import cbdtune.train`` stays free of ``ray.tune``.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbdtune import reports
from cbdtune.config import CbdtuneError, ExperimentConfig

DEFAULT_STORE = "mlflow.db"  # sqlite in the working directory (MLflow 3.17's file store raises)
# MLflow tags: every name cbdtune writes or queries is one of these (this module owns them).
PARENT_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests runs by
TRIAL_TAG = "cbdtune.trial_id"  # a trial's run: its Tune trial id
DRIVER_TAG = "cbdtune.driver"  # <host>:<pid> of the process running a search (orphan detection)
ROLE_TAG = "cbdtune.role"  # ROLE_SEARCH on a search's parent run
ROLE_SEARCH = "search"
SEARCH_TAG = "cbdtune.search"  # the parent run: the search's name
COMMAND_TAG = "cbdtune.command"  # the parent run: the command that ran the search
STATUS_TAG = "cbdtune.status"  # a trial's or a single run's status (completed, stopped, ...)
REASON_TAG = "cbdtune.reason"  # why a run ended as it did (stopped, failed, interrupted)
GIT_COMMIT_TAG = "cbdtune.git_commit"
ENTRY_TAG = "cbdtune.entry"  # a single run: the command that logged it (train)
IN_PROCESS_TAG = "cbdtune.in_process"  # a single run: run without Ray
SEARCHED_TAG = "cbdtune.searched"  # a trial's run: the keys its search sampled
ARTIFACT_ERROR_TAG = "cbdtune.artifact_error"  # a trial's figures failed (its status stands)
ENCODER_KEY_TAG = "cbdtune.encoder_key"  # the encoder a trial used (cbdtune.encoder_cache)
ENCODER_SOURCE_TAG = "cbdtune.encoder_source"  # <search>/<trial> that pretrained it
ENCODER_SOURCE_RUN_TAG = "cbdtune.encoder_source_run"  # that trial's run id, when known
DATASET_SHA256_TAG = "cbdtune.dataset_sha256"  # the parent: .<slug> appended for several
DESCRIBE_ERROR_TAG = "cbdtune.describe_error"  # the parent: space file or dataset not logged
BEST_TRIAL_TAG = "cbdtune.best_trial"  # the parent: the best completed trial's id
VIEWS_ERROR_TAG = "cbdtune.views_error"  # the parent: Optuna's study or figures not written
OPTUNA_STORAGE_TAG = "cbdtune.optuna_storage"  # the parent: the exported study's storage URL
OPTUNA_STUDY_TAG = "cbdtune.optuna_study"  # the parent: the study's name
MODEL_TAG = "cbdtune.model"  # the parent: models:/<name>/<version> of the registered ensemble
TRIAL_INTERRUPTED = "interrupted; --resume continues it"  # the reason of a trial cut short
# Backends MLflow 3.17 serves tracking *and* the model registry from (the search registers a
# model); the registry's error lists the same schemes, minus the file store, which 3.17 refuses.
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_SQLITE_MAGIC = b"SQLite format 3\x00"  # https://www.sqlite.org/fileformat.html, section 1.3


@dataclass(frozen=True)
class RunRef:
    """One MLflow run: the store it lives in, its experiment and its id."""

    uri: str
    experiment_id: str
    run_id: str


def resolve_tracking_uri(uri: str | None) -> str:
    """``None`` -> ``sqlite:///<cwd>/mlflow.db``; anything else is returned unchanged."""
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


def check_tracking_uri(uri: str, *, timeout: float = 5.0, writable: bool = False) -> None:
    """Fail fast, in one line, when the tracking store cannot be used.

    Args:
        uri: the tracking URI (after :func:`resolve_tracking_uri`).
        timeout: seconds to wait for an HTTP server's ``/health``.
        writable: also refuse a sqlite store that cannot be written (the search and
            ``cbdtune.train`` write; ``cbdtune.predict`` only reads).

    Raises:
        CbdtuneError: a file store (``file://`` or a bare path), a scheme MLflow cannot track to,
            an HTTP server that does not answer ``/health``, or a sqlite store whose folder does
            not exist, that is not a complete SQLite file, or (``writable``) that is read-only.
    """
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise CbdtuneError(f"--mlflow-uri {uri}: a file store; MLflow 3.17 no longer opens one. "
                           "Use sqlite:///mlflow.db (mlflow migrate-filestore moves old runs)")
    if scheme not in SUPPORTED_SCHEMES:
        raise CbdtuneError(f"--mlflow-uri {uri}: unsupported scheme {scheme}://; use one of "
                           f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)}")
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri, Path(uri[len("sqlite:///"):]).expanduser(), writable=writable)


def _check_server(uri: str, timeout: float) -> None:
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


def _check_sqlite(uri: str, db: Path, *, writable: bool) -> None:
    """The folder exists; an existing file is a whole SQLite database; writable when asked."""
    if not db.parent.is_dir():
        raise CbdtuneError(f"--mlflow-uri {uri}: folder {db.parent} does not exist; create it "
                           "or choose another path")
    if db.exists():
        problem = sqlite_problem(db)
        if problem:
            raise CbdtuneError(f"--mlflow-uri {uri}: {problem}; restore it from a backup or "
                               "choose another path")
    if writable:
        target = db if db.exists() else db.parent
        if not is_writable(target):
            raise CbdtuneError(f"--mlflow-uri {uri}: {target} is read-only; make it writable "
                               "(sqlite also writes a journal next to the file) or choose "
                               "another path")


def sqlite_problem(db: Path) -> str:
    """What is wrong with an existing SQLite file (``""`` when nothing is).

    A file cut short is found from the header alone (the page size times the page count it
    declares), so a large store costs no full scan.
    """
    if db.is_dir():
        return f"{db} is a folder, not a SQLite file"
    size = db.stat().st_size
    if size == 0:
        return ""  # sqlite treats an empty file as an empty database; MLflow fills it
    with db.open("rb") as f:
        header = f.read(100)
    if not header.startswith(_SQLITE_MAGIC):
        return f"{db} is not a SQLite database"
    if len(header) < 100:
        return f"{db} is truncated ({size} bytes, shorter than a SQLite header)"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    header_valid = header[24:28] == header[92:96]  # "version-valid-for" == change counter
    if header_valid and pages and size < page_size * pages:
        return (f"{db} is truncated ({size} bytes, its header declares {pages} pages of "
                f"{page_size} bytes)")
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{db} cannot be read as SQLite ({exc})"
    return ""


def is_writable(path: Path) -> bool:
    """Whether ``path`` (a file, or a folder a new file can be made in) accepts writes.

    A file or folder with no write bit counts as read-only even for root, who could write it
    anyway: the user marked it so. A read-only mount is found by trying, changing nothing.
    """
    try:
        if not os.stat(path).st_mode & 0o222:
            return False
        if path.is_dir():
            with tempfile.TemporaryFile(dir=path):
                pass
        else:
            with path.open("r+b"):
                pass
    except OSError:
        return False
    return True


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


def log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Params as strings, cut to MLflow's 6000 characters; ``log_batch`` chunks by itself
    (100 params per request in MLflow 3.17, ``MlflowClient.log_batch``)."""
    from mlflow.entities import Param

    mlflow_client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def log_metrics(mlflow_client: Any, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """The finite numbers of ``metrics`` at ``step`` (chunked by ``log_batch``, 1000 a request)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, now, step)
                                             for k, v in numeric(metrics).items()])


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
                       tags={STATUS_TAG: status, GIT_COMMIT_TAG: git_commit(),
                             **(tags or {})})
    run_id = run.info.run_id
    log_params(c, run_id, cfg.to_dict())
    for step, metrics in enumerate(history, start=1):
        log_metrics(c, run_id, metrics, step)
    if reason:
        set_tags(c, run_id, {REASON_TAG: reason})
    log_trial_artifacts(c, run_id, cfg, history)
    c.set_terminated(run_id, status="FINISHED" if status == "completed" else "FAILED")
    return run_id


def default_experiment(dataset: str) -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"cbdtune-{dataset}"


def trial_status(last: dict[str, Any] | None, *, errored: bool = False,
                 error: str = "") -> tuple[str, str]:
    """``(status, reason)`` of a finished Tune trial from its last result."""
    if errored:
        return "error", error.strip().splitlines()[-1][:500] if error.strip() else "trial raised"
    last = last or {}
    if reports.is_diverged(last):
        return "diverged", str(last.get(reports.REASON, "loss became NaN/inf"))
    if reports.is_final(last):
        return "completed", ""
    it = last.get(reports.ITERATION, "?")
    return "stopped", f"stopped before its final report (ASHA or --time-budget) after {it} reports"


def end_open_runs(mlflow_client: Any, experiment_id: str, parent_run_id: str, *, status: str,
                  reason: str) -> list[str]:
    """End every run nested under ``parent_run_id`` that is still RUNNING; returns their ids.

    Args:
        status: MLflow's end status, ``KILLED`` or ``FAILED``.
        reason: the :data:`REASON_TAG` each gets (:data:`STATUS_TAG` becomes ``unfinished``).
    """
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                       "attributes.status = 'RUNNING'", max_results=10000)
    for run in runs:
        set_tags(mlflow_client, run.info.run_id,
                 {STATUS_TAG: "unfinished", REASON_TAG: reason})
        mlflow_client.set_terminated(run.info.run_id, status=status)
    return [r.info.run_id for r in runs]


def driver_id() -> str:
    """``<host>:<pid>`` of this process: the tag :data:`DRIVER_TAG` of a search's parent run."""
    return f"{socket.gethostname()}:{os.getpid()}"


def end_orphaned_searches(mlflow_client: Any, experiment_id: str) -> list[str]:
    """End the parent runs whose search driver died without ending them; returns their ids.

    A driver killed outright (SIGKILL, the OOM killer, Ray exiting the process when its raylet
    dies) runs no ``finally``. Its parent run is still RUNNING with a :data:`DRIVER_TAG` of this
    host and a pid no process has: it ends FAILED, and its trial runs still RUNNING end KILLED.
    Runs of other hosts, or of a live pid, are left alone (they may be searching right now).
    """
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SEARCH}' and "
                                       "attributes.status = 'RUNNING'", max_results=1000)
    ended = []
    for run in runs:
        host, _, pid = run.data.tags.get(DRIVER_TAG, "").rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            continue
        end_open_runs(mlflow_client, experiment_id, run.info.run_id, status="KILLED",
                      reason=TRIAL_INTERRUPTED)
        set_tags(mlflow_client, run.info.run_id, {REASON_TAG: f"the search driver (pid {pid}) "
                                                  "died without ending its runs"})
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def reopen_run(mlflow_client: Any, run_id: str) -> None:
    """Mark a run RUNNING again (``--resume``) and drop the reason it was ended with."""
    mlflow_client.update_run(run_id, status="RUNNING")
    if REASON_TAG in mlflow_client.get_run(run_id).data.tags:
        mlflow_client.delete_tag(run_id, REASON_TAG)


def dataset_digest(data: Any) -> str:
    """sha256 of the training arrays (x then y, as stored): the same series give the same hash."""
    h = hashlib.sha256()
    for array in (data.train.x, data.train.y):
        h.update(array.tobytes())
    return h.hexdigest()


def log_dataset(mlflow_client: Any, run_id: str, data: Any, *, context: str = "training") -> str:
    """Log the training split as the run's dataset input (``mlflow.data``); returns its digest.

    The source is the dataset's publication (its URL, or the citation text) when known, else the
    folder it was read from. MLflow stores at most 36 characters of digest, so the input carries
    the first 32 hex digits of :func:`dataset_digest`.
    """
    # from_numpy from its own module: mlflow.data re-exports it by setattr, unseen by mypy.
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import DatasetInput, InputTag

    text = data.source or data.location
    url = next((w for w in text.split() if w.startswith(("http://", "https://"))), None)
    digest = dataset_digest(data)
    dataset = from_numpy(data.train.x, targets=data.train.y, name=data.name, digest=digest[:32],
                         source=HTTPDatasetSource(url) if url else text)
    tags = [InputTag("mlflow.data.context", context), InputTag("source", text[:1000])]
    # What mlflow.log_input does (fluent.py, _create_dataset_input), with an explicit run id
    # instead of an active run and the global tracking URI.
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
    return digest

