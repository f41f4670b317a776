"""The ridge readout as a stage: a closed-form linear classifier on the frozen encoder's pooled
features of every depth (:mod:`cbdtune.ridge`), selected on its regularisation path.

Its "epochs" are the points of the path (1-based), so the selection, its report and the refit
speak the epoch stages' language: every point is scored on the folds at once, the best mean
accuracy (ties: lower mean loss) is the estimate, reported once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from cbdtune import classify, reports, ridge, stages
from cbdtune.config import ExperimentConfig, ModelConfig
from cbdtune.model import CBDClassifier, CBDModel, RidgeHead, build_ridge_head
from cbdtune.runtime import Report, Runtime, progress_bar
from cbdtune.stages.base import Stage


class Ridge(Stage):
    """:class:`cbdtune.model.RidgeHead` fit in closed form (``model.level_features`` and
    ``model.readout_segments`` are the only head options it reads)."""

    name = stages.RIDGE
    seed_salt = 3

    def build_head(self, cfg: ModelConfig, num_tokens: int) -> RidgeHead:
        return build_ridge_head(cfg, num_tokens)

    def inputs(self, model: CBDModel, x: np.ndarray, cfg: ExperimentConfig,
               rt: Runtime) -> tuple[Any, ...]:
        """The head's columns (N, n_pooled [+ n_stats]), float64 (:func:`cbdtune.ridge.encode`)."""
        return (ridge.encode(self.classifier(model, cfg, rt), x, rt, cfg.train),)

    def fit(self, model: CBDModel, pool: classify.Pool, cfg: ExperimentConfig, rt: Runtime,
            n_classes: int, report: Report | None = None) -> classify.StageResult:
        clf = self.classifier(model, cfg, rt)
        head = _ridge_head(clf)
        (z,) = self.inputs(model, pool.x, cfg, rt)
        outputs = _path_outputs(head, z, pool, n_classes, rt)  # per fold: (P, N_val, K)
        per_fold = [[ridge.point_scores(out[i], pool.y[va], n_classes)
                     for out, (_, va) in zip(outputs, pool.folds, strict=True)]
                    for i in range(len(outputs[0]))]
        points = [classify.mean_point(scores) for scores in per_fold]
        best = max(range(len(points)), key=lambda i: (points[i]["accuracy"], -points[i]["loss"]))
        weights = None
        if pool.holdout:  # the paper's protocol tests the validation split's own classifier
            tr, _ = pool.folds[0]
            ridge.fit(head, z[tr], pool.y[tr], best, n_classes)
            weights = classify.snapshot(clf)
        found = classify.StageResult(self.name, best + 1, points[best], len(pool.folds), weights,
                                     fold_scores=classify.fold_scores(per_fold[best]))
        result = classify.calibrated(found, pool, [out[best] for out in outputs])
        if report is not None:
            report(_report(result, head, best), None)
        return result

    def refit(self, model: CBDModel, x: np.ndarray, y: np.ndarray, cfg: ExperimentConfig,
              rt: Runtime, epochs: int) -> CBDClassifier:
        clf = self.classifier(model, cfg, rt)
        (z,) = self.inputs(model, x, cfg, rt)
        ridge.fit(_ridge_head(clf), z, y, epochs - 1, cfg.model.num_classes)
        return clf


def _ridge_head(clf: CBDClassifier) -> RidgeHead:
    assert isinstance(clf.head, RidgeHead), "the ridge stage builds a RidgeHead"
    return clf.head


def _path_outputs(head: RidgeHead, z: np.ndarray, pool: classify.Pool, n_classes: int,
                  rt: Runtime) -> list[np.ndarray]:
    """Every fold's held-out scores (P, N_val, K) at every point of the path, with progress."""
    bar = progress_bar(len(pool.folds), f"ridge readout ({len(pool.y)} series)", rt,
                       unit="fold")
    log = _progress_note(bar)
    outputs = []
    for tr, va in pool.folds:
        outputs.append(ridge.path_outputs(head, z, pool.y, tr, va, n_classes, log))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return outputs


def _report(result: classify.StageResult, head: RidgeHead, best: int) -> dict[str, Any]:
    """The stage's only epoch report: its selected point, and that point's blend and alpha."""
    (token_w, level_w), alpha = ridge.path(head)[best]
    return {reports.STAGE: result.stage, reports.EPOCH: result.epoch, **result.metrics(),
            reports.VAL_ACCURACY_EPOCH: result.val["accuracy"], reports.RIDGE_ALPHA: alpha,
            reports.RIDGE_TOKEN_WEIGHT: token_w, reports.RIDGE_LEVEL_WEIGHT: level_w,
            reports.TEMPERATURE: result.temperature}


def _progress_note(bar: Any) -> Callable[[str], None] | None:
    """A ``log(message)`` for the ridge's long steps: tqdm's ``write`` under a bar, a
    ``cbdtune.progress`` log line under a :class:`~cbdtune.runtime.ProgressLog`, else None."""
    if bar is None:
        return None
    if hasattr(bar, "write"):
        return lambda msg: bar.write(f"ridge readout: {msg}")
    return lambda msg: bar.log.info("ridge readout: %s", msg)
