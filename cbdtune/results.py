"""What a finished search leaves behind: ``trials.parquet``, ``best_config.yaml``, ``summary.md``.

Parameter importance uses Optuna's evaluators on the finished trials (fANOVA, Hutter et al., ICML
2014; the default of ``optuna.importance.get_param_importances``).

Every file is written atomically (:func:`atomic_write_bytes`): a crash or Ctrl-C while writing
leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from cbdtune import reports
from cbdtune.config import CbdtuneError, ExperimentConfig
from cbdtune.space import SearchSpace

# Completed trials a search-level statistic needs: parameter importances, the Spearman rho
# between CV and test, and the search-level figures on the parent run (cbdtune.views). One
# rule for summary.md and MLflow.
MIN_COMPLETED = 3

# Columns copied from each trial's last result (when present): the pipeline's final report
# (cbdtune.reports) and Tune's count and time.
RESULT_COLUMNS = (reports.VAL_ACCURACY, reports.VAL_ACCURACY_SE, reports.VAL_F1, reports.VAL_LOSS,
                  reports.CV_FOLDS, reports.TEST_ACCURACY, reports.TEST_F1,
                  reports.SELECTED_STAGE, reports.SELECTED_EPOCH,
                  *(reports.stage_metric(stage) for stage in reports.STAGES),
                  reports.ITERATION, reports.TIME_TOTAL_S, reports.REASON,
                  reports.ENCODER_REUSED, reports.ENCODER_KEY, reports.ENCODER_SOURCE)


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial: ``trial_id``, ``status``, ``param.<key>``, metrics, time."""
    df = pd.DataFrame(rows)
    if "trial_id" in df:
        df = df.sort_values("trial_id").reset_index(drop=True)
    return df


def trial_row(trial_id: str, params: dict[str, Any], last: dict[str, Any] | None, status: str,
              reason: str, datasets: tuple[str, ...] = ()) -> dict[str, Any]:
    """A trial's row; a multi-dataset search's ``datasets`` (slugs) add each one's
    ``<slug>.<key>`` columns (:data:`cbdtune.reports.PER_DATASET`)."""
    last = last or {}
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, reports.REASON: reason}
    row.update({f"param.{k}": v for k, v in params.items()})
    per_dataset = [reports.dataset_metric(s, k) for s in datasets for k in reports.PER_DATASET]
    for col in (*RESULT_COLUMNS, *per_dataset):
        if col in last and col != reports.REASON:
            row[col] = last[col]
    return row


def ranked(df: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Completed trials, best first: by ``metric``, ties broken by the lower ``val_loss``."""
    loss = reports.VAL_LOSS
    done = df[df["status"] == "completed"] if "status" in df else df.iloc[0:0]
    if done.empty or metric not in done:
        return done.iloc[0:0]
    keys = [metric] + ([loss] if loss in done and metric != loss else [])
    return done.sort_values(keys, ascending=[mode == "min"] + [True] * (len(keys) - 1),
                            kind="stable")


def best_trial(df: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best *completed* trial (it has a test score read by its own refit)."""
    order = ranked(df, metric, mode)
    return None if order.empty else order.iloc[0]


def importances(df: pd.DataFrame, space: SearchSpace, metric: str, mode: str,
                seed: int = 0) -> dict[str, float] | str:
    """fANOVA importances over completed trials, or the reason they cannot be computed.

    A conditional parameter (``when`` in the space) is NaN in the trials that skipped it. Ranked
    are the parameters sampled, with more than one value, in at least :data:`MIN_COMPLETED`
    (3) completed trials with a
    finite metric; each gets its fANOVA share of the variance over the trials that sampled it.
    Parameters sampled in every trial (the switches a ``when`` reads included) share one fit
    over all of them: Optuna's own rule, ``get_param_importances`` ranks the parameters every
    trial holds. Parameters sampled in the same subset of trials share a fit on that subset,
    with every parameter those trials hold as inputs. A conditional parameter's value is thus
    its share within its branch (the values need not sum to 1); a parameter never sampled, in
    fewer than 3 trials, or in a branch whose fit fails (no variance there) has no entry.
    """
    import optuna

    dists = space.to_optuna()
    done = df[df["status"] == "completed"] if "status" in df else df.iloc[0:0]
    values = (pd.to_numeric(done[metric], errors="coerce") if metric in done
              else pd.Series(math.nan, index=done.index))
    finite = done[values.abs() < math.inf]  # NaN and inf compare False
    present = {k: finite[f"param.{k}"].notna() for k in dists if f"param.{k}" in finite}
    kept = [k for k, has in present.items()
            if has.sum() >= MIN_COMPLETED and finite.loc[has, f"param.{k}"].nunique() > 1]
    if len(done) < MIN_COMPLETED or not kept:
        return (f"needs at least {MIN_COMPLETED} completed trials with varied parameters "
                f"(have {len(done)})")
    if finite[metric].nunique() == 1:
        # fANOVA divides by the variance of the metric; with none there is nothing to attribute
        return (f"every completed trial has {metric} = {float(finite[metric].iloc[0]):.4f}, so "
                "there is no variance to attribute")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    branches: dict[tuple[bool, ...], list[str]] = {}
    for k in kept:  # one fit per subset of trials (the all-trials one first, when there is one)
        branches.setdefault(tuple(present[k]), []).append(k)
    out: dict[str, float] = {}
    errors: list[str] = []
    for mask, ranked_here in sorted(branches.items(), key=lambda b: -sum(b[0])):
        rows = finite[list(mask)]
        inputs = {k: dists[k] for k in kept if present[k][rows.index].all()}
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for _, row in rows.iterrows():
            params = {k: int(row[f"param.{k}"]) if isinstance(d, optuna.distributions.IntDistribution)
                      else _native(row[f"param.{k}"]) for k, d in inputs.items()}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=inputs,
                                                      value=float(row[metric])))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (RuntimeError, ValueError) as err:  # e.g. "zero total variance in all trees"
            errors.append(f"fANOVA failed on {len(rows)} trials: {err}")
            continue
        out.update({k: float(imp[k]) for k in ranked_here})
    if not out:
        return errors[0]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def trial_params(row: pd.Series) -> dict[str, Any]:
    """The searched values of one trial row, as plain Python (a param its trial did not sample,
    NaN in the table, is left out: the trial kept the base config's value)."""
    return {k[len("param."):]: _native(v) for k, v in row.items()
            if k.startswith("param.") and not _isnan(v)}


