"""What a search hands over: its chosen configurations refit on all training series, saved as
one model folder, scored on the test split through the code users load, and registered in MLflow.

``--ensemble select`` (the default) chooses by greedy ensemble selection with replacement
(Caruana et al., ICML 2004) over every completed trial's out-of-fold probabilities
(:mod:`cbdtune.oof`) and a MiniRocket baseline fitted on the same folds
(:mod:`cbdtune.baselines`); ``top`` takes the best ``--refit-top`` configurations with equal
weights. Either way a configuration two trials share is refit once (``--refit-seeds`` seeds),
and the model is the weighted softmax average of the refits (each configuration's weight shared
by its seeds) and of the baseline when it was selected.

:func:`refit_and_register` is the search's last phase. A model version it registers is withdrawn
again (:func:`withdraw_model`) when the search does not finish: a search that was interrupted or
failed leaves no version, whole or half (``--resume`` registers its model when it finishes).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbdtune import tracking
from cbdtune.parent_run import ParentRun, first_line
from cbdtune.plan import SearchPlan, dataset_slug

log = logging.getLogger("cbdtune.search")
REFIT_KEYS = ("cv_accuracy", "cv_se", "test_mean", "test_std", "ensemble_test")


BASELINE = "minirocket"  # the baseline candidate's name in the selection (trial ids are hex)
ROUNDS = 25  # selection rounds (picks) at most; auto-sklearn's default ensemble size is 50
# MiniRocket's features x training series: the paper's 10,000 features at up to 1,000 series;
# beyond, fewer features (at least 1,008 = 84 x 12), so that a 7,494-series dataset costs about
# a minute for 5 folds + refit on 2 cores (cbdtune.baselines' measured cost).
FEATURE_BUDGET = 10_000_000
MIN_KERNELS = 84 * 12


@dataclass(frozen=True)
class Handover:
    """The refit ensemble: what ``results.write`` puts in the summary (:meth:`summary`)."""

    configs: list[dict[str, Any]]  # one row per refit configuration (refit.summarise)
    members: int  # members of the saved model (refits, and the baseline when selected)
    model_dir: Path  # the saved model folder
    registered: tuple[str, Any]  # (registered model name, version)
    ensemble_test_accuracy: float | None = None  # None without a test split
    selection: dict[str, Any] | None = None  # --ensemble select: the selection (_report)

    def summary(self) -> dict[str, Any]:
        """The ``refits`` mapping :func:`cbdtune.results.write` reads."""
        out = {"configs": self.configs, "members": self.members, "model_dir": self.model_dir,
               "registered": self.registered}
        if self.ensemble_test_accuracy is not None:
            out["ensemble_test_accuracy"] = self.ensemble_test_accuracy
        if self.selection is not None:
            out["section"] = selection_markdown(self.selection, self.ensemble_test_accuracy)
        return out


@dataclass(frozen=True)
class Choice:
    """What is refit and how it is weighed.

    ``rows``: the distinct configurations to refit (trial rows, best CV first); ``weights``: the
    model's weight per candidate (trial id, or :data:`BASELINE`), summing to 1; ``cbd_weights``:
    the selection restricted to CBD trials (None under ``top``); ``baseline``: the MiniRocket
    member refit on every training series (None when not a candidate); ``report``: the
    selection's numbers for the summary and the parent run.
    """

    rows: Any  # pandas.DataFrame
    weights: dict[str, float]
    cbd_weights: dict[str, float] | None = None
    baseline: Any | None = None
    report: dict[str, Any] | None = None


def registered_name(plan: SearchPlan) -> str:
    """``cbdtune-<dataset slug>``: the MLflow registered model of a single-dataset search."""
    return f"cbdtune-{dataset_slug(plan.settings.datasets[0], plan.data.name)}"


def n_kernels_for(n_series: int) -> int:
    """MiniRocket's feature count for ``n_series`` training series: :data:`FEATURE_BUDGET`
    over them, in whole 84-kernel groups, between :data:`MIN_KERNELS` and the paper's 10,000
    (a rule by size, the same for every dataset)."""
    from cbdtune.baselines import N_KERNELS

    f = FEATURE_BUDGET // max(1, n_series)
    return int(min(N_KERNELS, max(MIN_KERNELS, 84 * (f // 84))))


def refit_and_register(plan: SearchPlan, parent: ParentRun, ranked: Any,
                       data_ref: Any) -> Handover:
    """Choose the configurations (:func:`choose`), refit each distinct one ``--refit-seeds``
    times, save and register their weighted ensemble.

    The ensemble's test accuracy is :func:`cbdtune.refit.score_saved_model` on the saved folder:
    the number ``cbdtune.predict`` reproduces on the registered version.

    Args:
        plan: a single-dataset search.
        parent: its parent run (the model is logged there; withdrawn unless the search ends).
        ranked: the completed trials' rows, best first (``results.ranked(...)``).
        data_ref: the dataset's object ref.
    """
    from cbdtune import refit, serving
    from cbdtune.tuning import trial_settings

    data, st = plan.data, plan.settings
    choice = choose(plan, ranked)
    trainer_args = trial_settings(st, f"{plan.experiment_path}/refit").trainer_args()
    refits = refit.run(choice.rows, plan.base, data_ref, seeds=st.refit_seeds,
                       trainer_args=trainer_args) if len(choice.rows) else []
    y_test = data.test.y if data.test is not None else None
    configs = refit.summarise(choice.rows, refits, y_test, plan.metric)
    members, weights = _members(choice, refits)
    # A model folder already there is this search's own, from a run that was interrupted
    # before it finished (--resume) or from the search --overwrite replaces.
    only_baseline = all(isinstance(m, serving.BaselineMember) for m in members)
    model_dir = serving.save_model(
        plan.out_dir / "model", members, class_names=data.class_names, dataset=data.name,
        overwrite=st.resume or st.overwrite, weights=weights,  # CBD members' configs say it:
        layout=(data.n_channels, data.seq_len, plan.base.data.length_policy)
        if only_baseline else None)
    accuracy = None
    if data.test is not None:  # test is read once, through the code users load
        accuracy = refit.score_saved_model(model_dir, data.test.x, data.test.y)
    report = _with_cbd_only_test(choice, refits, y_test)
    name = registered_name(plan)
    parent.undo_unless_finished(functools.partial(
        withdraw_model, plan.uri, parent.run_id, name, int(time.time() * 1000)))
    version = serving.log_model(plan.uri, parent.run_id, model_dir, registered_name=name,
                                input_example=data.train.x[:2])
    out = Handover(configs=[c.row() for c in configs], members=len(members),
                   model_dir=model_dir, registered=(name, version),
                   ensemble_test_accuracy=accuracy, selection=report)
    _log(parent, out)
    return out


def choose(plan: SearchPlan, ranked: Any) -> Choice:
    """The configurations to refit: under ``--ensemble top`` the best ``--refit-top`` distinct
    ones with equal weights; under ``select`` the ensemble selection over every completed
    trial's out-of-fold probabilities and a MiniRocket baseline (:func:`select`), falling back
    to ``top`` when no trial kept out-of-fold probabilities."""
    from cbdtune import refit

    rows = refit.distinct(ranked)
    if plan.settings.ensemble == "select":
        chosen = select(plan, rows)
        if chosen is not None:
            return chosen
        log.warning("ensemble selection: no completed trial kept out-of-fold probabilities "
                    "on the search's folds; handing over the top %d instead",
                    plan.settings.refit_top)
    top = rows.head(plan.settings.refit_top)
    ids = [str(t) for t in top["trial_id"]]
    return Choice(rows=top, weights={t: 1.0 / len(ids) for t in ids})


def select(plan: SearchPlan, rows: Any) -> Choice | None:
    """Greedy ensemble selection with replacement (Caruana et al., ICML 2004, Section 2;
    :func:`cbdtune.ensemble.select`, :data:`ROUNDS` rounds) over the out-of-fold probabilities
    of the distinct completed trials ``rows`` and of a MiniRocket baseline fitted on the same
    folds; and the same selection restricted to the CBD trials. None when no trial has
    out-of-fold probabilities on the search's folds."""
    from cbdtune import ensemble

    candidates, y, folds = _candidates(plan, rows)
    if not candidates:
        return None
    singles = {n: (ensemble.accuracy(p, y), ensemble.log_loss(p, y))
               for n, p in candidates.items()}
    baseline = None
    if folds is not None:
        oof_base, baseline = _baseline(plan, folds)
        candidates[BASELINE] = oof_base.proba
        singles[BASELINE] = (ensemble.accuracy(oof_base.proba, y),
                             ensemble.log_loss(oof_base.proba, y))
    full = ensemble.select(candidates, y, rounds=ROUNDS)
    cbd = ensemble.select(ensemble.restrict(candidates, lambda n: n != BASELINE), y,
                          rounds=ROUNDS)
    needed = set(full.weights) | set(cbd.weights)
    chosen = rows[[str(t) in needed for t in rows["trial_id"]]]
    report = {"candidates": len(candidates), "baseline": BASELINE if baseline else None,
              "n_kernels": baseline.n_kernels if baseline else None, "rounds": ROUNDS,
              "n_series": len(y), "singles": singles,
              "full": _selection_row(full), "cbd_only": _selection_row(cbd)}
    return Choice(rows=chosen, weights=dict(full.weights), cbd_weights=dict(cbd.weights),
                  baseline=baseline if BASELINE in full.weights else None, report=report)


