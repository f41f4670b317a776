"""Where a trial's work runs: joining Ray (:func:`connect`), the trial's run settings
(:class:`TrialSettings`), its :class:`Session` (rank, device, what it resumes from) and how it
reports from there (:class:`Reporter`, :func:`cache_notes`).

:mod:`cbdtune.worker` runs a trial in one of these sessions; this module knows nothing of the
pipeline or of ``TorchTrainer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from cbdtune import encoder_cache, reports
from cbdtune.config import ConfigError
from cbdtune.encoder_cache import NOTE_KEY

CHECKPOINT_FILE = "state.pt"
# A trial's checkpoints at most this often: each report of a fast (ridge) trial came seconds
# apart, and with Tune's CheckpointConfig(num_to_keep) every second checkpoint forced an
# experiment snapshot ("Experiment state snapshotting has been triggered multiple times in the
# last 5.0 seconds"). A retried trial repeats at most this much work after its checkpoint.
CHECKPOINT_EVERY_S = 30.0
LOOP_KEY = "train_loop_config"  # the trial's hyperparameters in a Tune config (dotted keys)


@dataclass(frozen=True)
class TrialSettings:
    """How one trial runs, not what it trains: the run-level settings that travel through Tune's
    ``param_space`` next to ``train_loop_config`` (:meth:`param_space`), and
    :func:`cbdtune.worker.make_trainer`'s arguments (:meth:`trainer_args`).

    No defaults: the search decides every value (``cbdtune.search.trial_settings`` builds this
    from its :class:`~cbdtune.settings.SearchSettings`), so a trial never runs on a fallback of
    its own.
    """

    workers: int  # data-parallel workers
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int  # worker-group restarts (from the latest checkpoint) before the trial fails
    storage_path: str | None  # where the trial's Train checkpoints go
    encoder_cache: str | None  # pretrained encoders' root (cbdtune.encoder_cache); None: no reuse

    def trainer_args(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def in_trial(self) -> bool:
        """Whether a Tune trial runs its work in its own process (:func:`cbdtune.worker.train_driver_fn`)
        instead of through a ``TorchTrainer``: one CPU worker needs neither DDP nor a placement
        group, and a ``TorchTrainer`` costs 7 more Python processes per trial (its worker and
        :data:`cbdtune.worker.TRAINER_PROCESSES` helpers)."""
        return self.workers == 1 and self.gpus_per_worker == 0

    def trial_resources(self) -> dict[str, float]:
        """What the Tune trial actor reserves (``tune.with_resources``): the worker's CPUs when
        it does the work itself (:attr:`in_trial`), else none (its ``TorchTrainer``'s workers
        reserve them; a trial that held CPUs would starve its own workers)."""
        return {"cpu": self.cpus_per_worker if self.in_trial else 0.0}

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: these settings, and an empty ``train_loop_config`` for the
        searcher to fill."""
        return {**self.trainer_args(), LOOP_KEY: {}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialSettings:
        """Read them back from a trial's config.

        Raises:
            ConfigError: a setting is missing (the config was not built by :meth:`param_space`).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ConfigError(f"trial config: no {', '.join(missing)}; build Tune's param_space "
                              "with TrialSettings.param_space()")
        return cls(**{n: config[n] for n in names})


class Reporter:
    """The pipeline's ``report(metrics, payload)`` inside a Ray Train worker.

    Each report is kept in ``history`` (restored from the checkpoint on a resume) and sent with
    ``training_iteration`` = the trial's report count so far. Tune counts iterations itself only
    when a result has none (``Trainable.train`` setdefaults it), and its count restarts at 1 when
    an unfinished trial is resumed (the function trainable saves no Tune checkpoint to restore
    ``_iteration`` from), which made ASHA judge a resumed trial at its first rung again. The
    trial's own count continues: its checkpoint holds every report up to it, and the pipeline
    repeats exactly the reports after it.

    Args:
        history: the reports made before this attempt (from the checkpoint), else empty.
        extra: added to every report (where this attempt runs, what it resumed from).
        rank: the worker's rank; rank 0 alone saves the checkpoint ``payload``.
        send: where reports go; default ``ray.train.report``, looked up at each call.
        notes: the encoder cache's warnings to send with the next report (:func:`cache_notes`).
        checkpoint_cls: the checkpoint class ``send`` takes; default ``ray.train.Checkpoint``.
        checkpoint_every_s: a payload is checkpointed when at least this long has passed since
            the last checkpoint (the first always is); the other reports go without one.
    """

    def __init__(self, history: list[dict[str, Any]], extra: dict[str, Any], rank: int,
                 send: Callable[..., None] | None = None,
                 notes: list[str] | None = None, checkpoint_cls: Any | None = None,
                 checkpoint_every_s: float = 0.0) -> None:
        self.history = list(history)
        self.extra = extra
        self.rank = rank
        self.send = send
        self.notes = notes if notes is not None else []
        # Tune's Checkpoint is a class of its own: Tune refuses ray.train's in tune.report.
        self.checkpoint_cls = checkpoint_cls
        self.checkpoint_every_s = checkpoint_every_s
        self._last_checkpoint = -math.inf

    def __call__(self, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        metrics = {**metrics, **self.extra}
        if self.notes:  # the encoder cache's warnings since the last report, sent once
            metrics[NOTE_KEY] = "; ".join(self.notes)
            self.notes.clear()
        self.history.append(dict(metrics))
        out = {**metrics, reports.ITERATION: len(self.history)}
        send = self.send or ray.train.report
        due = time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        if payload is None or self.rank != 0 or not due:  # rank 0 alone checkpoints
            send(out)
            return
        self._last_checkpoint = time.monotonic()
        with tempfile.TemporaryDirectory() as d:
            torch.save({**payload, "history": self.history}, Path(d) / CHECKPOINT_FILE)
            checkpoint_cls = self.checkpoint_cls or ray.train.Checkpoint
            send(out, checkpoint=checkpoint_cls.from_directory(d))


@contextlib.contextmanager
def cache_notes() -> Iterator[list[str]]:
    """The encoder cache's warnings made inside the block (an entry found broken and
    rebuilt), as lines: :class:`Reporter` sends them with the trial's next report, and the
    search's driver prints them (``callbacks.ProgressCallback``); a worker's own log stays in
    Ray's session folder (``log_to_driver=False``)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, NOTE_KEY, False):
                lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    encoder_cache.log.addHandler(handler)
    try:
        yield lines
    finally:
        encoder_cache.log.removeHandler(handler)


