"""The classifier stages' registry (cbdtune.stages): names, lookup, and what a new stage needs."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

import numpy as np
import pytest
from torch import nn

from cbdtune import classify, reports, stages
from cbdtune.config import ConfigError, ModelConfig, TrainConfig, preset
from cbdtune.model import CBDClassifier, ClassifierHead, RidgeHead
from cbdtune.runtime import Runtime
from cbdtune.stages.base import Stage


def test_stages_registry_and_config_choices_agree() -> None:
    """train.classifier offers every registered stage (and "both"), train.probe every probe."""
    hints = get_type_hints(TrainConfig)
    assert set(get_args(hints["classifier"])) == {*stages.names(), stages.BOTH}
    assert set(get_args(hints["probe"])) == {stages.spec(n).probe for n in stages.names()} - {""}
    assert reports.STAGES == stages.names() == ("ridge", "linear_probe", "fine_tune")


@pytest.mark.parametrize("name", stages.names())
def test_stages_each_name_gets_its_own_class(name: str) -> None:
    stage = stages.get(name)
    assert isinstance(stage, Stage) and stage.name == name and stage.spec.name == name


def test_stages_keep_their_seeds() -> None:
    """The head seeds a trial had before the registry (seed * 1009 + salt + 10 * fold)."""
    assert {n: stages.get(n).seed_salt for n in stages.names()} == {
        "linear_probe": 1, "fine_tune": 2, "ridge": 3}


def test_stages_build_the_head_serving_loads() -> None:
    cfg = ModelConfig(in_channels=3, seq_len=50, num_classes=4, level_features=True)
    assert type(stages.get("ridge").build_head(cfg, 7)) is RidgeHead
    for name in ("linear_probe", "fine_tune"):
        assert type(stages.get(name).build_head(cfg, 7)) is ClassifierHead


@pytest.mark.parametrize("classifier,expected", [
    ("both", ["linear_probe", "fine_tune"]), ("ridge", ["ridge"]), ("fine_tune", ["fine_tune"])])
def test_stages_selected_by_train_classifier(classifier: str, expected: list[str]) -> None:
    tc = TrainConfig(classifier=classifier, classifier_epochs=7)  # type: ignore[arg-type]
    assert list(reports.stages(tc)) == expected
    assert [reports.stage_epochs(tc, s) for s in expected] == [
        1 if s == "ridge" else 7 for s in expected]


def test_stages_probe_names_map_to_stages() -> None:
    assert stages.probe_stage("linear") == "linear_probe"
    assert stages.probe_stage("ridge") == "ridge"
    with pytest.raises(ConfigError, match="train.probe 'nope'"):
        stages.probe_stage("nope")


def test_stages_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="classifier stage 'nope': not registered"):
        stages.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        stages.register("ridge", "x:Y")


class _Majority(Stage):
    """A stage of one file: always the pool's most frequent class (closed form, one point)."""

    name = "majority"
    seed_salt = 9

    def build_head(self, cfg: ModelConfig, num_tokens: int) -> nn.Module:
        return ClassifierHead(num_tokens, cfg.d_model, cfg.num_classes, kind="mean")

    def inputs(self, model: Any, x: np.ndarray, cfg: Any, rt: Runtime) -> tuple[Any, ...]:
        return (x,)

    def fit(self, model: Any, pool: classify.Pool, cfg: Any, rt: Runtime, n_classes: int,
            report: Any = None) -> classify.StageResult:
        scores = [{"accuracy": float(np.mean(pool.y[va] == np.bincount(pool.y[tr]).argmax())),
                   "loss": 1.0, "f1": 0.0} for tr, va in pool.folds]
        return classify.StageResult(self.name, 1, classify.mean_point(scores), len(pool.folds),
                                    fold_scores=classify.fold_scores(scores))

    def refit(self, model: Any, x: np.ndarray, y: np.ndarray, cfg: Any, rt: Runtime,
              epochs: int) -> CBDClassifier:
        return self.classifier(model, cfg, rt)


def test_stages_a_new_stage_is_its_class_and_one_registration(monkeypatch) -> None:
    """Registered, a stage is found by name everywhere a stage name goes: fit_stage, the report
    budget, its report keys (with per-fold scores)."""
    monkeypatch.setattr(stages, "_REGISTRY", dict(stages._REGISTRY))
    monkeypatch.setattr(stages, "_Majority", _Majority, raising=False)
    stages.register("majority", f"{__name__}:_Majority", closed_form=True)
    assert stages.names()[-1] == "majority"
    tc = dataclasses.replace(TrainConfig(), classifier_epochs=50)
    assert stages.epoch_reports(tc, "majority") == 1
    y = np.array([0, 0, 0, 1] * 5)
    pool = classify.Pool(np.zeros((20, 1, 8)), y, [(np.arange(10), np.arange(10, 20)),
                                                   (np.arange(10, 20), np.arange(10))], False)
    result = classify.fit_stage(None, pool, preset("smoke"), Runtime(), "majority", 2)  # type: ignore[arg-type]
    assert result.stage == "majority" and result.val["accuracy"] == pytest.approx(0.75)
    # fold order: the first fold holds out series 10-19 (7 of 10 in class 0), the second 0-9
    assert result.metrics()[reports.folds_of(reports.VAL_ACCURACY)] == [0.7, 0.8]
