"""The plain-torch trial: it learns, reads the test split once, resumes exactly, stops on NaN."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from cbdtune import classify, pipeline, runtime
from cbdtune import reports as rp
from cbdtune.config import DataConfig, preset
from cbdtune.data import Dataset, load_dataset
from cbdtune.tracking import numeric


@pytest.fixture(scope="module")
def gesture() -> Dataset:
    return load_dataset(DataConfig(dataset="gesture"), seed=0)


@pytest.fixture(scope="module")
def gesture_holdout() -> Dataset:
    """The paper's protocol: a validation split of 24 series carved from the 120."""
    return load_dataset(DataConfig(dataset="gesture", cv_folds=0), seed=0)


def _run(cfg, data, state=None):
    reports: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    result = pipeline.run_trial(cfg, data, lambda m, s: reports.append((m, s)), state=state)
    return result, reports


class _CountingSplit:
    """A test split that counts how often its series are read."""

    def __init__(self, split: Any) -> None:
        self._split = split
        self.reads = 0

    @property
    def x(self) -> Any:
        self.reads += 1
        return self._split.x

    @property
    def y(self) -> Any:
        return self._split.y

    def __len__(self) -> int:
        return len(self._split)


def test_run_trial_smoke_learns_and_reads_test_once(gesture_holdout: Dataset) -> None:
    """Smoke preset on gesture, one validation split: accuracy well above chance (1/8).

    The validation split has 24 series (20% of 120, stratified: 3 per class). Guessing gets 12.5%;
    the chance of a guesser reaching >= 9/24 (0.375) is below 0.5% (binomial tail), so 0.375 is a
    margin a broken pipeline cannot pass by luck.
    """
    counting = _CountingSplit(gesture_holdout.test)
    data = dataclasses.replace(gesture_holdout, test=counting)
    counting.reads = 0  # Dataset validated the split's shape on construction
    cfg = preset("smoke").replace({"train.classifier": "both", "train.num_threads": 2})
    result, reports = _run(cfg, data)
    final = result.metrics
    assert result.status == "completed"
    assert counting.reads == 1, "the test split must be read exactly once"
    assert final["val_accuracy"] >= 0.375
    assert 0.0 <= final["test_accuracy"] <= 1.0 and 0.0 <= final["test_f1"] <= 1.0
    assert final["selected_stage"] in ("linear_probe", "fine_tune")
    # No report before the last one carries a test metric.
    assert all(not any(k.startswith("test") for k in m) for m, _ in reports[:-1])
    stages = [m["stage"] for m, _ in reports]
    assert stages[0] == "pretrain" and stages[-1] == "final"
    assert {"linear_probe", "fine_tune"} <= set(stages)
    pre = [m for m, _ in reports if m["stage"] == "pretrain"]
    assert all(k in pre[0] for k in ("loss.time_rec", "loss.freq_dual", "loss.freq_rec",
                                     "loss.time_dual", "loss.total", "val_accuracy"))
    assert any(k.startswith("diag.energy_low") for k in pre[0])
    assert all(s is not None for m, s in reports if m["stage"] == "pretrain")


def test_run_trial_resumes_from_checkpoint_exactly(gesture: Dataset) -> None:
    """A trial restarted from its first checkpoint continues (not from epoch 0) and matches."""
    cfg = preset("smoke").replace({"train.num_threads": 2, "train.classifier_epochs": 4})
    full, full_reports = _run(cfg, gesture)
    first_state = next(s for _, s in full_reports if s is not None)
    assert first_state["epoch"] == cfg.train.probe_every
    resumed, resumed_reports = _run(cfg, gesture, state=first_state)
    pre_epochs = [m["epoch"] for m, _ in resumed_reports if m["stage"] == "pretrain"]
    assert pre_epochs[0] > first_state["epoch"], "resumed trial restarted from epoch 0"
    tail = [m for m, _ in full_reports
            if m["stage"] != "pretrain" or m["epoch"] > first_state["epoch"]]
    assert len(tail) == len(resumed_reports)
    assert resumed.metrics["val_accuracy"] == full.metrics["val_accuracy"]
    assert resumed.metrics["test_accuracy"] == full.metrics["test_accuracy"]
    assert math.isclose(resumed_reports[0][0]["loss.total"], tail[0]["loss.total"], rel_tol=1e-5)


