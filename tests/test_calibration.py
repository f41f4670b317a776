"""Calibrated probabilities: a temperature fitted on the out-of-fold scores, carried by the
classifier's state_dict and applied wherever its softmax is taken."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cbdtune import classify, pipeline
from cbdtune.config import ModelConfig, preset
from cbdtune.data import Dataset, Split
from cbdtune.model import CBDClassifier, build_head, build_model
from cbdtune.runtime import Runtime

TINY = {"model.d_model": 16, "model.n_heads": 2, "model.encoder_layers": 2, "model.ff_dim": 32,
        "model.decoder_layers": 1, "model.cbd_blocks": 1, "model.cbd_ff_dim": 16,
        "train.pretrain_epochs": 0, "train.num_threads": 1}


def _scores(scale: float, n: int = 2000, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(true logits); scores = ``scale`` x the true logits: over-
    confident for scale > 1, under-confident below."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, k)) * 2.0
    p = torch.as_tensor(logits).softmax(-1).numpy()
    y = np.array([rng.choice(k, p=row) for row in p])
    return logits * scale, y


def _log_loss(scores: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(F.cross_entropy(torch.as_tensor(scores / t), torch.as_tensor(y)))


@pytest.mark.parametrize("scale", [5.0, 0.2])
def test_temperature_lowers_the_log_loss_of_mis_scaled_scores(scale: float) -> None:
    scores, y = _scores(scale)
    t = classify.fit_temperature(scores, y)
    assert t == pytest.approx(scale, rel=0.15)  # undoes the scale: T ~ 5 and ~ 0.2
    assert _log_loss(scores, y, t) < _log_loss(scores, y, 1.0) - 0.05


def test_temperature_stays_one_when_scores_are_calibrated() -> None:
    scores, y = _scores(1.0)
    assert classify.fit_temperature(scores, y) == pytest.approx(1.0, rel=0.1)


def _classifier(temperature: float) -> CBDClassifier:
    cfg = ModelConfig(in_channels=2, seq_len=16, num_classes=3, d_model=16, n_heads=2,
                      encoder_layers=1, ff_dim=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    clf = CBDClassifier(model, build_head(cfg, model.num_tokens))
    clf.temperature.fill_(temperature)
    return clf.eval()


def test_a_saved_and_loaded_classifier_keeps_its_temperature() -> None:
    clf = _classifier(0.25)
    buf = io.BytesIO()
    torch.save(clf.state_dict(), buf)
    buf.seek(0)
    again = _classifier(1.0)
    again.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert float(again.temperature) == pytest.approx(0.25)
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), clf(x))


def test_a_state_dict_without_a_temperature_loads_as_one() -> None:
    state = _classifier(3.0).state_dict()
    del state["temperature"]
    clf = _classifier(3.0)
    clf.load_state_dict(state, strict=True)
    assert float(clf.temperature) == 1.0


def test_predict_proba_is_the_softmax_of_the_logits_over_the_temperature() -> None:
    clf = _classifier(0.5)
    x = np.random.default_rng(0).standard_normal((7, 2, 16)).astype(np.float32)
    proba = classify.predict_proba(clf, x, Runtime(), preset("default").train)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    with torch.no_grad():
        logits = clf.head(*clf.features(torch.as_tensor(x)))
    np.testing.assert_allclose(proba, (logits / 0.5).softmax(-1).numpy(), rtol=1e-5, atol=1e-6)


def _noisy_levels(seed: int) -> Dataset:
    """Two classes whose channel-0 level differs by less than the noise: scores that overlap."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        y = np.arange(n) % 2
        x = rng.standard_normal((n, 2, 32)).astype(np.float32)
        x[:, 0] += (0.5 * (2.0 * y - 1.0) + rng.standard_normal(n))[:, None]
        return Split(x, y.astype(np.int64))

    return Dataset(name="NoisyLevels", train=split(90), val=split(0), test=split(60),
                   class_names=["low", "high"], source="synthetic", location="memory")


@pytest.mark.parametrize("stage", ["ridge", "linear_probe"])
def test_the_stage_returns_oof_probabilities_and_a_temperature_that_fits_them(stage: str) -> None:
    data = _noisy_levels(0)
    cfg = preset("default").replace({**TINY, "model.level_features": True,
                                     "train.classifier": stage, "train.classifier_epochs": 3,
                                     "data.cv_folds": 3})
    cfg, model = pipeline.build_for(data, cfg)
    result = classify.fit_stage(model, classify.selection_pool(data, cfg), cfg,
                                Runtime(), stage, 2)
    assert result.oof_proba is not None and result.oof_proba_raw is not None
    assert result.oof_proba.shape == (90, 2)  # every training series is held out once
    torch.testing.assert_close(result.oof_proba.sum(1), torch.ones(90))
    assert result.temperature > 0
    y = torch.as_tensor(data.train.y)

    def nll(p: torch.Tensor) -> float:
        return float(F.nll_loss(p.double().log(), y))

    assert nll(result.oof_proba) <= nll(result.oof_proba_raw) + 1e-9
    # the calibrated probabilities are the raw ones re-tempered: same argmax
    assert torch.equal(result.oof_proba.argmax(1), result.oof_proba_raw.argmax(1))


def test_the_trials_classifier_carries_the_selected_temperature() -> None:
    data = _noisy_levels(1)
    cfg = preset("default").replace({**TINY, "model.level_features": True, "data.cv_folds": 3})
    result = pipeline.run_trial(cfg, data, lambda _m, _s: None)
    assert result.status == "completed" and result.classifier is not None
    t = result.metrics["temperature"]
    assert t != 1.0  # the ridge's +-1 scores are far from calibrated
    assert float(result.classifier.temperature) == pytest.approx(t, rel=1e-6)
