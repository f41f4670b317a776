"""The search: ``python -m cbdtune.search --dataset gesture``.

Ray Tune runs trials, Optuna (TPE by default) proposes them, ASHA stops the weak ones on the
pipeline's fidelity reports, and every trial lands in MLflow as a run nested under the search's
parent run. Each trial is a Tune function trainable that launches a Ray Train ``TorchTrainer``
(``cbdtune.worker``), so a trial can be data-parallel over several workers or GPUs.

The same command runs on a laptop (a local Ray is started, MLflow writes ``./mlflow.db``) and as
``ray job submit -- python -m cbdtune.search ...`` on a cluster (``RAY_ADDRESS`` is set by Ray).

:func:`run_search` is a few phases over a frozen plan:

1. :func:`cbdtune.plan.make_plan`: every input checked, the search named, before Ray starts;
2. :func:`cbdtune.tuning.connect` and :func:`cbdtune.tuning.tune`: Ray, the Tuner, the trials;
3. the results folder, the best trial and Optuna's views on the parent run (:func:`_report`);
4. :func:`cbdtune.handover.refit_and_register`: the model a search hands over;

all inside :class:`cbdtune.parent_run.ParentRun`, the MLflow parent run, which every way out
ends: FINISHED; KILLED after Ctrl-C in any phase (exit 130, with the ``--resume`` command
printed, no model version registered); FAILED after an exception (its first line is the
parent's reason tag, :data:`cbdtune.tracking.REASON_TAG`).

In Python: ``run_search(SearchSettings(datasets=("gesture",), space="smoke"))`` returns a
:class:`SearchResult`; the command line is a thin mapping of its flags onto
:class:`~cbdtune.settings.SearchSettings`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbdtune import _cli, handover, parent_run, reports, results, tracking, tuning
from cbdtune.config import CbdtuneError
from cbdtune.parent_run import EXIT_INTERRUPTED, ParentRun, first_line, resume_command
from cbdtune.plan import SearchPlan, encoder_root, make_plan, shown_path
from cbdtune.settings import SAMPLERS, SCHEDULERS, SearchSettings, parse_duration
from cbdtune.tuning import (
    DRIVER_MEMORY,
    make_searcher,
    max_reports,
    param_space,
    persisted_trial_states,
    trial_settings,
)

log = logging.getLogger("cbdtune.search")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_cli.prog("cbdtune.search"),
        description="Hyperparameter search for CBD with Ray Tune + Optuna + ASHA, logged to "
                    "MLflow. Runs on a local Ray or the cluster at $RAY_ADDRESS.")
    _cli.add_version_flag(p)
    _cli.add_config_flags(
        p, dataset_help="registry name (gesture, awr, ...), UEA/UCR archive name, or a folder; "
                        "several separated by commas (gesture,awr,fm) search one configuration "
                        "on all of them, scored by the mean of their CV accuracies")
    p.add_argument("--space",
                   help="search space YAML, or a name in search_spaces/ (default, paper, smoke)")
    p.add_argument("--num-samples", type=int, help="trials to run (default %(default)s)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    p.add_argument("--workers-per-trial", type=int, help="data-parallel workers")
    _cli.add_worker_flags(p, gpus_default="%(default)s")
    p.add_argument("--sampler", choices=SAMPLERS, help="Optuna sampler, seeded (default %(default)s)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="asha stops weak trials on their intermediate reports (default: asha "
                        "for one dataset; none for several, where a trial reports once at its "
                        "end and asha is refused)")
    p.add_argument("--metric", help="what to optimise (default %(default)s); two, comma-separated "
                                    "(val_accuracy,time_total_s), search both with Optuna's "
                                    "multi-objective sampler and rank trials by the first")
    p.add_argument("--mode", help="max or min, one per metric (default: min for losses and "
                                  "time_total_s, else max)")
    _cli.add_mlflow_flags(p)
    p.add_argument("--name", help="search name: Tune run and results folder "
                                  "(default <dataset>-<space>, suffixed -2, -3... when taken)")
    _add_run_flags(p)
    p.set_defaults(**SearchSettings.cli_defaults())  # one place for every default: the settings
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the search runs and stores, what it does after, and encoder reuse."""
    p.add_argument("--storage",
                   help="Ray storage: a folder or s3:// / gs:// URI (default ~/ray_results)")
    p.add_argument("--results-dir", help="where <results-dir>/<dataset>/<name> goes (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest search of this name from its storage (an "
                        "interrupted search prints the exact command)")
    p.add_argument("--overwrite", action="store_true",
                   help="use --name (or the default name) even if a search of that name exists: "
                        "its results files are replaced and Tune starts a new experiment in its "
                        "storage (ignored with --resume)")
    p.add_argument("--cv-folds", type=int,
                   help="k of the stratified k-fold cross-validation each trial is scored by "
                        "(default: the space's, 5; at most the training series of a "
                        "dataset's largest class); 0 = one validation split (large datasets)")
    p.add_argument("--cv-repeats", type=int,
                   help="repeat the k folds with fresh shuffles (tiny datasets; default 1)")
    p.add_argument("--refit-top", type=int,
                   help="refit the best N configurations on all training series (default %(default)s; "
                        "0 = no refit, no model)")
    p.add_argument("--refit-seeds", type=int,
                   help="seeds per refit configuration (default %(default)s); the model is the ensemble")
    p.add_argument("--ensemble", choices=("select", "top"),
                   help="the model: select = greedy ensemble selection over every completed "
                        "trial's out-of-fold probabilities and a MiniRocket baseline, each "
                        "selected configuration refit --refit-seeds times; top = the best "
                        "--refit-top configurations, equal weights (default %(default)s)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not run the paper's configuration as the first trial")
    p.add_argument("--max-failures", type=int,
                   help="retries of a trial (and of its worker group) after a failure (default %(default)s)")
    p.add_argument("--allow-autoscale", action="store_true",
                   help="skip the resource check: the cluster's autoscaler will add nodes")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="stop starting and running trials after this long (90m, 2h, 3600s); "
                        "the trials that ended are refit as usual")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray Tune's trial table (default: one line per finished trial)")
    p.add_argument("--no-reuse", action="store_true",
                   help="pretrain every trial: no encoder cache, no trials on known encoders")
    p.add_argument("--encoder-cache", metavar="PATH_OR_URI",
                   help="where pretrained encoders are stored and reused, a folder or s3:// / "
                        "gs:// URI (default <storage>/encoders)")
    p.add_argument("--reuse-share", type=float,
                   help="the most trials Optuna proposes on an already pretrained encoder, "
                        "as a share of all (default %(default)s)")