@dataclass(frozen=True)
class Session:
    """Where a trial's work runs: a Ray Train worker (:func:`train_session`) or the Tune trial's
    own process (:func:`tune_session`), and how it reports from there.

    ``send`` None: ``ray.train.report``, looked up at each call (:class:`Reporter`).
    """

    rank: int
    world: int
    device: torch.device
    threads: int  # torch's CPU threads (0: leave torch's own count)
    checkpoint: Any | None  # the latest checkpoint to resume from (``.as_directory()``)
    send: Callable[..., None] | None
    checkpoint_cls: Any | None
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module]


def train_session() -> Session:
    """The :class:`Session` of a Ray Train worker (inside :func:`cbdtune.worker.train_fn_per_worker`)."""
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; torch is made to agree.
    return Session(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                   threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
                   checkpoint=ray.train.get_checkpoint(), send=None, checkpoint_cls=None,
                   wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


def local_session(cpus: float) -> Session:
    """The :class:`Session` of work done in this process on the CPU: one rank, ``int(cpus)``
    threads (what Ray sets OMP_NUM_THREADS to for a worker with those CPUs), nothing to resume
    from, and reports that go nowhere."""
    return Session(rank=0, world=1, device=torch.device("cpu"), threads=max(1, int(cpus)),
                   checkpoint=None, send=lambda *args, **kwargs: None, checkpoint_cls=None,
                   wrap_model=lambda m: m)


def tune_session(cpus: float) -> Session:
    """The :class:`Session` of a Tune trial that does its work itself
    (:attr:`TrialSettings.in_trial`): :func:`local_session`, reporting and checkpointing through
    Tune. A retry (Tune's ``FailureConfig``) or ``--resume`` continues from
    ``tune.get_checkpoint()``."""
    from ray import tune

    return dataclasses.replace(local_session(cpus), checkpoint=tune.get_checkpoint(),
                               send=tune.report, checkpoint_cls=tune.Checkpoint)


# Ray Train V2's controller polls its workers every 2 s and a worker's ``ray.train.report``
# waits for that poll: about 1.9 s per report on a small trial (measured here), 400 s of idle
# time for the paper's 200 classifier epochs. Polling every 0.25 s brings it to ~0.23 s.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def connect(address: str | None = None) -> str:
    """Join the Ray cluster at ``address``, else at ``$RAY_ADDRESS``, else start a local Ray of
    this process's own. Returns ``"cluster"`` or ``"local"``.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the job, so the same command runs unchanged on a
    laptop and on a cluster. Without either, a Ray that another process runs on this machine is
    not joined (``address="local"``; plain ``ray.init()`` would join the latest one started):
    pass ``--address auto`` for that. A local Ray listens on 127.0.0.1 only
    (:func:`_loopback_only`).
    """
    if ray.is_initialized():
        return "cluster"
    # The job-level env vars merge with a submitted job's own (unless it sets the same keys).
    env = {k: v for k, v in TRAIN_POLL_ENV.items() if k not in os.environ}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {}
    if address == "local" and "RAY_API_SERVER_ADDRESS" not in os.environ:
        # Ray Train's PlacementGroupCleaner asks the state API whether a trial's controller is
        # alive, at the address its process finds: with a second Ray on this machine (another
        # search) that lookup fails ("multiple active Ray instances") and the placement group
        # of every trial ASHA stops is never freed, until no CPU is left and the search hangs.
        # So this Ray's dashboard gets a port chosen here, and its workers are told where it is.
        kwargs["dashboard_port"] = free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    # log_to_driver=False: workers' logs stay in Ray's session folder; progress is Tune's.
    init = functools.partial(ray.init, address=address, log_to_driver=False,
                             runtime_env={"env_vars": env} if env else None, **kwargs)
    if address != "local":
        init()
        return "cluster"
    with _loopback_only():
        init(_node_ip_address=LOOPBACK)
    return "local"


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray whose every server listens on 127.0.0.1 only.

    A local Ray of Ray 2.60 on Linux takes the machine's address as its node IP, and its
    dashboard agent, metrics export port and monitor bind to 0.0.0.0 (``dashboard/agent.py``:
    all interfaces unless the node IP is a localhost one). ``ray.init(_node_ip_address=
    "127.0.0.1")`` alone is turned back into the machine's address
    (``services.resolve_ip_for_localhost``), except where Ray runs without clusters, as it
    does on macOS and Windows: ``ray_constants.ENABLE_RAY_CLUSTER`` off (env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which Ray's own processes read at import). A
    search's local Ray is one node: nothing else needs to reach it.
    """
    from ray._private import ray_constants  # TODO: private; re-check on a Ray upgrade

    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