def _native(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def write(out_dir: Path, df: pd.DataFrame, space: SearchSpace, base: ExperimentConfig, *,
          metric: str, mode: str, command: str, header: dict[str, Any],
          refits: dict[str, Any] | None = None, datasets: tuple[str, ...] = (),
          objectives: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the three result files, each atomically; returns their paths. ``objectives``
    (``{metric: mode}``, two of them) adds the Pareto front to the summary.

    Every file's content is rendered before the first one is replaced, so an error while
    rendering (fANOVA, a bad best config) leaves the folder as it was. A ``best_config.yaml``
    left from an earlier search of this name is removed when no trial completed: it would
    describe trials that are not in ``trials.parquet``.
    """
    best = best_trial(df, metric, mode)
    imp = importances(df, space, metric, mode)
    content = {"trials.parquet": df.to_parquet(index=False),
               "summary.md": (_summary(df, best, imp, metric, mode, command, header)
                              + (dataset_section(df, datasets, metric, mode)
                                 if len(datasets) > 1 else "")
                              + (pareto_section(df, objectives)
                                 if objectives and len(objectives) > 1 else "")
                              + selection_section(df, metric)
                              + (refit_section(refits) if refits else "")).encode()}
    if best is not None:
        params = trial_params(best)
        content["best_config.yaml"] = (
            f"# best trial {best['trial_id']}: {metric}={best[metric]:.4f}\n"
            + base.replace(params, where="best trial").to_yaml()).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in content.items():
        atomic_write_bytes(out_dir / name, data)
    if best is None:
        (out_dir / "best_config.yaml").unlink(missing_ok=True)
    keys = {"trials.parquet": "trials", "summary.md": "summary", "best_config.yaml": "best_config"}
    return {keys[name]: out_dir / name for name in content}


def per_dataset_table(df: pd.DataFrame, datasets: tuple[str, ...], metric: str,
                      mode: str) -> pd.DataFrame:
    """Per dataset: the winner's (best aggregate ``metric``) CV accuracy ± se and test accuracy
    against that dataset's own best trial (best ``<slug>.<metric>`` among the trials that ran it
    to the end, whatever the other datasets did). Empty when no trial completed."""
    winner = best_trial(df, metric, mode)
    if winner is None:
        return pd.DataFrame()
    rows = []
    for slug in datasets:
        def get(row: pd.Series, key: str, slug: str = slug) -> Any:
            return row.get(reports.dataset_metric(slug, key), math.nan)

        diverged, value = (reports.dataset_metric(slug, k) for k in (reports.DIVERGED, metric))
        ran = df[df[diverged] == 0] if diverged in df and value in df else df.iloc[0:0]
        own = (ran.sort_values(value, ascending=mode == "min", kind="stable").iloc[0]
               if not ran.empty else winner)
        rows.append({"dataset": slug, "winner_cv": get(winner, reports.VAL_ACCURACY),
                     "winner_cv_se": get(winner, reports.VAL_ACCURACY_SE),
                     "winner_test": get(winner, reports.TEST_ACCURACY),
                     "own_best_trial": own["trial_id"],
                     "own_best_cv": get(own, reports.VAL_ACCURACY),
                     "own_best_cv_se": get(own, reports.VAL_ACCURACY_SE),
                     "own_best_test": get(own, reports.TEST_ACCURACY)})
    return pd.DataFrame(rows)


def mean_ranks(df: pd.DataFrame, datasets: tuple[str, ...], metric: str,
               mode: str) -> pd.DataFrame:
    """The completed trials, best aggregate first, with each dataset's rank of the trial among
    them (1 = best ``<slug>.<metric>``, ties share the better rank) and their mean: a check that
    no dataset dominates the aggregate."""
    done = ranked(df, metric, mode)
    out = done[["trial_id", metric]].copy()
    for slug in datasets:
        col = reports.dataset_metric(slug, metric)
        out[f"rank.{slug}"] = (done[col].rank(ascending=mode == "min", method="min")
                               if col in done else math.nan)
    out["mean_rank"] = out[[f"rank.{s}" for s in datasets]].mean(axis=1)
    return out.reset_index(drop=True)


def dataset_section(df: pd.DataFrame, datasets: tuple[str, ...], metric: str, mode: str) -> str:
    """The summary's "Per dataset" section of a multi-dataset search."""
    table = per_dataset_table(df, datasets, metric, mode)
    if table.empty:
        return "\n## Per dataset\n\nno trial completed on every dataset\n"
    lines = ["", "## Per dataset", "",
             f"The winner (best mean {metric} over the datasets) against each dataset's own best "
             "trial: CV accuracy (mean ± standard error over folds) and test accuracy (read once "
             "by the trial's own refit, never used to select).", "",
             "| dataset | winner CV | winner test | own best trial | own best CV | own best test |",
             "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.dataset} | {_pct(r.winner_cv)} ± {_pct(r.winner_cv_se)} | "
                     f"{_pct(r.winner_test)} | `{r.own_best_trial}` | {_pct(r.own_best_cv)} ± "
                     f"{_pct(r.own_best_cv_se)} | {_pct(r.own_best_test)} |")
    ranks = mean_ranks(df, datasets, metric, mode).head(10)
    lines += ["", f"Each completed trial's rank on each dataset (by its {metric} there) and the "
                  "mean rank; the aggregate is the mean of the datasets' estimates, a fixed "
                  "value per trial.", "", _markdown(ranks)]
    return "\n".join(lines) + "\n"


def pareto_front(df: pd.DataFrame, objectives: dict[str, str]) -> pd.DataFrame:
    """The completed trials no other completed trial beats on every objective
    (``{metric: "max" | "min"}``), as Optuna's ``Study.best_trials`` finds them; best first by
    the first objective."""
    import optuna

    done = df[df["status"] == "completed"] if "status" in df else df.iloc[0:0]
    if done.empty or not all(m in done for m in objectives):
        return done.iloc[0:0]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as views.py: no "study created"
    done = done.dropna(subset=list(objectives))
    done = done[done[list(objectives)].apply(lambda c: c.map(math.isfinite)).all(axis=1)]
    study = optuna.create_study(
        directions=["minimize" if d == "min" else "maximize" for d in objectives.values()])
    for i, row in enumerate(done[list(objectives)].itertuples(index=False)):
        study.add_trial(optuna.trial.create_trial(values=[float(v) for v in row],
                                                  user_attrs={"row": i}))
    front = done.iloc[sorted(t.user_attrs["row"] for t in study.best_trials)]
    first, mode = next(iter(objectives.items()))
    return front.sort_values(first, ascending=mode == "min", kind="stable")


def pareto_section(df: pd.DataFrame, objectives: dict[str, str]) -> str:
    """The Pareto front of a two-objective search: trial and both values."""
    front = pareto_front(df, objectives)
    names = ", ".join(f"{m} ({d})" for m, d in objectives.items())
    lines = ["", f"## Pareto front ({names})", ""]
    if front.empty:
        return "\n".join([*lines, "no completed trial has both values."]) + "\n"
    lines.append(_markdown(front[["trial_id", *objectives]]))
    return "\n".join(lines) + "\n"


def selection_section(df: pd.DataFrame, metric: str) -> str:
    """Does the selection metric rank trials as the test split does? Spearman's rho over the
    completed trials (each trial's test accuracy is its own refit's, read once, never used)."""
    done = df[df["status"] == "completed"] if "status" in df else df.iloc[0:0]
    if len(done) < MIN_COMPLETED or metric not in done or reports.TEST_ACCURACY not in done:
        return ""
    from scipy.stats import spearmanr

    rho, p = spearmanr(done[metric], done[reports.TEST_ACCURACY])
    lines = ["", "## Selection against test", "",
             f"Spearman correlation between {metric} and test accuracy over the {len(done)} "
             f"completed trials: {rho:.3f} (p = {p:.3g})."]
    return "\n".join(lines) + "\n"


def refit_section(refits: dict[str, Any]) -> str:
    """The summary's table of refit configurations and the ensemble's test accuracy."""
    lines = ["", "## Refit on every training series, tested once", "",
             "Each configuration's CV estimate (mean ± standard error over folds), the test "
             "accuracy of its refits (mean ± std over seeds) and of their softmax average.", "",
             "| rank | trial | stage | epochs | CV accuracy | refit test (mean ± std) | refits "
             "| ensemble test |", "|---|---|---|---|---|---|---|---|"]
    for c in refits["configs"]:
        lines.append(f"| {c['rank']} | `{c['trial_id']}` | {c['stage']} | {c['epochs']} | "
                     f"{_pct(c['cv_accuracy'])} ± {_pct(c['cv_se'])} | "
                     f"{_pct(c['test_mean'])} ± {_pct(c['test_std'])} | {c['refits']} | "
                     f"{_pct(c['ensemble_test'])} |")
    lines.append("")
    if "ensemble_test_accuracy" in refits:
        lines.append(f"**The model** (the ensemble of all {refits['members']} refits): test "
                     f"accuracy {_pct(refits['ensemble_test_accuracy'])}.")
    if "registered" in refits:
        name, version = refits["registered"]
        lines.append(f"Registered in MLflow as `models:/{name}/{version}`; predict with "
                     f"`python -m cbdtune.predict --model models:/{name}/{version} --input FILE`.")
    lines.append(refits.get("section", ""))  # the ensemble selection (cbdtune.handover)
    return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "n/a" if v is None or _isnan(v) else f"{100 * float(v):.2f}"


# ---- atomic files -------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader or a crash sees the old file or the new one.

    The bytes go to a hidden temporary file in the same folder (``os.replace`` is atomic only
    within one filesystem), are flushed to disk, then renamed over ``path``. On any error the
    temporary file is removed and ``path`` is untouched.

    Args:
        path: the file to create or replace; its folder must exist.
        data: the complete new content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # 0o666 through the umask, as open() would give; mkstemp's 0o600 would outlive the rename.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_results_dir(path: Path) -> None:
    """Fail before Ray starts when results could not be written under ``path``.

    Nothing is created: the nearest existing folder on the way to ``path`` must be a folder and
    must accept a new file (probed with a temporary file, which also catches a read-only mount).

    Raises:
        CbdtuneError: ``path`` or a parent is a file, or the folder is not writable.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"{existing} is a file"
        raise CbdtuneError(f"--results-dir {path}: {what}, not a folder; pass a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise CbdtuneError(f"--results-dir {path}: cannot write in {existing} "
                           f"({exc.strerror or exc}); pass a writable folder") from None


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _summary(df: pd.DataFrame, best: pd.Series | None, imp: dict[str, float] | str, metric: str,
             mode: str, command: str, header: dict[str, Any]) -> str:
    lines, test = ["# Search summary", "", "```", command, "```", ""], reports.TEST_ACCURACY
    lines += [f"- {k}: {v}" for k, v in header.items()]
    counts = df["status"].value_counts().to_dict() if "status" in df else {}
    lines += [f"- trials: {len(df)} ({', '.join(f'{n} {s}' for s, n in counts.items())})", ""]
    if best is not None:
        lines += ["## Best trial (selected on validation; test read once)", "",
                  f"trial `{best['trial_id']}`: {metric} = {best[metric]:.4f}"
                  + (f", {test} = {best[test]:.4f}"
                     if test in best and not _isnan(best[test]) else ""),
                  ""]
    cols = ["trial_id", "status", metric, test, reports.TIME_TOTAL_S]
    cols += [c for c in df.columns if c.startswith("param.")]
    shown = df[[c for c in dict.fromkeys(cols) if c in df]]
    if metric in shown:
        shown = shown.sort_values(metric, ascending=(mode == "min"), na_position="last")
    lines += ["## Top trials", "", _markdown(shown.head(10)), ""]
    lines += ["## Parameter importance (fANOVA, optuna.importance)", ""]
    if isinstance(imp, str):
        lines.append(f"not computed: {imp}")
    else:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in imp.items()]
    return "\n".join(lines) + "\n"


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])
