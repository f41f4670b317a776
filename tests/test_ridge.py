"""The ridge readout: its head, its closed-form path, its stage in a trial and its saved form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from cbdtune import classify, pipeline, reports, ridge
from cbdtune.config import ModelConfig, preset
from cbdtune.data import Dataset, Split
from cbdtune.model import CBDClassifier, RidgeHead, build_head, build_model

TINY = {"model.d_model": 16, "model.n_heads": 2, "model.encoder_layers": 2, "model.ff_dim": 32,
        "model.decoder_layers": 1, "model.cbd_blocks": 1, "model.cbd_ff_dim": 16,
        "train.pretrain_epochs": 0, "train.classifier": "ridge", "train.num_threads": 1}


def _levels_dataset(seed: int = 0) -> Dataset:
    """Two classes told apart only by the level of channel 0 (+-1): each series is noise plus
    its level, so the instance normalisation before the tokenizer removes the whole signal."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        y = np.arange(n) % 2
        x = rng.standard_normal((n, 2, 32)).astype(np.float32)
        x[:, 0] += (2.0 * y - 1.0)[:, None]
        return Split(x, y.astype(np.int64))

    return Dataset(name="Levels", train=split(60), val=split(0), test=split(40),
                   class_names=["low", "high"], source="synthetic", location="memory")


def test_encode_layers_ends_with_encode_and_the_head_pools_every_depth() -> None:
    cfg = ModelConfig(in_channels=3, seq_len=64, num_classes=4, d_model=16, n_heads=2,
                      encoder_layers=2, ff_dim=32, level_features=True)
    model = build_model(cfg).eval()
    x = torch.randn(5, 3, 64)
    layers = model.encode_layers(x)
    assert layers.shape == (5, 3, model.num_tokens, 16)  # tokens + 2 layers
    torch.testing.assert_close(layers[:, -1], model.encode(x))
    head = build_head(cfg, model.num_tokens, ridge=True)
    assert isinstance(head, RidgeHead) and head.n_stats == 6
    clf = CBDClassifier(model, head)
    # 3 depths x 16 channels x (mean, max, std + mean, max of 3 segments) + 2 x 3 levels
    assert clf.head.features(*clf.features(x)).shape == (5, 3 * 16 * (3 + 2 * 3) + 6)
    assert clf(x).shape == (5, 4)


def test_the_path_is_sklearns_ridge_at_every_alpha() -> None:
    rng = np.random.default_rng(0)
    z, targets = rng.standard_normal((30, 50)), rng.standard_normal((30, 3))
    z -= z.mean(axis=0)
    for alpha, w in zip(ridge.ALPHAS[::6], ridge._solutions(z, targets, ridge.ALPHAS[::6]),
                        strict=True):
        ref = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(z, targets)
        np.testing.assert_allclose(w.T, ref.coef_, rtol=1e-6, atol=1e-9)


def test_the_blends_follow_the_level_features_switch() -> None:
    assert ridge.blends(RidgeHead(3, 16, 2, num_tokens=5)) == [(1.0, 0.0)]
    both = ridge.blends(RidgeHead(3, 16, 2, num_tokens=5, n_stats=4))
    assert both[0] == (1.0, 0.0) and both[-1] == (0.0, 1.0) and len(both) == 4
    assert len(ridge.path(RidgeHead(3, 16, 2, num_tokens=5, n_stats=4))) == 4 * len(ridge.ALPHAS)


def test_ridge_trial_finds_the_level_the_instance_norm_removes() -> None:
    """With level features the path reaches the level and the test accuracy is near perfect;
    without them the readout sees normalised series only and stays near chance (40 test
    series: 0.75 is more than 3 standard deviations above a coin's 0.5)."""
    data = _levels_dataset()
    results = {}
    for level in (True, False):
        cfg = preset("default").replace({**TINY, "model.level_features": level})
        reported: list[dict] = []
        result = pipeline.run_trial(cfg, data, lambda m, _s, out=reported: out.append(m))
        assert result.status == "completed"
        results[level] = result.metrics
        ridge_reports = [m for m in reported if m["stage"] == "ridge" and "stage_done" not in m]
        assert len(ridge_reports) == 1  # the path is reported once, at its selected point
        assert len(reported) <= reports.report_budget(pipeline.build_for(data, cfg)[0])
    assert results[True]["selected_stage"] == "ridge"
    assert results[True]["val_accuracy"] >= 0.9 and results[True]["test_accuracy"] >= 0.9
    assert results[False]["test_accuracy"] <= 0.75


def test_a_saved_ridge_classifier_predicts_the_same_after_a_strict_load() -> None:
    """What serving rebuilds from the config alone (build_head with ridge) takes the state."""
    data = _levels_dataset(1)
    cfg = preset("default").replace({**TINY, "model.level_features": True})
    cfg, model = pipeline.build_for(data, cfg)
    pool = classify.selection_pool(data, cfg)
    chosen = classify.fit_stage(model, pool, cfg, pipeline.Runtime(), "ridge", 2)
    clf = classify.refit(model, data.train.x, data.train.y, cfg, pipeline.Runtime(), "ridge",
                         chosen.epoch)
    rebuilt = build_model(cfg.model)
    again = CBDClassifier(rebuilt, build_head(cfg.model, rebuilt.num_tokens, ridge=True))
    again.load_state_dict(clf.state_dict(), strict=True)
    x = torch.as_tensor(data.test.x)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), clf(x))
    assert float((clf(x).argmax(1).numpy() == data.test.y).mean()) >= 0.9


@pytest.mark.parametrize("cv_folds", [0, 3])
def test_ridge_stage_under_both_protocols(cv_folds: int) -> None:
    """One validation split keeps that split's classifier; CV refits on every series."""
    base = _levels_dataset(2)
    data = Dataset(name="Levels", train=Split(base.train.x[:40], base.train.y[:40]),
                   val=Split(base.train.x[40:], base.train.y[40:]), test=base.test,
                   class_names=base.class_names, source="synthetic", location="memory")
    cfg = preset("default").replace({**TINY, "model.level_features": True,
                                     "data.cv_folds": cv_folds})
    result = pipeline.run_trial(cfg, data, lambda _m, _s: None)
    assert result.metrics["cv_folds"] == cv_folds
    assert result.metrics["test_accuracy"] >= 0.9