def _selection_row(sel: Any) -> dict[str, Any]:
    return {"weights": dict(sel.weights), "counts": dict(sel.counts), "n_rounds": sel.n_rounds,
            "oof_accuracy": sel.accuracy, "oof_log_loss": sel.log_loss}


def _candidates(plan: SearchPlan, rows: Any) -> tuple[dict[str, Any], Any, Any]:
    """``({trial id: out-of-fold probabilities}, labels, the search's folds or None)``: the
    records of ``rows`` whose folds are the search's (:mod:`cbdtune.oof`). The folds are
    returned when they cover every training series (cross-validation: the baseline can be
    fitted on them), else None (one validation split)."""
    import numpy as np

    from cbdtune import oof
    from cbdtune.classify import selection_pool

    pool = selection_pool(plan.data, plan.base)
    fold = oof.fold_assignment(pool.folds, len(pool.y))
    want = oof.digest(fold)
    records = oof.read_all(oof.folder(plan.experiment_path), [str(t) for t in rows["trial_id"]])
    out, index = {}, None
    for trial_id, rec in records.items():
        if rec.meta.get("folds_digest") != want or rec.proba.shape[1] != plan.data.n_classes:
            log.warning("trial %s: its out-of-fold probabilities are on other folds; not a "
                        "candidate of the ensemble selection", trial_id)
            continue
        index = rec.index if index is None else index
        if np.array_equal(rec.index, index):
            out[trial_id] = rec.proba
    if index is None:
        return {}, None, None
    covered = not pool.holdout and len(index) == len(pool.y)
    return out, pool.y[index], pool.folds if covered else None


