"""The pipeline's report format: the names in the metrics a trial hands to its ``report`` callable,
and how many reports a trial makes.

:func:`cbdtune.pipeline.run_trial` calls ``report(metrics, payload)`` at every evaluation point.
The worker forwards each report to Ray (Tune sees it as one result), and everything downstream
reads them by these names: the Tune callbacks, tracking, results, figures, the search and the
benchmarks. The values are also the MLflow metric names. One report is a flat dict:

- pretraining probe (every ``train.probe_every`` epochs and after the last): ``stage`` =
  ``"pretrain"``, ``epoch``, ``loss.<term>`` (Eq. 14), the short probe's ``val_*``, ``diag.*``;
- classifier epoch: ``stage`` = a registered stage's name (:data:`STAGES`, cbdtune.stages; a
  closed-form stage such as ``"ridge"`` reports once, at the selected point of its path),
  ``epoch``, ``train_loss``, ``val_accuracy`` (the best point of the mean CV curve so far, what
  ASHA compares), ``val_accuracy_se``, ``val_accuracy_epoch``, ``val_loss``, ``val_f1``, ``lr``
  (the ridge: ``ridge_alpha``, ``ridge_token_weight``, ``ridge_level_weight``, ``temperature``);
- end of a classifier stage: ``stage``, ``epoch`` (the chosen count), ``stage_done`` = 1, ``val_*``;
- the final report, always last: ``stage`` = ``"final"``, ``final`` = 1, ``diverged`` = 0 or 1
  (``reason`` when 1), ``selected_stage``, ``selected_epoch``, ``cv_folds``, ``val_*`` at the
  selected point, ``<stage>.val_accuracy``, ``temperature``, ``test_accuracy``, ``test_f1``,
  ``wall_s``, ``n_params``, ``diag.*``, ``encoder_reused`` (0/1), ``encoder_key`` and
  ``encoder_source_run`` (cbdtune.encoder_cache);
- a refit's only report: ``stage`` = ``"refit"``, ``seed``, ``refit_stage``, ``refit_epochs``,
  ``encoder_reused``, ``test_*``, ``wall_s``.

Every ``val_accuracy``, ``val_loss`` and ``val_f1`` of a cross-validated point (probe, classifier
epoch, stage end, final) goes with ``<key>_folds`` (:func:`folds_of`): its per-fold scores, one
float per fold in fold order, what ASHA compares pairwise (cbdtune.stopping). MLflow logs numbers
only (cbdtune.tracking.numeric drops the lists) and the trials frame copies named columns only
(cbdtune.results.RESULT_COLUMNS), so the lists reach the scheduler alone.

A trial that reuses a cached encoder replays the pretraining reports of the trial that made it.

This module imports nothing heavy (no torch, no Ray): the search reads it before Ray starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cbdtune import stages as _stages
from cbdtune.config import ExperimentConfig, TrainConfig

# ---- keys ------------------------------------------------------------------------------------

STAGE = "stage"
EPOCH = "epoch"
FINAL = "final"  # 1 in the trial's last report only
DIVERGED = "diverged"  # in the final report: 1 when a loss became NaN/inf
REASON = "reason"  # why a trial diverged
STAGE_DONE = "stage_done"  # 1 in the report that closes a classifier stage
SELECTED_STAGE = "selected_stage"
SELECTED_EPOCH = "selected_epoch"
CV_FOLDS = "cv_folds"
WALL_S = "wall_s"
TRAIN_LOSS = "train_loss"
LR = "lr"  # a classifier epoch's learning rate (the first fold's)
TEMPERATURE = "temperature"  # the selected point's fitted temperature (cbdtune.classify)
N_PARAMS = "n_params"  # in the final report: the pretrained model's parameter count
SEED = "seed"  # in a refit's report: the seed it pretrained and trained with
REFIT_STAGE_KEY = "refit_stage"  # in a refit's report: the stage it refit
REFIT_EPOCHS = "refit_epochs"  # ... at this point (epoch count, or ridge path point)
RIDGE_ALPHA = "ridge_alpha"  # the ridge stage's selected regularisation
RIDGE_TOKEN_WEIGHT = "ridge_token_weight"  # ... and its blend of the token and level blocks
RIDGE_LEVEL_WEIGHT = "ridge_level_weight"

VAL_PREFIX = "val_"  # a cross-validated estimate's metric: val_<accuracy|loss|f1|accuracy_se>
VAL_ACCURACY = "val_accuracy"
VAL_ACCURACY_SE = "val_accuracy_se"
VAL_ACCURACY_EPOCH = "val_accuracy_epoch"  # the mean curve at this epoch (not the best so far)
VAL_LOSS = "val_loss"
VAL_F1 = "val_f1"
TEST_ACCURACY = "test_accuracy"
TEST_F1 = "test_f1"
LOSS_PREFIX = "loss."  # pretraining loss terms: loss.total, loss.time_rec, ...
ENCODER_REUSED = "encoder_reused"  # 1 when the pretrained encoder came from the cache
ENCODER_KEY = "encoder_key"  # its pretraining key ("" without a cache)
ENCODER_SOURCE = "encoder_source_run"  # "<search>/<trial id>" of the trial that pretrained it
# ``val_accuracy_folds``: a metric's per-fold scores (cbdtune.stopping reads them; same name there)
FOLDS_SUFFIX = "_folds"

# Tune's time attribute: the worker sets it to the trial's report count, so a trial resumed from
# a checkpoint continues its own count (ray.tune.result.TRAINING_ITERATION; Tune only fills it in
# when a result has none, ray/tune/trainable/trainable.py).
ITERATION = "training_iteration"
TIME_TOTAL_S = "time_total_s"  # Tune's: a trial's seconds so far, in every result
RUNG_PREFIX = "rung_"  # the trials frame's value of a metric at ASHA's first rung: rung_<metric>

# ---- stages ----------------------------------------------------------------------------------

PRETRAIN = "pretrain"
STAGES = _stages.names()  # the classifier stages, in the order they run (cbdtune.stages owns them)
FINAL_STAGE = "final"  # ``stage`` of the final report
REFIT_STAGE = "refit"  # ``stage`` of a refit's only report

# What every evaluation point and the final report carry (cross-validated means under CV): the
# metrics a search may select on.
SELECTION_METRICS = (VAL_ACCURACY, VAL_LOSS, VAL_F1)


def stages(tc: TrainConfig) -> Iterator[str]:
    """The classifier stages ``tc.classifier`` runs, in order (:func:`cbdtune.stages.selected`)."""
    return _stages.selected(tc)


def stage_metric(stage: str, metric: str = VAL_ACCURACY) -> str:
    """``"fine_tune.val_accuracy"``: a stage's metric in the final report."""
    return f"{stage}.{metric}"


