"""The classifier stages' own switches: augmentation, label smoothing, the refit's data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cbdtune import classify
from cbdtune.config import ConfigError, TrainConfig, preset


def test_augmenter_is_none_when_every_augmentation_is_off() -> None:
    assert classify.augmenter(TrainConfig()) is None


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
    jitter = classify.augmenter(dataclasses.replace(TrainConfig(), augment_jitter=0.1))
    noise = jitter(x) - x
    assert noise.std().item() == pytest.approx(0.1, rel=0.1)  # 0.1 x each series' std (~1)
    scale = classify.augmenter(dataclasses.replace(TrainConfig(), augment_scale=0.2))
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
    clf = classify.refit(model, x, y, cfg, classify.Runtime(), "fine_tune", epochs=2)
    assert seen and set(seen) == {0.1}
    assert not clf.training