def _baseline(plan: SearchPlan, folds: Any) -> tuple[Any, Any]:
    """MiniRocket + ridge on the search's folds, then refit on every training series
    (:func:`cbdtune.baselines.minirocket_baseline`, :func:`n_kernels_for` features)."""
    from cbdtune import baselines

    data = plan.data
    n_kernels = n_kernels_for(len(data.train.y))
    t0 = time.perf_counter()
    out = baselines.minirocket_baseline(data.train.x, data.train.y, folds, data.n_classes,
                                        seed=plan.base.train.seed, n_kernels=n_kernels)
    log.info("MiniRocket baseline (%d kernels) on the search's %d folds: out-of-fold accuracy "
             "%.4f (%.0f s)", n_kernels, len(folds),
             float((out[0].proba.argmax(1) == data.train.y).mean()), time.perf_counter() - t0)
    return out


def _members(choice: Choice, refits: list[Any]) -> tuple[list[Any], list[float]]:
    """The model's members and weights: each selected configuration's weight shared equally
    by its refits (seeds), and the baseline's."""
    from cbdtune.config import ExperimentConfig
    from cbdtune.serving import BaselineMember

    members: list[Any] = []
    weights: list[float] = []
    for r in refits:
        w = choice.weights.get(r.trial_id, 0.0)
        if w <= 0:  # refit for the CBD-only selection alone
            continue
        seeds = sum(1 for o in refits if o.trial_id == r.trial_id)
        members.append((ExperimentConfig.from_dict(r.config, where="refit"), r.weights,
                        {"rank": r.rank, "source_trial": r.trial_id, "seed": r.seed}))
        weights.append(w / seeds)
    if choice.baseline is not None:
        members.append(BaselineMember(choice.baseline, {"kind": BASELINE}))
        weights.append(choice.weights[BASELINE])
    total = sum(weights)
    return members, [w / total for w in weights]  # exact sum 1 against float rounding


def _with_cbd_only_test(choice: Choice, refits: list[Any],
                        y_test: Any) -> dict[str, Any] | None:
    """The selection's report with the CBD-only ensemble's test accuracy, from the refits'
    test probabilities (each configuration's seeds averaged, then weighted): no refit more."""
    import numpy as np

    if choice.report is None or choice.cbd_weights is None:
        return choice.report
    report = dict(choice.report)
    if y_test is not None:
        per_config = {t: np.mean([r.test_proba for r in refits if r.trial_id == t], axis=0)
                      for t in choice.cbd_weights}
        proba = sum(w * per_config[t] for t, w in choice.cbd_weights.items())
        report["cbd_only"] = {**report["cbd_only"],
                              "test_accuracy": float(np.mean(np.argmax(proba, 1) == y_test))}
    return report