def folds_of(metric: str) -> str:
    """``"val_accuracy_folds"``: the report key of ``metric``'s per-fold scores."""
    return f"{metric}{FOLDS_SUFFIX}"


def val_metrics(val: Mapping[str, float],
                fold_scores: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """A cross-validated point as report keys: ``{"accuracy": a, ...}`` -> ``{"val_accuracy":
    a, ...}``, and each fold list ``{"accuracy": [...]}`` -> ``{"val_accuracy_folds": [...]}``."""
    out: dict[str, Any] = {f"{VAL_PREFIX}{k}": v for k, v in val.items()}
    out.update({folds_of(f"{VAL_PREFIX}{k}"): [float(s) for s in v]
                for k, v in (fold_scores or {}).items()})
    return out


def rung_of(metric: str) -> str:
    """``"rung_val_accuracy"``: ``metric`` at ASHA's first rung, a trials-frame column."""
    return f"{RUNG_PREFIX}{metric}"


def se_of(metric: str) -> str:
    """``"val_accuracy_se"``: the standard error reported next to ``metric`` (when it is)."""
    return f"{metric}_se"


# ---- reading a report ------------------------------------------------------------------------


def is_final(report: Mapping[str, Any] | None) -> bool:
    """The trial's last report (completed or diverged)."""
    return bool(report) and report.get(FINAL) == 1  # type: ignore[union-attr]


def is_diverged(report: Mapping[str, Any] | None) -> bool:
    return is_final(report) and report.get(DIVERGED) == 1  # type: ignore[union-attr]


def is_stage_done(report: Mapping[str, Any]) -> bool:
    return bool(report.get(STAGE_DONE))


# ---- the report budget -----------------------------------------------------------------------


def probe_count(tc: TrainConfig) -> int:
    """Pretraining reports: one every ``probe_every`` epochs and one after the last epoch."""
    return math.ceil(tc.pretrain_epochs / tc.probe_every) if tc.pretrain_epochs else 0


def report_budget(cfg: ExperimentConfig) -> int:
    """How many reports one trial makes at most: the probes, one per classifier epoch and one per
    stage end, and the final report. Early stopping and reuse can only make fewer."""
    tc = cfg.train
    per_stage = sum(stage_epochs(tc, s) + 1 for s in stages(tc))
    return max(1, probe_count(tc) + per_stage + 1)


def stage_epochs(tc: TrainConfig, stage: str) -> int:
    """Epoch reports a stage makes at most (:func:`cbdtune.stages.epoch_reports`)."""
    return _stages.epoch_reports(tc, stage)


# ---- several datasets: one configuration, one report per trial ---------------------------------

# What a multi-dataset trial's report carries of each dataset's final report, as ``<slug>.<key>``.
PER_DATASET = (VAL_ACCURACY, VAL_ACCURACY_SE, VAL_F1, VAL_LOSS, TEST_ACCURACY, TEST_F1,
               SELECTED_STAGE, SELECTED_EPOCH, CV_FOLDS, WALL_S, DIVERGED, REASON,
               ENCODER_REUSED, ENCODER_KEY, ENCODER_SOURCE)
# Averaged over the datasets into the trial's own value of the same name.
AVERAGED = (VAL_ACCURACY, VAL_F1, VAL_LOSS, TEST_ACCURACY, TEST_F1)


def dataset_metric(slug: str, key: str) -> str:
    """``"gesture.val_accuracy"``: one dataset's ``key`` in a multi-dataset trial's report."""
    return f"{slug}.{key}"


def aggregate(finals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One multi-dataset trial's final report from each dataset's final report (by slug).

    The objective is a fixed number per trial: the mean over datasets of each one's
    cross-validated estimate (``val_accuracy``, and likewise ``val_f1``, ``val_loss`` and the
    test metrics), with ``val_accuracy_se`` = sqrt(sum se_i^2) / n, the standard error of that
    mean when the datasets' estimates are independent. A mean rank would move as other trials
    arrive, a moving target for TPE. A dataset that diverged or failed (no final report, or
    ``diverged`` = 1) makes the trial diverged, ``val_accuracy`` 0, with its reason.
    """
    out: dict[str, Any] = {STAGE: FINAL_STAGE, FINAL: 1}
    for slug, final in finals.items():
        out.update({dataset_metric(slug, k): final[k] for k in PER_DATASET if k in final})
    bad = {slug: str(f.get(REASON) or "no final report") for slug, f in finals.items()
           if not is_final(f) or f.get(DIVERGED) == 1}
    if bad or not finals:
        out.update({DIVERGED: 1, VAL_ACCURACY: 0.0,
                    REASON: "; ".join(f"{s}: {r}" for s, r in bad.items()) or "no dataset"})
        return out
    n = len(finals)
    for key in AVERAGED:
        values = [f.get(key) for f in finals.values()]
        if all(isinstance(v, (int, float)) for v in values):
            out[key] = math.fsum(values) / n  # type: ignore[arg-type]
    ses = [f.get(VAL_ACCURACY_SE) for f in finals.values()]
    if all(isinstance(v, (int, float)) for v in ses):
        out[VAL_ACCURACY_SE] = math.sqrt(math.fsum(v * v for v in ses)) / n  # type: ignore
    out[DIVERGED] = 0
    out[ENCODER_REUSED] = int(all(f.get(ENCODER_REUSED) == 1 for f in finals.values()))
    return out