@dataclass(frozen=True)
class SearchResult:
    """What a search leaves (:func:`run_search`).

    ``trials`` is ``trials.parquet`` as a DataFrame (empty when the search stopped before Tune
    returned); ``best_trial`` and ``best_value`` are the best *completed* trial's id and
    ``metric``. ``storage_path`` is Tune's experiment (``--resume`` continues it), ``results_dir``
    the search's results folder, ``mlflow_run_id`` the parent run in ``mlflow_uri``.
    """

    name: str
    status: str  # "finished" | "interrupted"
    exit_code: int  # 0 finished, EXIT_INTERRUPTED (130) interrupted
    metric: str
    mode: str
    trials: Any  # pandas.DataFrame
    best_trial: str | None
    best_value: float | None
    results_dir: Path
    storage_path: str
    mlflow_uri: str
    mlflow_run_id: str
    study_url: str | None = None  # the Optuna study (optuna-dashboard <url>)
    model_dir: Path | None = None  # the refit ensemble (None without refits)


@dataclass(frozen=True)
class Report:
    """The trials as written to the results folder and the parent run (:func:`_report`)."""

    tuned: tuning.Tuned
    best: Any  # the best completed trial's row, or None
    study_url: str | None  # the exported Optuna study
    header: dict[str, Any]  # the summary's header: the parent's params, wall time, Ray
    paths: dict[str, Path]  # the results files written


