"""The classifier stages' own switches: augmentation, label smoothing, the refit's data; the
pools they and the pretraining probes select on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbdtune import classify
from cbdtune.config import ConfigError, TrainConfig, preset
from cbdtune.data import Dataset, Split
from cbdtune.runtime import Runtime


def test_augmenter_is_none_when_every_augmentation_is_off() -> None:
    assert classify.augmenter() is None


def test_window_crop_keeps_the_shape_and_stretches_a_window() -> None:
    torch.manual_seed(0)
    x = torch.arange(100.0).repeat(4, 3, 1)  # (4, 3, 100), a ramp per channel
    out = classify.window_crop(x, 0.5)
    assert out.shape == x.shape
    # a stretched window of a ramp is a ramp: first and last values bound a 50-step window
    span = out[..., -1] - out[..., 0]
    assert torch.allclose(span, torch.full_like(span, 49.0))
    assert (out[..., 0] >= 0).all() and (out[..., -1] <= 99).all()


def test_jitter_and_scale_change_series_by_the_configured_amount() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 200)
    jitter = classify.augmenter(jitter=0.1)
    noise = jitter(x) - x
    assert noise.std().item() == pytest.approx(0.1, rel=0.1)  # 0.1 x each series' std (~1)
    scale = classify.augmenter(scale=0.2)
    ratio = scale(x) / x
    per_channel = ratio.std(dim=-1)
    assert per_channel.max().item() < 1e-4, "one factor per (series, channel)"
    assert ratio[..., 0].std().item() == pytest.approx(0.2, rel=0.25)


def test_augmentation_and_smoothing_are_validated() -> None:
    for key in ("augment_jitter", "augment_scale", "augment_crop", "label_smoothing"):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            preset("smoke").replace({f"train.{key}": 1.5})


def test_label_smoothing_reaches_the_loss(monkeypatch) -> None:
    seen: list[float] = []
    real = torch.nn.functional.cross_entropy

    def spy(logits, y, **kw):
        seen.append(kw.get("label_smoothing", 0.0))
        return real(logits, y, **kw)

    monkeypatch.setattr(classify.F, "cross_entropy", spy)
    cfg = preset("smoke").replace({"model.in_channels": 2, "model.seq_len": 24,
                                   "model.num_classes": 3, "train.label_smoothing": 0.1})
    from cbdtune.model import build_model

    model = build_model(cfg.model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 2, 24)).astype(np.float32)
    y = np.repeat(np.arange(3), 4)
    clf = classify.refit(model, x, y, cfg, Runtime(), "fine_tune", epochs=2)
    assert seen and set(seen) == {0.1}
    assert not clf.training


def _dataset(n_train: int, n_val: int = 0) -> Dataset:
    """Three classes in proportions 1 : 2 : 3, series (N, 1, 4) holding their own index."""
    def split(n: int, offset: int) -> Split:
        y = np.array([0] * (n // 6) + [1] * (n // 3) + [2] * (n - n // 6 - n // 3))
        return Split(np.arange(offset, offset + n, dtype=np.float32)[:, None, None]
                     .repeat(4, -1), y)
    return Dataset("toy", split(n_train, 0), split(n_val, n_train), None, ["a", "b", "c"], "", "",
                   val_origin="carved" if n_val else "none")


@pytest.mark.parametrize("cv_folds,n_val", [(5, 0), (0, 300)])
def test_probe_pool_subsamples_a_large_pool_stratified(cv_folds: int, n_val: int) -> None:
    """Over train.probe_max_series: that many series, each class's share kept, a draw fixed by
    the seed; the stages' pool (selection_pool) keeps every series."""
    data = _dataset(1200, n_val)
    cfg = preset("smoke").replace({"data.cv_folds": cv_folds, "train.probe_max_series": 300})
    full, probe = classify.selection_pool(data, cfg), classify.probe_pool(data, cfg)
    assert len(full.y) == 1200 + n_val
    assert len(probe.y) == 300
    assert np.allclose(np.bincount(probe.y) / len(probe.y), [1 / 6, 1 / 3, 1 / 2], atol=0.01)
    series = probe.x[:, 0, 0].astype(int)  # each series is one of the pool's, once
    assert len(set(series)) == len(series) and np.array_equal(probe.y, full.y[series])
    assert probe.holdout == (cv_folds == 0)
    if cv_folds:
        assert len(probe.folds) == 5
        assert sorted(np.concatenate([va for _, va in probe.folds])) == list(range(len(probe.y)))
    else:  # the validation fold draws from the validation split alone
        tr, va = probe.folds[0]
        assert (series[tr] < 1200).all() and (series[va] >= 1200).all()
        assert len(va) == 300 * n_val // (1200 + n_val)
    again = classify.probe_pool(data, cfg)
    other = classify.probe_pool(data, cfg.replace({"train.seed": 1}))
    assert np.array_equal(again.x, probe.x)
    assert not np.array_equal(other.x, probe.x)


def test_probe_pool_is_the_selection_pool_under_the_cap() -> None:
    data = _dataset(120)
    for cap in (120, 1000, 0):  # 0: no cap
        cfg = preset("smoke").replace({"data.cv_folds": 4, "train.probe_max_series": cap})
        probe, full = classify.probe_pool(data, cfg), classify.selection_pool(data, cfg)
        assert probe.x is full.x and all(
            np.array_equal(a, b) for f, g in zip(probe.folds, full.folds, strict=True)
            for a, b in zip(f, g, strict=True))
    with pytest.raises(ConfigError, match="probe_max_series"):
        TrainConfig(probe_max_series=-1)


def test_stratified_subsample_takes_exactly_size_in_class_proportion() -> None:
    y = np.array([0] * 7 + [1] * 13 + [2] * 80)
    idx = classify.stratified_subsample(y, 10, seed=0)
    assert len(idx) == 10 and list(np.bincount(y[idx])) == [1, 1, 8]  # 0.7, 1.3, 8.0
    assert np.all(np.diff(idx) > 0)
