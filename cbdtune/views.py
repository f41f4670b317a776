"""Search-level views: the finished search as an Optuna study, and Optuna's figures of it.

The search's trials are exported to an Optuna study in RDB storage (sqlite, next to the MLflow
store), so ``optuna-dashboard sqlite:///optuna.db`` and any Optuna analysis can read them, and
Optuna's matplotlib figures (``optuna.visualization.matplotlib``: parallel coordinates,
optimisation history, parameter importances, intermediate values) go to the parent MLflow run.

The export mirrors ``trials.parquet``: a completed trial is COMPLETE with its final value, one
ASHA (or the time budget) stopped is PRUNED with its intermediate values, an error or a diverged
trial is FAIL; unfinished trials are left out. A searched parameter a trial did not sample (NaN
in ``param.<key>``; the space is conditional) is not among that trial's params.

The search-level figures (parallel coordinates, optimisation history, parameter importances)
are drawn only from at least :data:`cbdtune.results.MIN_COMPLETED` completed trials, the rule
``summary.md`` follows; the importance figure shows ``summary.md``'s numbers
(:func:`cbdtune.results.importances`, kept on the study as :data:`IMPORTANCES_ATTR`), not a
second fANOVA fit. The intermediate values (each trial's reports) are drawn from any trials.

References:
    Optuna 5, ``optuna.trial.create_trial`` and ``optuna.visualization.matplotlib``.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from cbdtune.figures import close  # also selects matplotlib's headless backend, first
from cbdtune.results import MIN_COMPLETED, importances
from cbdtune.space import SearchSpace

log = logging.getLogger("cbdtune.views")

STUDY_FILE = "optuna.db"
_STATES = {"completed": "COMPLETE", "stopped": "PRUNED", "error": "FAIL", "diverged": "FAIL"}
# Artifact name -> the optuna.visualization.matplotlib function drawing it.
VIEWS = {"parallel_coordinate.png": "plot_parallel_coordinate",
         "optimization_history.png": "plot_optimization_history",
         "param_importances.png": "plot_param_importances",
         "intermediate_values.png": "plot_intermediate_values"}
# The views that describe the search as a whole: only from MIN_COMPLETED completed trials.
SEARCH_LEVEL = ("parallel_coordinate.png", "optimization_history.png", "param_importances.png")
# The study's user attribute holding summary.md's importances ({param: value}, or the reason
# there are none).
IMPORTANCES_ATTR = "cbdtune.importances"


def study_storage(tracking_uri: str, results_dir: Path) -> str:
    """``sqlite:///<folder of mlflow.db>/optuna.db``, or ``<results_dir>/optuna.db`` when the
    tracking store is not a sqlite file (a server, a database)."""
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).expanduser().parent
    else:
        folder = Path(results_dir)
    return f"sqlite:///{(folder / STUDY_FILE).absolute()}"


def export_study(df: pd.DataFrame, curves: dict[str, dict[int, float]], space: SearchSpace, *,
                 storage: str, study_name: str, metric: str, mode: str) -> Any:
    """Write the search's trials to a fresh Optuna study ``study_name`` in ``storage``.

    A study of that name is replaced: the export always matches the search's trial table (a
    ``--resume`` or an ``--overwrite`` writes it again).

    Args:
        df: :func:`cbdtune.results.trials_frame` of the search.
        curves: per trial id, ``{training_iteration: metric value}`` of every report.
        space: the search space (its Optuna distributions).
        storage: an Optuna RDB URL, e.g. from :func:`study_storage`.
        study_name: the search's name.
        metric: the selection metric (the study's value).
        mode: ``max`` or ``min``.

    Returns:
        The ``optuna.Study``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if study_name in optuna.get_all_study_names(storage=storage):
        optuna.delete_study(study_name=study_name, storage=storage)
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                direction="maximize" if mode == "max" else "minimize")
    dists = space.to_optuna()
    for _, row in df.iterrows():
        trial = frozen_trial(row, curves.get(row["trial_id"], {}), dists, metric)
        if trial is not None:
            study.add_trial(trial)
    study.set_user_attr(IMPORTANCES_ATTR, importances(df, space, metric, mode))
    return study


def frozen_trial(row: pd.Series, curve: dict[int, float], dists: dict[str, Any],
                 metric: str) -> Any:
    """One row of the trial table as an Optuna ``FrozenTrial``; None for an unfinished trial."""
    import optuna
    from optuna.trial import TrialState

    state = _STATES.get(row.get("status"))
    if state is None:
        return None
    params = {k: _native(row[f"param.{k}"], d) for k, d in dists.items()
              if f"param.{k}" in row and not _missing(row[f"param.{k}"])}
    value = row.get(metric)
    if state == "COMPLETE" and not _finite(value):
        state = "FAIL"  # a completed trial without the metric cannot be ranked
    return optuna.trial.create_trial(
        state=TrialState[state], value=float(value) if state == "COMPLETE" else None,
        params=params, distributions={k: dists[k] for k in params},
        intermediate_values={int(k): float(v) for k, v in curve.items() if _finite(v)},
        user_attrs={"trial_id": str(row["trial_id"]), "status": str(row["status"])})


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _native(value: Any, dist: Any) -> Any:
    """A parquet cell as the distribution expects it (an int column with gaps reads as float)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    value = value.item() if hasattr(value, "item") else value
    if isinstance(dist, IntDistribution):
        return int(value)
    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if c == value and type(c) is type(value)), value)
    return float(value)


def draw(study: Any) -> dict[str, Any]:
    """Optuna's four figures of ``study`` (artifact name -> Figure); a view Optuna cannot draw
    (too few trials, no parameter that varies) is left out, with a debug log line, and so are
    the search-level views when fewer than :data:`MIN_COMPLETED` trials completed."""
    import optuna
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no completed trials" is not news here
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    out: dict[str, Any] = {}
    for name, fn in VIEWS.items():
        if name in SEARCH_LEVEL and completed < MIN_COMPLETED:
            log.debug("view %s not drawn: %d completed trials, needs %d", name, completed,
                      MIN_COMPLETED)
            continue
        if name == "param_importances.png" and IMPORTANCES_ATTR in study.user_attrs:
            imp = study.user_attrs[IMPORTANCES_ATTR]
            if isinstance(imp, dict) and imp:
                out[name] = importance_figure(imp)
            else:
                log.debug("view %s not drawn: %s", name, imp)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning, empty-plot warnings
                ax = getattr(ovm, fn)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.debug("view %s not drawn: %s", name, exc)
            continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        out[name] = first.figure
    return out


def importance_figure(imp: dict[str, float]) -> Any:
    """A horizontal bar per parameter, the most important on top: ``summary.md``'s table."""
    import matplotlib.pyplot as plt

    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.35 * len(names)))
    ax.barh(names, [imp[k] for k in names])
    ax.set_xlabel("fANOVA importance (within a parameter's branch; summary.md)")
    ax.set_title("Parameter importances")
    return fig


def log_views(mlflow_client: Any, run_id: str, study: Any, *, folder: str = "views") -> list[str]:
    """Draw :func:`draw`'s figures and log each as ``<folder>/<name>`` on the run."""
    logged = []
    for name, fig in draw(study).items():
        try:
            fig.tight_layout()
            mlflow_client.log_figure(run_id, fig, f"{folder}/{name}")
            logged.append(f"{folder}/{name}")
        finally:
            close(fig)
    return logged