def run_search(settings: SearchSettings, *, argv: list[str] | None = None) -> SearchResult:
    """Run one search to the end, or until Ctrl-C (``status="interrupted"``, exit code 130).

    Once the parent MLflow run exists, every way out ends it (:class:`ParentRun`): FINISHED,
    KILLED (Ctrl-C; the trials that had not finished end KILLED too) or FAILED (an exception,
    its first line in the reason tag, and the exception propagates), and the ``--resume``
    command is printed whenever Tune can continue. Ctrl-C works in every phase (trials, refits,
    registration: :func:`cbdtune.tuning.fit`), and a search that does not finish leaves no
    registered model version (:func:`cbdtune.handover.withdraw_model`).

    Args:
        settings: the search (validated when it was built).
        argv: the command line as typed, for the summary and the ``--resume`` hint; default:
            the flags that give ``settings`` (:meth:`SearchSettings.to_argv`).

    Raises:
        CbdtuneError: an input that fails its check before Ray starts (space, dataset, MLflow
            store, storage, results folder, resources), with one line saying what to do.
    """
    plan = make_plan(settings, argv)  # bad input costs nothing: Ray has not started
    cluster = tuning.connect(plan)
    report: Report | None = None
    model: handover.Handover | None = None
    with ParentRun(plan) as parent:
        report = _report(plan, cluster, parent, tuning.tune(plan, cluster, parent.ref))
        if _refits(plan, report):
            model = handover.refit_and_register(
                plan, parent, results.ranked(report.tuned.trials, plan.metric, plan.mode),
                next(iter(cluster.data_refs.values())))
        _finish(plan, parent, report, model)
        if report.tuned.interrupted:
            parent.interrupted()
    return _result(plan, parent, report, model)


def _report(plan: SearchPlan, cluster: tuning.Cluster, parent: ParentRun,
            tuned: tuning.Tuned) -> Report:
    """The trials' table and summary in the results folder; the best trial and Optuna's study
    and figures on the parent run."""
    header = {**parent_run.search_params(plan), "wall_s": round(tuned.wall_s, 1),
              "ray": cluster.where}
    paths = results.write(plan.out_dir, tuned.trials, **_write_args(plan, header))
    best = results.best_trial(tuned.trials, plan.metric, plan.mode)
    _log_best(plan, parent, tuned.trials, best)
    return Report(tuned=tuned, best=best, study_url=_log_views(plan, parent, tuned),
                  header=header, paths=paths)


def _write_args(plan: SearchPlan, header: dict[str, Any]) -> dict[str, Any]:
    st = plan.settings
    return dict(space=plan.space, base=plan.base, metric=plan.metric, mode=plan.mode,
                command=plan.command, header=header, datasets=plan.slugs,
                objectives=dict(zip(st.metrics, st.modes, strict=True)))


def _refits(plan: SearchPlan, report: Report) -> bool:
    """Whether the search refits and registers (a completed trial, --refit-top, not cut short,
    one dataset)."""
    if report.best is None or not plan.settings.refit_top or report.tuned.interrupted:
        return False
    if plan.multi:
        print(f"no refit or model: refit and registry are per dataset; for one of them run a "
              f"single-dataset search of the winner, e.g. --dataset {plan.settings.datasets[0]} "
              f"--space {plan.out_dir / 'best_config.yaml'} --num-samples 1", flush=True)
        return False
    return True


def _finish(plan: SearchPlan, parent: ParentRun, report: Report,
            model: handover.Handover | None) -> None:
    """The summary with the refits, the results files on the parent run, the console lines."""
    df, paths = report.tuned.trials, report.paths
    if model is not None:  # the summary gains the refits' section
        paths = results.write(plan.out_dir, df, refits=model.summary(),
                              **_write_args(plan, report.header))
    for path in paths.values():
        parent.mlc.log_artifact(parent.run_id, str(path))
    _print_best(df, report.best, plan.metric, plan.out_dir,
                time.perf_counter() - report.tuned.started, plan.name, plan.slugs)
    if report.study_url:
        print(f"optuna study {plan.name}: optuna-dashboard {_shown_url(report.study_url)}",
              flush=True)
    if report.tuned.interrupted:
        print(f"search {plan.name} stopped before its {plan.settings.num_samples} trials "
              "finished", file=sys.stderr, flush=True)


def _result(plan: SearchPlan, parent: ParentRun, report: Report | None,
            model: handover.Handover | None) -> SearchResult:
    import pandas as pd

    best = report.best if report else None
    return SearchResult(
        name=plan.name, status="interrupted" if parent.exit_code else "finished",
        exit_code=parent.exit_code, metric=plan.metric, mode=plan.mode,
        trials=report.tuned.trials if report else pd.DataFrame(),
        best_trial=None if best is None else str(best["trial_id"]),
        best_value=None if best is None else float(best[plan.metric]),
        results_dir=plan.out_dir, storage_path=plan.experiment_path, mlflow_uri=plan.uri,
        mlflow_run_id=parent.run_id, study_url=report.study_url if report else None,
        model_dir=model.model_dir if model else None)