def test_run_trial_nan_loss_ends_with_reason(gesture: Dataset, monkeypatch) -> None:
    real = pipeline.dual_constraint_loss
    calls = {"n": 0}

    def poisoned(x, out, cfg):
        terms = real(x, out, cfg)
        calls["n"] += 1
        if calls["n"] == 3:
            terms = {**terms, "total": terms["total"] * torch.tensor(float("nan"))}
        return terms

    monkeypatch.setattr(pipeline, "dual_constraint_loss", poisoned)
    counting = _CountingSplit(gesture.test)
    data = dataclasses.replace(gesture, test=counting)
    counting.reads = 0
    result, reports = _run(preset("smoke"), data)
    assert result.status == "diverged"
    assert "pretrain epoch" in result.reason and "nan" in result.reason
    assert reports[-1][0]["diverged"] == 1 and reports[-1][0]["reason"] == result.reason
    assert counting.reads == 0


def test_macro_f1_matches_definition() -> None:
    import numpy as np

    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # per class F1: c0 tp1 fp1 fn1 -> 0.5; c1 tp2 fp1 fn0 -> 0.8; c2 tp1 fp0 fn1 -> 2/3
    assert math.isclose(runtime.macro_f1(pred, true, 3), (0.5 + 0.8 + 2 / 3) / 3)


@pytest.mark.parametrize("amp,native", [(True, True), (True, False), (False, True)])
def test_amp_runs_matmuls_in_bf16_only_where_native(monkeypatch, amp: bool, native: bool) -> None:
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    train = preset("smoke").train
    train = dataclasses.replace(train, amp=amp)
    rt = runtime.Runtime(device=torch.device("cpu"))
    layer = torch.nn.Linear(4, 4)
    with runtime.autocast(rt, train):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if amp and native else torch.float32)


def test_native_bf16_is_false_for_meta_devices() -> None:
    assert runtime.native_bf16(torch.device("meta")) is False


def test_cross_validated_trial_refits_on_every_training_series(gesture: Dataset,
                                                              monkeypatch) -> None:
    """Under CV: k fold classifiers score the stage, the mean curve's epoch count is refit on all
    120 training series, and that refit (not a fold's classifier) reads the test split once."""
    runs: list[tuple[int, int | None]] = []
    real_init = classify.FoldRun.__init__

    def spy(self, clf, stage, inputs, y, train_idx, val_idx, cfg, rt):
        runs.append((len(train_idx), None if val_idx is None else len(val_idx)))
        real_init(self, clf, stage, inputs, y, train_idx, val_idx, cfg, rt)

    monkeypatch.setattr(classify.FoldRun, "__init__", spy)
    counting = _CountingSplit(gesture.test)
    data = dataclasses.replace(gesture, test=counting)
    counting.reads = 0
    cfg = preset("smoke").replace({"train.num_threads": 2, "train.pretrain_epochs": 2,
                                   "train.classifier_epochs": 6, "data.cv_folds": 4})
    result, reports = _run(cfg, data)
    final = result.metrics
    assert len(gesture.train) == 120 and len(gesture.val) == 0
    assert counting.reads == 1
    assert final["cv_folds"] == 4 and final["val_accuracy_se"] > 0
    assert 1 <= final["selected_epoch"] <= 6
    # probes and the stage: 4 folds of 90 + 30; then exactly one refit on all 120
    assert runs[-1] == (120, None)
    assert all(run == (90, 30) for run in runs[:-1]) and len(runs) % 4 == 1
    # the reported estimate is the mean curve at the selected epoch, never below a later point
    curve = [m for m, _ in reports if m["stage"] == "linear_probe" and "val_accuracy_epoch" in m]
    assert final["val_accuracy"] == max(m["val_accuracy_epoch"] for m in curve)
    assert all(b["val_accuracy"] >= a["val_accuracy"] for a, b in zip(curve, curve[1:], strict=False))
    assert result.classifier is not None


# ---- a pretraining budget in optimizer steps -------------------------------------------------


