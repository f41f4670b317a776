"""What a search hands over: its best configurations refit on all training series, saved as one
model folder, scored on the test split through the code users load, and registered in MLflow.

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
from cbdtune.config import ExperimentConfig
from cbdtune.parent_run import ParentRun, first_line
from cbdtune.plan import SearchPlan, dataset_slug

log = logging.getLogger("cbdtune.search")
REFIT_KEYS = ("cv_accuracy", "cv_se", "test_mean", "test_std", "ensemble_test")


@dataclass(frozen=True)
class Handover:
    """The refit ensemble: what ``results.write`` puts in the summary (:meth:`summary`)."""

    configs: list[dict[str, Any]]  # one row per refit configuration (refit.summarise)
    members: int  # refits in the ensemble
    model_dir: Path  # the saved model folder
    registered: tuple[str, Any]  # (registered model name, version)
    ensemble_test_accuracy: float | None = None  # None without a test split

    def summary(self) -> dict[str, Any]:
        """The ``refits`` mapping :func:`cbdtune.results.write` reads."""
        out = {"configs": self.configs, "members": self.members, "model_dir": self.model_dir,
               "registered": self.registered}
        if self.ensemble_test_accuracy is not None:
            out["ensemble_test_accuracy"] = self.ensemble_test_accuracy
        return out


def registered_name(plan: SearchPlan) -> str:
    """``cbdtune-<dataset slug>``: the MLflow registered model of a single-dataset search."""
    return f"cbdtune-{dataset_slug(plan.settings.datasets[0], plan.data.name)}"


def refit_and_register(plan: SearchPlan, parent: ParentRun, top: Any,
                       data_ref: Any) -> Handover:
    """Refit the top configurations, save and register their ensemble.

    The ensemble's test accuracy is :func:`cbdtune.refit.score_saved_model` on the saved folder:
    the number ``cbdtune.predict`` reproduces on the registered version.

    Args:
        plan: a single-dataset search.
        parent: its parent run (the model is logged there; withdrawn unless the search ends).
        top: the best trials' rows, best first (``results.ranked(...).head(n)``).
        data_ref: the dataset's object ref.
    """
    from cbdtune import refit, serving
    from cbdtune.tuning import trial_settings

    data, st = plan.data, plan.settings
    trainer_args = trial_settings(st, f"{plan.experiment_path}/refit").trainer_args()
    refits = refit.run(top, plan.base, data_ref, seeds=st.refit_seeds, trainer_args=trainer_args)
    y_test = data.test.y if data.test is not None else None
    configs = refit.summarise(top, refits, y_test, plan.metric)
    members = [(ExperimentConfig.from_dict(r.config, where="refit"), r.weights,
                {"rank": r.rank, "source_trial": r.trial_id, "seed": r.seed})
               for r in refits]
    # A model folder already there is this search's own, from a run that was interrupted
    # before it finished (--resume) or from the search --overwrite replaces.
    model_dir = serving.save_model(plan.out_dir / "model", members, class_names=data.class_names,
                                   dataset=data.name, overwrite=st.resume or st.overwrite)
    accuracy = None
    if data.test is not None:  # test is read once, through the code users load
        accuracy = refit.score_saved_model(model_dir, data.test.x, data.test.y)
    name = registered_name(plan)
    parent.undo_unless_finished(functools.partial(
        withdraw_model, plan.uri, parent.run_id, name, int(time.time() * 1000)))
    version = serving.log_model(plan.uri, parent.run_id, model_dir, registered_name=name,
                                input_example=data.train.x[:2])
    out = Handover(configs=[c.row() for c in configs], members=len(refits),
                   model_dir=model_dir, registered=(name, version),
                   ensemble_test_accuracy=accuracy)
    _log(parent, out)
    return out


def _log(parent: ParentRun, out: Handover) -> None:
    """The refits' numbers and the registered version on the parent run."""
    metrics: dict[str, Any] = {"ensemble_test_accuracy": out.ensemble_test_accuracy}
    for c in out.configs:
        for key in REFIT_KEYS:
            metrics[f"refit.{c['rank']}.{key}"] = c[key]
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
