"""The ridge readout at many series: PenDigits (7,494 x 2 x 8) trains at a tiny budget through
the real pipeline, and a long readout says where it is."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cbdtune import classify, pipeline, ridge
from cbdtune.config import DataConfig, preset
from cbdtune.data import Dataset, Split, load_dataset
from cbdtune.model import RidgeHead
from cbdtune.runtime import Runtime
from tests.conftest import shared_data_dir

TINY = {"model.d_model": 16, "model.n_heads": 2, "model.encoder_layers": 2, "model.ff_dim": 32,
        "model.decoder_layers": 1, "model.cbd_blocks": 1, "model.cbd_ff_dim": 16,
        "model.bernstein_order": 4, "train.pretrain_epochs": 2, "train.probe_every": 2,
        "train.batch_size": 64, "train.num_threads": 1}


def _pendigits(n_train: int, n_test: int) -> Dataset:
    folder = shared_data_dir() / "UEA_PenDigits"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set CBDTUNE_DATA_DIR)")
    ds = load_dataset(DataConfig(dataset="PenDigits", data_dir=str(shared_data_dir())), seed=0)
    rng = np.random.default_rng(0)
    tr = rng.choice(len(ds.train), n_train, replace=False)
    te = rng.choice(len(ds.test), n_test, replace=False)
    return Dataset(name=ds.name, train=Split(ds.train.x[tr], ds.train.y[tr]),
                   val=Split(ds.train.x[:0], ds.train.y[:0]),
                   test=Split(ds.test.x[te], ds.test.y[te]), class_names=ds.class_names,
                   source=ds.source, location=ds.location)


def test_pendigits_trains_with_the_default_preset_at_a_tiny_budget(
        caplog: pytest.LogCaptureFixture) -> None:
    """Length-8 series (one token of patch 8): pretraining, a ridge fidelity probe, the ridge
    stage on 5 folds, the refit and the test, with progress lines for the readout."""
    data = _pendigits(600, 300)
    assert data.seq_len == 8 and data.n_channels == 2 and data.n_classes == 10
    cfg = preset("default").replace({**TINY, "data.dataset": "PenDigits"})
    reported: list[dict] = []
    with caplog.at_level(logging.INFO, logger="cbdtune.progress"):
        result = pipeline.run_trial(cfg, data, lambda m, _s: reported.append(m),
                                    rt=Runtime(progress_log=True))
    assert result.status == "completed", result.reason
    assert any(m["stage"] == "pretrain" and "val_accuracy" in m for m in reported)  # the probe
    assert result.metrics["selected_stage"] == "ridge"
    assert result.metrics["test_accuracy"] >= 0.6  # 10 classes: chance is 0.1
    assert result.metrics["temperature"] > 0
    lines = [r.getMessage() for r in caplog.records if "ridge readout" in r.getMessage()]
    assert any("eigenbasis" in line for line in lines), lines
    assert any("5/5" in line for line in lines), lines


def test_the_path_costs_one_eigendecomposition_per_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 blends x 21 alphas on one fold: one eigh, no SVD (the readout used to take a thin SVD
    of the fold's columns once per blend)."""
    calls = {"eigh": 0, "svd": 0}
    eigh, svd = np.linalg.eigh, np.linalg.svd

    def counted_eigh(*a, **k):
        calls["eigh"] += 1
        return eigh(*a, **k)

    def counted_svd(*a, **k):
        calls["svd"] += 1
        return svd(*a, **k)

    monkeypatch.setattr(np.linalg, "eigh", counted_eigh)
    monkeypatch.setattr(np.linalg, "svd", counted_svd)
    head = RidgeHead(2, 8, 3, num_tokens=4, segments=1, n_stats=4)
    rng = np.random.default_rng(0)
    for n in (40, 400):  # kernel (n <= F = 84) and Gram (n > F) routes
        calls.update(eigh=0, svd=0)
        z, y = rng.standard_normal((n, head.n_pooled + 4)), rng.integers(0, 3, n)
        out = ridge.path_outputs(head, z, y, np.arange(n // 2), np.arange(n // 2, n), 3)
        assert out.shape == (len(ridge.path(head)), n - n // 2, 3)
        assert calls == {"eigh": 1, "svd": 0}


def test_a_long_readout_logs_each_fold(caplog: pytest.LogCaptureFixture) -> None:
    """The ridge stage writes a progress line per fold under a ProgressLog."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = rng.standard_normal((60, 2, 16)).astype(np.float32)
    data = Dataset(name="Noise", train=Split(x, y), val=Split(x[:0], y[:0]), test=None,
                   class_names=["a", "b"], source="synthetic", location="memory")
    cfg = preset("default").replace({**TINY, "train.pretrain_epochs": 0, "data.cv_folds": 3})
    cfg, model = pipeline.build_for(data, cfg)
    with caplog.at_level(logging.INFO, logger="cbdtune.progress"):
        classify.fit_stage(model, classify.selection_pool(data, cfg), cfg,
                           Runtime(progress_log=True), "ridge", 2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "3/3" in text and text.count("eigenbasis") == 3, text