@pytest.mark.parametrize(("n", "batch", "drop_last", "steps"), [
    (96, 128, True, 1),    # a set smaller than a batch keeps its only batch
    (253, 128, True, 1),   # [C]: 125 of 253 series never seen in an epoch
    (253, 128, False, 2),
    (256, 128, True, 2), (257, 32, False, 9)])
def test_batches_per_epoch_is_what_the_loader_yields(n, batch, drop_last, steps) -> None:
    rt = runtime.Runtime(device=torch.device("cpu"))
    loader = runtime.make_loader((torch.zeros(n, 1),), batch, shuffle=True, seed=0, rt=rt,
                                 drop_last=drop_last)
    assert runtime.batches_per_epoch(n, batch, drop_last) == len(loader) == steps


def test_steps_budget_becomes_epochs_for_the_data_and_keeps_the_probe_count() -> None:
    cfg = preset("paper").replace({"train.pretrain_steps": 300, "train.probe_every": 10})
    assert cfg.train.pretrain_epochs == 100  # 10 probes: what ASHA's rungs are set from
    small = pipeline.steps_to_epochs(cfg, 96).train  # 1 step per epoch
    big = pipeline.steps_to_epochs(cfg, 640).train  # 5 steps per epoch
    assert (small.pretrain_epochs, small.probe_every) == (300, 30)
    assert (big.pretrain_epochs, big.probe_every) == (60, 6)
    for tc in (small, big):
        assert tc.pretrain_steps == 0  # resolved once: resolving again changes nothing
        assert pipeline.steps_to_epochs(dataclasses.replace(cfg, train=tc), 96).train == tc
        assert math.ceil(tc.pretrain_epochs / tc.probe_every) == 10
    assert pipeline.steps_to_epochs(preset("paper"), 96) == preset("paper")  # 0: epochs [C]


def test_a_step_ceiling_cuts_the_epochs_of_a_large_training_set_only() -> None:
    cfg = preset("default")
    assert cfg.train.pretrain_max_steps == 1000 and cfg.train.pretrain_epochs == 100
    assert pipeline.steps_to_epochs(cfg, 1407).train.pretrain_epochs == 100  # 10 steps an epoch
    pendigits = pipeline.steps_to_epochs(cfg, 7494).train  # 58 steps an epoch
    assert (pendigits.pretrain_epochs, pendigits.pretrain_max_steps) == (17, 0)
    assert 17 * 58 <= 1000 < 18 * 58
    assert math.ceil(17 / pendigits.probe_every) <= 10  # no more probes than ASHA was set for
    both = cfg.replace({"train.pretrain_steps": 5000})  # a steps budget is cut the same way
    assert pipeline.steps_to_epochs(both, 640).train.pretrain_epochs == 200  # 5 an epoch
    tiny = cfg.replace({"train.pretrain_max_steps": 3})
    assert pipeline.steps_to_epochs(tiny, 7494).train.pretrain_epochs == 1  # never 0 epochs


def test_run_trial_pretrains_for_the_steps_budget(gesture: Dataset, monkeypatch) -> None:
    """120 training series at batch 32 are 3 steps per epoch (drop_last): 10 steps take 4 epochs,
    12 optimizer steps (the budget rounds up to whole epochs)."""
    steps = 0
    real = torch.optim.AdamW.step

    def counting(self, *args, **kwargs):
        nonlocal steps
        steps += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    cfg = preset("smoke").replace({"train.num_threads": 2, "train.pretrain_steps": 10,
                                   "train.classifier_epochs": 1, "data.cv_folds": 2})
    _, reports = _run(cfg, gesture)
    probes = [m for m, _ in reports if m["stage"] == "pretrain"]
    assert [m["epoch"] for m in probes][-1] == 4
    assert len(probes) <= math.ceil(cfg.train.pretrain_epochs / cfg.train.probe_every)
    assert steps == 12