def _log_best(plan: SearchPlan, parent: ParentRun, df: Any, best: Any) -> None:
    """The best completed trial's metrics on the parent run (step = trials in the table)."""
    if best is None:
        return
    keys = (reports.VAL_ACCURACY, reports.VAL_ACCURACY_SE, reports.VAL_F1,
            reports.TEST_ACCURACY, reports.TEST_F1,
            *(reports.dataset_metric(d, k) for d in plan.slugs
              for k in (reports.VAL_ACCURACY, reports.TEST_ACCURACY)))
    tracking.log_metrics(parent.mlc, parent.run_id,
                         {f"best_{k}": best.get(k) for k in keys if k in best}, step=len(df))
    tracking.set_tags(parent.mlc, parent.run_id, {tracking.BEST_TRIAL_TAG: best["trial_id"]})


def _log_views(plan: SearchPlan, parent: ParentRun, tuned: tuning.Tuned) -> str | None:
    """Export the trials as an Optuna study and log Optuna's figures on the parent run; returns
    the study's storage URL (None when that failed: views never fail a search)."""
    from cbdtune import views

    url = views.study_storage(plan.uri, Path(plan.settings.results_dir))
    try:
        study = views.export_study(tuned.trials, tuned.curves, plan.space, storage=url,
                                   study_name=plan.name, metric=plan.metric, mode=plan.mode)
        views.log_views(parent.mlc, parent.run_id, study)
    except Exception as exc:
        log.warning("optuna study and views not written: %s", first_line(exc))
        tracking.set_tags(parent.mlc, parent.run_id, {tracking.VIEWS_ERROR_TAG: first_line(exc)})
        return None
    tracking.set_tags(parent.mlc, parent.run_id, {tracking.OPTUNA_STORAGE_TAG: _shown_url(url),
                                                  tracking.OPTUNA_STUDY_TAG: plan.name})
    return url


def _shown_url(url: str) -> str:
    """``sqlite:///<abs>`` as ``sqlite:///<path relative to the working directory>`` inside it."""
    path = url[len("sqlite:///"):]
    shown = shown_path(path)
    return f"sqlite:///{shown}" if shown != path else url


def _print_best(df: Any, best: Any, metric: str, out_dir: Path, wall: float, name: str,
                datasets: tuple[str, ...] = ()) -> None:
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    print(f"\nsearch {name}: {len(df)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})"
          f" in {wall:.0f} s; results in {out_dir}")
    if best is None:
        print("no trial completed")
        return
    rows = [("best trial", best["trial_id"])]
    per_dataset = [reports.dataset_metric(d, k) for d in datasets
                   for k in (reports.VAL_ACCURACY, reports.TEST_ACCURACY)]
    for key in dict.fromkeys((metric, reports.VAL_F1, reports.TEST_ACCURACY, reports.TEST_F1,
                              reports.SELECTED_STAGE, *per_dataset)):
        if key in best and best[key] == best[key]:
            value = best[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    rows += [(k, v) for k, v in best.items() if k.startswith("param.")]
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """The command line: its flags as :class:`SearchSettings`, then :func:`run_search`; 0 when
    the search finished, 130 when it was interrupted."""
    settings = SearchSettings.from_args(args)
    return run_search(settings, argv=list(sys.argv[1:] if argv is None else argv)).exit_code


def cli(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a tool
    argv = list(sys.argv[1:] if argv is None else argv)
    return _cli.run(functools.partial(main, argv=argv), parser(), argv)


# The names other modules and tests reach through the search (cbdtune.search.<name>).
__all__ = ["DRIVER_MEMORY", "EXIT_INTERRUPTED", "SAMPLERS", "SCHEDULERS", "CbdtuneError",
           "SearchResult", "SearchSettings", "cli", "encoder_root", "main", "make_searcher",
           "max_reports", "param_space", "parse_duration", "parser", "persisted_trial_states",
           "resume_command", "run_search", "shown_path", "trial_settings"]


if __name__ == "__main__":
    sys.exit(cli())
