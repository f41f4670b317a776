"""The search's MLflow parent run, as a context manager that always ends it.

``with ParentRun(plan) as parent:`` opens the run (a new one with the search's params, the space
file and the datasets; ``--resume`` reopens its own) and every way out of the block ends it:

* FINISHED: the block returned and did not call :meth:`ParentRun.interrupted`;
* KILLED: Ctrl-C (``KeyboardInterrupt``, swallowed here: :attr:`ParentRun.exit_code` is 130) or
  the block called :meth:`ParentRun.interrupted` (Tune caught the Ctrl-C itself);
* FAILED: any other exception, whose first line becomes the run's reason tag; it propagates.

When the run does not finish, the trial runs still RUNNING end KILLED, the undo actions the block
registered run (:meth:`ParentRun.undo_unless_finished`: a model version registered by this
search is withdrawn), and the ``--resume`` command is printed when Tune can continue.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable
from importlib import resources
from types import TracebackType
from typing import Any

from cbdtune import _cli, tracking
from cbdtune.plan import SearchPlan, shown_path
from cbdtune.space import resolve_path

log = logging.getLogger("cbdtune.search")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
CTRL_C = "interrupted (Ctrl-C)"  # the parent run's reason after Ctrl-C


class ParentRun:
    """The search's parent run; :attr:`ref` names it for the trials' callback.

    Args:
        plan: the search.
    """

    def __init__(self, plan: SearchPlan) -> None:
        self.plan = plan
        self.mlc: Any = None
        self.ref = tracking.RunRef(plan.uri, "", "")
        self.exit_code = EXIT_INTERRUPTED  # until the block finished
        self._interrupted = False
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> ParentRun:
        try:
            self._open()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        ctrl_c = kind is not None and issubclass(kind, KeyboardInterrupt)
        if kind is None:
            status, reason = ("KILLED", CTRL_C) if self._interrupted else ("FINISHED", "")
        elif ctrl_c:  # a second Ctrl-C, or one outside Tune's loop (refits, registration)
            status, reason = "KILLED", CTRL_C
        else:
            status, reason = "FAILED", first_line(exc) if exc is not None else kind.__name__
        if status != "FINISHED":
            for undo in reversed(self._undo):
                undo()
        self._close(status, reason)
        self.exit_code = 0 if status == "FINISHED" else EXIT_INTERRUPTED
        return ctrl_c

    @property
    def run_id(self) -> str:
        return self.ref.run_id

    def interrupted(self) -> None:
        """End the run KILLED, not FINISHED, when the block returns (the trials were cut short)."""
        self._interrupted = True

    def undo_unless_finished(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the block does not finish (it must not raise)."""
        self._undo.append(action)

    def _open(self) -> None:
        """Params (no absolute path of this machine), the space file and the dataset on a new
        run; a resumed search reopens its own."""
        plan = self.plan
        self.mlc = tracking.client(plan.uri)
        exp_id = tracking.experiment_id(
            self.mlc, plan.settings.experiment or tracking.default_experiment(plan.label))
        for run_id in tracking.end_orphaned_searches(self.mlc, exp_id):
            log.warning("MLflow run %s: its search driver died; ended FAILED", run_id)
        run_id, created = self._find_or_create(exp_id)
        self.ref = tracking.RunRef(plan.uri, exp_id, run_id)
        tracking.set_tags(self.mlc, run_id, {tracking.DRIVER_TAG: tracking.driver_id()})
        if created:
            self._describe()

    def _find_or_create(self, exp_id: str) -> tuple[str, bool]:
        """The run (the latest of this name with ``--resume``), and whether it is new."""
        name = self.plan.name
        if self.plan.settings.resume:
            found = self.mlc.search_runs(
                [exp_id], filter_string=f"tags.`{tracking.SEARCH_TAG}` = '{name}' and "
                                        f"tags.`{tracking.ROLE_TAG}` = '{tracking.ROLE_SEARCH}'",
                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                tracking.reopen_run(self.mlc, found[0].info.run_id)
                return found[0].info.run_id, False
        run = self.mlc.create_run(exp_id, run_name=name, tags={
            tracking.SEARCH_TAG: name, tracking.ROLE_TAG: tracking.ROLE_SEARCH,
            tracking.COMMAND_TAG: self.plan.command})
        tracking.log_params(self.mlc, run.info.run_id, search_params(self.plan))
        return run.info.run_id, True

    def _describe(self) -> None:
        """The space file and the datasets on a new run (a failure here is logged and tagged;
        it never stops the search)."""
        plan = self.plan
        try:
            with resources.as_file(resolve_path(plan.settings.space)) as path:
                self.mlc.log_artifact(self.run_id, str(path), artifact_path="space")
            for slug, data in plan.datasets.items():
                digest = tracking.log_dataset(self.mlc, self.run_id, data)
                tag = tracking.DATASET_SHA256_TAG + (f".{slug}" if plan.multi else "")
                tracking.set_tags(self.mlc, self.run_id, {tag: digest})
        except Exception as exc:
            log.warning("space file or dataset not logged on the parent run: %s", first_line(exc))
            tracking.set_tags(self.mlc, self.run_id,
                              {tracking.DESCRIBE_ERROR_TAG: first_line(exc)})

    def _close(self, status: str, reason: str) -> None:
        """End the trial runs left RUNNING (KILLED) and the run; print how to continue."""
        plan = self.plan
        if not self.run_id:
            return
        try:
            tracking.end_open_runs(self.mlc, self.ref.experiment_id, self.run_id,
                                   status="KILLED", reason=tracking.TRIAL_INTERRUPTED)
            if reason:
                tracking.set_tags(self.mlc, self.run_id, {tracking.REASON_TAG: reason})
            self.mlc.set_terminated(self.run_id, status=status)
        except Exception as exc:  # MLflow itself failing must not hide why the search ended
            log.warning("MLflow runs of search %s not ended: %s", plan.name, first_line(exc))
        if status != "FINISHED" and _restorable(plan.experiment_path):
            print(f"search {plan.name} {'interrupted' if status == 'KILLED' else 'failed'}; "
                  f"continue it with:\n  {resume_command(list(plan.argv), plan.name)}",
                  file=sys.stderr, flush=True)


def search_params(plan: SearchPlan) -> dict[str, Any]:
    """The parent run's params (also the summary's header): no absolute path of this machine."""
    a, base = plan.settings, plan.base
    return {"dataset": plan.label, "space": shown_path(a.space, plan.space.path),
            "space_sha256": plan.space.sha256, "git_commit": tracking.git_commit(),
            "sampler": a.sampler, "scheduler": a.scheduler, "seed": base.train.seed,
            "metric": ",".join(a.metrics), "mode": ",".join(a.modes),
            "cv_folds": base.data.cv_folds, "cv_repeats": base.data.cv_repeats,
            "num_samples": a.num_samples, "workers_per_trial": a.workers_per_trial,
            "gpus_per_worker": a.gpus_per_worker, "time_budget": a.time_budget or "none"}


def _restorable(path: str) -> bool:
    """Whether ``--resume`` could continue the Tune experiment at ``path``."""
    try:
        from ray import tune

        return bool(tune.Tuner.can_restore(path))
    except Exception:
        return False


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


def resume_command(argv: list[str], name: str) -> str:
    """The command that continues this search: its own flags, ``--name <name> --resume``
    (``--overwrite`` and any earlier ``--name``/``--resume`` dropped)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--name":
            skip = True
        elif arg not in ("--resume", "--overwrite") and not arg.startswith("--name="):
            kept.append(arg)
    return " ".join([_cli.prog("cbdtune.search"), *map(shlex.quote, kept), "--name",
                     shlex.quote(name), "--resume"])