def test_pretraining_augmentation_feeds_model_and_target_one_augmented_batch(
        gesture: Dataset, monkeypatch) -> None:
    """train.pretrain_augment: the masked model reads and reconstructs the same augmented batch
    (not the raw series); 0 leaves the batches as loaded; a seed repeats its draws."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # (what the model read, the target)
    real_loss = pipeline.dual_constraint_loss

    def spy(xb, out, loss_cfg):
        batches.append((model_inputs[-1], xb))
        return real_loss(xb, out, loss_cfg)

    monkeypatch.setattr(pipeline, "dual_constraint_loss", spy)
    raw = torch.as_tensor(gesture.train.x, dtype=torch.float32)

    def first_batch(strength: float) -> torch.Tensor:
        batches.clear()
        model_inputs.clear()
        cfg = preset("smoke").replace({"train.pretrain_epochs": 1, "train.num_threads": 2,
                                       "train.pretrain_augment": strength})
        cfg, model = pipeline.build_for(gesture, cfg)
        model.register_forward_pre_hook(lambda _, args: model_inputs.append(args[0]))
        pipeline.pretrain(model, gesture, cfg, runtime.Runtime(), lambda *a: None, probes=False)
        seen, target = batches[0]
        assert seen is target, "the reconstruction target is not what the model read"
        return seen

    model_inputs: list[torch.Tensor] = []
    plain = first_batch(0.0)
    assert any(torch.equal(plain[0], series) for series in raw), "0 changed the batch"
    augmented = first_batch(0.3)
    assert not any(torch.allclose(augmented[0], series) for series in raw)
    assert torch.equal(first_batch(0.3), augmented), "the same seed drew other augmentations"


def _folds_agree(m: dict[str, Any], n_folds: int) -> list[str]:
    """The ``val_*`` keys of report ``m`` whose ``_folds`` list is there, one score per fold,
    and averages to the reported value; fails on one that is missing or disagrees."""
    checked = []
    for key in (rp.VAL_ACCURACY, rp.VAL_LOSS, rp.VAL_F1):
        if key in m:
            folds = m[rp.folds_of(key)]
            assert isinstance(folds, list) and len(folds) == n_folds, (m[rp.STAGE], key, folds)
            assert math.isclose(sum(folds) / n_folds, m[key], rel_tol=1e-9, abs_tol=1e-12), (
                m[rp.STAGE], m[rp.EPOCH], key)
            checked.append(key)
    return checked


@pytest.mark.parametrize("classifier,probe", [("linear_probe", "linear"), ("ridge", "ridge")])
def test_run_trial_reports_per_fold_scores_and_caps_only_the_probes(
        gesture: Dataset, monkeypatch, classifier: str, probe: str) -> None:
    """Every cross-validated point a trial reports carries ``val_*_folds`` (what ASHA pairs,
    cbdtune.stopping), whose mean is the reported value; MLflow gets the numbers alone. With
    ``train.probe_max_series`` 60 of gesture's 120 series, the probes fit on 60, the stage and
    the refit on all."""
    sizes: list[int] = []
    real_fit = classify.fit_stage

    def spy(model, pool, cfg, rt, stage, n_classes, report=None):
        sizes.append(len(pool.y))
        return real_fit(model, pool, cfg, rt, stage, n_classes, report)

    monkeypatch.setattr(classify, "fit_stage", spy)
    cfg = preset("smoke").replace({
        "train.num_threads": 2, "train.pretrain_epochs": 2, "train.probe_every": 1,
        "train.classifier": classifier, "train.probe": probe, "train.classifier_epochs": 3,
        "data.cv_folds": 4, "train.probe_max_series": 60})
    result, reported = _run(cfg, gesture)
    assert result.status == "completed"
    assert sizes == [60, 60, 120]  # two probes on the subsample, the stage on every series
    with_val = [m for m, _ in reported if rp.VAL_ACCURACY in m]
    assert [m[rp.STAGE] for m in with_val][:2] == [rp.PRETRAIN] * 2 and with_val[-1] is result.metrics
    for m in with_val:
        assert _folds_agree(m, 4) == [rp.VAL_ACCURACY, rp.VAL_LOSS, rp.VAL_F1]
    logged = numeric(result.metrics)  # what MLflow gets
    assert rp.VAL_ACCURACY in logged and all(
        rp.folds_of(k) not in logged for k in (rp.VAL_ACCURACY, rp.VAL_LOSS, rp.VAL_F1))