def selection_markdown(report: dict[str, Any], test: float | None) -> str:
    """The summary's section on the selected ensemble: members, weights, kinds, the out-of-fold
    estimates, and the test accuracy of the model and of the CBD-only selection."""
    def pct(v: Any) -> str:
        return "n/a" if v is None or v != v else f"{100 * float(v):.2f}"

    full, cbd = report["full"], report["cbd_only"]
    base = (f" and a MiniRocket baseline ({report['n_kernels']} kernels, ridge readout, the "
            "same folds)" if report.get("baseline") else "")
    lines = ["", "## Ensemble selection", "",
             f"Greedy forward selection with replacement (Caruana et al., ICML 2004) on the "
             f"out-of-fold probabilities of {report['candidates'] - bool(report['baseline'])} "
             f"distinct completed trials{base}, over {report['n_series']} training series, at "
             f"most {report['rounds']} rounds; a member's weight is its share of the picks.", "",
             "| member | kind | weight | weight (CBD only) | its own OOF accuracy |",
             "|---|---|---|---|---|"]
    for name in sorted(set(full["weights"]) | set(cbd["weights"]),
                       key=lambda n: -full["weights"].get(n, 0.0)):
        kind = "baseline (MiniRocket)" if name == report.get("baseline") else "CBD"
        lines.append(f"| `{name}` | {kind} | {full['weights'].get(name, 0.0):.3f} | "
                     f"{cbd['weights'].get(name, 0.0):.3f} | "
                     f"{pct(report['singles'][name][0])} |")
    lines += ["", "| ensemble | OOF accuracy | OOF log-loss | test accuracy |", "|---|---|---|---|",
              f"| selected (the registered model) | {pct(full['oof_accuracy'])} | "
              f"{full['oof_log_loss']:.4f} | {pct(test)} |",
              f"| CBD members only | {pct(cbd['oof_accuracy'])} | {cbd['oof_log_loss']:.4f} | "
              f"{pct(cbd.get('test_accuracy'))} |", "",
              "The model's test accuracy is read once, through the code `cbdtune.predict` runs; "
              "the CBD-only one from the same refits' test probabilities.", ""]
    return "\n".join(lines)


def _log(parent: ParentRun, out: Handover) -> None:
    """The refits' numbers, the selection and the registered version on the parent run."""
    metrics: dict[str, Any] = {"ensemble_test_accuracy": out.ensemble_test_accuracy}
    for c in out.configs:
        for key in REFIT_KEYS:
            metrics[f"refit.{c['rank']}.{key}"] = c[key]
    sel = out.selection
    if sel is not None:
        for part in ("full", "cbd_only"):
            for key in ("oof_accuracy", "oof_log_loss", "test_accuracy"):
                metrics[f"ensemble.{part}.{key}"] = sel[part].get(key)
            for name, w in sel[part]["weights"].items():
                metrics[f"ensemble.{part}.weight.{name}"] = w
        parent.mlc.log_dict(parent.run_id, {**sel, "model_test_accuracy":
                                            out.ensemble_test_accuracy}, "ensemble.json")
    tracking.log_metrics(parent.mlc, parent.run_id,
                         {k: v for k, v in metrics.items() if v is not None}, step=0)
    name, version = out.registered
    tracking.set_tags(parent.mlc, parent.run_id, {tracking.MODEL_TAG: f"models:/{name}/{version}"})


def withdraw_model(uri: str, run_id: str, name: str, since: int) -> None:
    """Delete the versions of ``name`` that ``run_id`` registered from ``since`` (ms since the
    epoch) on, and the registered model itself when it was created then and no version is left.
    Never raises: MLflow failing must not hide why the search ended."""
    try:
        from mlflow.tracking import MlflowClient

        mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for v in mlc.search_model_versions(f"name = '{name}'"):
            if v.creation_timestamp >= since and v.run_id in (run_id, None, ""):
                mlc.delete_model_version(name, v.version)
                log.warning("model %s version %s withdrawn: the search did not finish", name,
                            v.version)
        model = mlc.get_registered_model(name)
        if model.creation_timestamp >= since and not mlc.search_model_versions(
                f"name = '{name}'"):
            mlc.delete_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        log.warning("registered model %s not checked for versions of this search: %s", name,
                    first_line(exc))
