"""After the search: refit the best configurations on every training series, test once, ensemble.

The search ranks configurations by their cross-validated estimate. The top ``top`` of them are
trained again from scratch (pretraining and classifier, at the epoch count their CV curve chose)
on the whole training split, ``seeds`` times each with seeds ``seed, seed + 1, ...``. Each refit
reads the test split once; so does the softmax average of all of them (the ensemble), which is
the model the search hands over (:mod:`cbdtune.serving`).

Each refit is a Ray Train ``TorchTrainer`` run (:func:`cbdtune.worker.make_trainer` with
``refit=...``), launched from a zero-CPU Ray task so that refits run side by side as far as the
cluster's CPUs and GPUs allow.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cbdtune import reports
from cbdtune.config import ExperimentConfig
from cbdtune.results import trial_params

log = logging.getLogger("cbdtune.refit")


@dataclass
class Refit:
    """One refit: which configuration (its rank and source trial), which seed, what it scored."""

    rank: int  # 1 = the best configuration
    trial_id: str
    seed: int
    metrics: dict[str, Any]
    config: dict[str, Any]  # resolved (model shape filled in): rebuilds the classifier
    weights: dict[str, Any]
    test_proba: np.ndarray


@dataclass
class ConfigSummary:
    """Per configuration: its CV estimate, the refits' test accuracies and their ensemble's."""

    rank: int
    trial_id: str
    cv_accuracy: float
    cv_se: float
    stage: str
    epochs: int
    test: list[float] = field(default_factory=list)
    ensemble_test: float = math.nan

    def row(self) -> dict[str, Any]:
        t = np.asarray(self.test, dtype=float)
        return {"rank": self.rank, "trial_id": self.trial_id, "stage": self.stage,
                "epochs": self.epochs, "cv_accuracy": self.cv_accuracy, "cv_se": self.cv_se,
                "refits": len(t), "test_mean": float(t.mean()) if len(t) else math.nan,
                "test_std": float(t.std(ddof=1)) if len(t) > 1 else math.nan,
                "ensemble_test": self.ensemble_test}


def config_key(row: pd.Series) -> str:
    """A trial's searched values as one canonical string: two trials with the same key are one
    configuration (a reuse trial may repeat another's every value), refit once."""
    import json

    return json.dumps(trial_params(row), sort_keys=True, default=str)


def distinct(ranked: pd.DataFrame) -> pd.DataFrame:
    """``ranked`` without the rows whose configuration an earlier (better) row already has."""
    keys = [config_key(row) for _, row in ranked.iterrows()]
    seen: set[str] = set()
    keep = []
    for key in keys:
        keep.append(key not in seen)
        seen.add(key)
    return ranked[keep]


def temperature_of(row: pd.Series) -> float:
    """The trial's temperature (fitted on its out-of-fold scores; 1 when it has none)."""
    t = row.get("temperature", 1.0)
    return float(t) if t is not None and t == t and float(t) > 0 else 1.0


def plan(top: pd.DataFrame, base: ExperimentConfig,
         seeds: int) -> list[tuple[int, pd.Series, ExperimentConfig]]:
    """``(rank, trial row, config)`` for every refit: each top trial's config with each seed."""
    jobs = []
    for rank, (_, row) in enumerate(top.iterrows(), start=1):
        cfg = base.replace(trial_params(row), where=f"trial {row['trial_id']}")
        for j in range(seeds):
            jobs.append((rank, row, cfg.replace({"train.seed": cfg.train.seed + j})))
    return jobs


def run(top: pd.DataFrame, base: ExperimentConfig, data_ref: Any, *, seeds: int,
        trainer_args: dict[str, Any]) -> list[Refit]:
    """Run every refit of :func:`plan` as a Ray task; one progress line as each one ends."""
    import ray

    from cbdtune.session import TrialSettings
    from cbdtune.worker import fit_trainer, make_trainer, refit_here

    run_settings = TrialSettings(**trainer_args)

    def one(cfg_dict: dict[str, Any], refs: list[Any], job: dict[str, Any],
            name: str) -> dict[str, Any]:
        cfg = ExperimentConfig.from_dict(cfg_dict, where="refit config")
        if run_settings.in_trial:  # one CPU worker: in this task, not 7 more processes
            return refit_here(cfg, refs[0], **job, encoder_cache=run_settings.encoder_cache,
                              cpus=run_settings.cpus_per_worker)
        trainer = make_trainer(cfg, data_ref=refs[0], name=name, refit=job, **trainer_args)
        return fit_trainer(trainer)

    remote = ray.remote(num_cpus=run_settings.trial_resources()["cpu"])(one)
    jobs = plan(top, base, seeds)
    pending = {}
    for rank, row, cfg in jobs:
        # The trial's temperature: the refit's probabilities are calibrated as its
        # out-of-fold ones were (what ensemble selection weighed).
        job = {"stage": str(row[reports.SELECTED_STAGE]),
               "epochs": int(row[reports.SELECTED_EPOCH]), "temperature": temperature_of(row)}
        ref = remote.remote(cfg.to_dict(), [data_ref], job,
                            f"refit_{row['trial_id']}_seed{cfg.train.seed}")
        pending[ref] = (rank, str(row["trial_id"]), cfg.train.seed)
    refits: list[Refit] = []
    t0 = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        rank, trial_id, seed = pending.pop(done[0])
        out = ray.get(done[0])
        weights = {k: torch.from_numpy(np.array(v)) for k, v in out["weights"].items()}
        refits.append(Refit(rank, trial_id, seed, out["final"], out["config"], weights,
                            out["test_proba"]))
        log.info("refit %d/%d: config #%d (trial %s), seed %d: test accuracy %.4f (%.0f s)",
                 len(refits), len(jobs), rank, trial_id, seed,
                 out["final"].get(reports.TEST_ACCURACY, math.nan), time.perf_counter() - t0)
    return sorted(refits, key=lambda r: (r.rank, r.seed))


def summarise(top: pd.DataFrame, refits: list[Refit], y_test: np.ndarray | None,
              metric: str) -> list[ConfigSummary]:
    """Per configuration: the CV estimate, refit test accuracies and their ensemble's."""
    out = []
    for rank, (_, row) in enumerate(top.iterrows(), start=1):
        mine = [r for r in refits if r.rank == rank]
        s = ConfigSummary(rank, str(row["trial_id"]), float(row[metric]),
                          float(row.get(reports.VAL_ACCURACY_SE, math.nan)),
                          str(row[reports.SELECTED_STAGE]), int(row[reports.SELECTED_EPOCH]),
                          [float(r.metrics.get(reports.TEST_ACCURACY, math.nan)) for r in mine])
        if y_test is not None and mine:
            s.ensemble_test = ensemble_accuracy([r.test_proba for r in mine], y_test)
        out.append(s)
    return out


def ensemble_accuracy(probas: list[np.ndarray], y: np.ndarray) -> float:
    """Accuracy of the softmax average (in float64, as :class:`cbdtune.serving.CBDEnsemble`
    averages its members)."""
    return float(np.mean(np.mean(np.asarray(probas, dtype=np.float64), axis=0).argmax(1) == y))


def score_saved_model(model_dir: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a saved model folder, through the code ``cbdtune.predict`` runs.

    The search reports this number for the model it hands over, so that it is what a user gets
    from ``python -m cbdtune.predict --model <the registered version> --input <dataset>``:
    :meth:`cbdtune.serving.CBDEnsemble.load` and ``predict_proba`` (float32, the contract's
    length policy), the argmax compared with ``y``.

    Args:
        model_dir: a folder :func:`cbdtune.serving.save_model` wrote.
        x: the test series, float [N, C, L_i] (any length; fitted as the model does).
        y: their class indices [N], in the model's class order.

    Returns:
        The fraction of series whose most probable class is ``y``.
    """
    from cbdtune.serving import CBDEnsemble

    pred = CBDEnsemble.load(model_dir).predict_proba(x).argmax(axis=1)
    return float(np.mean(pred == np.asarray(y)))
