"""The ridge readout: its head, its closed-form path, its stage in a trial and its saved form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from cbdtune import classify, pipeline, reports, ridge
from cbdtune.config import ModelConfig, preset
from cbdtune.data import Dataset, Split
from cbdtune.model import CBDClassifier, RidgeHead, build_model, build_ridge_head
from cbdtune.runtime import Runtime

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
    head = build_ridge_head(cfg, model.num_tokens)
    assert isinstance(head, RidgeHead) and head.n_stats == 6
    clf = CBDClassifier(model, head)
    # 3 depths x 16 channels x (mean, max, std + mean, max of 3 segments) + 2 x 3 levels
    assert clf.head.features(*clf.features(x)).shape == (5, 3 * 16 * (3 + 2 * 3) + 6)
    assert clf(x).shape == (5, 4)


def test_the_path_is_sklearns_ridge_at_every_alpha() -> None:
    rng = np.random.default_rng(0)
    z, targets = rng.standard_normal((30, 50)), rng.standard_normal((30, 3))
    z -= z.mean(axis=0)
    for alpha, w in zip(ridge.ALPHAS[::6], ridge.solutions(z, targets, ridge.ALPHAS[::6]),
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
    chosen = classify.fit_stage(model, pool, cfg, Runtime(), "ridge", 2)
    clf = classify.refit(model, data.train.x, data.train.y, cfg, Runtime(), "ridge",
                         chosen.epoch)
    rebuilt = build_model(cfg.model)
    again = CBDClassifier(rebuilt, build_ridge_head(cfg.model, rebuilt.num_tokens))
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


# ---- level columns that are rounding get weight 0; labels ignore the input's units -------------


def test_standardiser_drops_columns_constant_up_to_rounding() -> None:
    """Constant is relative: a spread of 3e-6 around 0 (a z-normalised archive's levels) and one
    of 1e-3 around 1e3 (float32 rounding there) are dropped; a spread of 1e-2 is read."""
    rng = np.random.default_rng(0)
    z = np.stack([3e-6 * rng.standard_normal(50), 1e3 + 1e-3 * rng.standard_normal(50),
                  1e-2 * rng.standard_normal(50), np.full(50, 7.0)], axis=1)
    center, inv_std = ridge._standardiser(z)
    assert np.array_equal(inv_std[[0, 1, 3]], np.zeros(3))
    np.testing.assert_allclose(inv_std[2], 1.0 / z[:, 2].std())
    np.testing.assert_allclose(center, z.mean(axis=0))


@pytest.mark.parametrize(("name", "kept"), [("gesture", 0), ("FingerMovements", 56)])
def test_standardiser_on_real_levels(shared_data_dir, name: str, kept: int) -> None:
    """gesture is z-normalised per series and channel: its 6 level columns spread by ~3e-6 (the
    archive's rounding) and get weight 0. FingerMovements' 56 are real levels and are read."""
    from cbdtune.config import DataConfig
    from cbdtune.data import load_dataset
    from cbdtune.model import series_stats

    ds = load_dataset(DataConfig(dataset=name, data_dir=str(shared_data_dir)), seed=0)
    stats = series_stats(torch.from_numpy(ds.train.x)).double().numpy()
    _, inv_std = ridge._standardiser(stats)
    assert int(np.count_nonzero(inv_std)) == kept
    if kept == 0:
        assert 0 < stats.std(axis=0).min() < 1e-5  # there is a spread, and it is rounding


def _gesture_subset(shared_data_dir) -> Dataset:
    from cbdtune.config import DataConfig
    from cbdtune.data import load_dataset

    ds = load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir)), seed=0)
    return Dataset(name=ds.name, train=ds.train, val=ds.val,
                   test=Split(ds.test.x[::8], ds.test.y[::8]), class_names=ds.class_names,
                   source=ds.source, location=ds.location)


@pytest.mark.parametrize("levels", [False, True])
@pytest.mark.parametrize("stage", ["ridge", "linear_probe"])
def test_saved_model_labels_ignore_the_inputs_units(shared_data_dir, tmp_path, one_torch_thread,
                                                    stage: str, levels: bool) -> None:
    """A saved smoke model on gesture (z-normalised: its levels are rounding) gives the same
    labels when the inputs are shifted by 1e-3 or scaled by 1e-3 or 1e3. The ridge is fit at a
    point that weighs the levels as much as the tokens (what CV picked on gesture before the
    levels were dropped there). Before: a 1e-3 shift moved about half of gesture's labels, and
    x 1e-3 under an absolute eps of 1e-5 about as many."""
    from cbdtune.serving import CBDEnsemble, save_model

    data = _gesture_subset(shared_data_dir)
    cfg = preset("smoke").replace({"model.level_features": levels, "train.classifier": stage,
                                   "train.num_threads": 1, "train.pretrain_epochs": 0})
    cfg, model = pipeline.build_for(data, cfg)
    if stage == "ridge":
        head = build_ridge_head(cfg.model, model.num_tokens)
        points = ridge.path(head)
        both = [i for i, (blend, _) in enumerate(points) if min(blend) > 0] or range(len(points))
        epochs = list(both)[len(both) // 2] + 1
    else:
        epochs = 20  # the smoke preset's head, on an untrained encoder: ~0.7 on these 40
    torch.manual_seed(0)
    clf = classify.refit(model, data.train.x, data.train.y, cfg, Runtime(), stage,
                         epochs)
    path = save_model(tmp_path / "model", [(cfg, clf.state_dict(), {"source": "test"})],
                      class_names=data.class_names, dataset=data.name)
    served = CBDEnsemble.load(path)
    x = data.test.x
    labels = served.predict(x)
    assert len(set(labels)) > 1, "a model that predicts one class tests nothing"
    for moved in (x + np.float32(1e-3), x * np.float32(1e-3), x * np.float32(1e3)):
        assert served.predict(moved) == labels


@pytest.mark.parametrize("n", [40, 400])  # kernel (n <= F = 84) and Gram (n > F) routes
def test_every_blend_of_the_path_is_sklearns_ridge_on_the_blended_columns(n: int) -> None:
    """One eigendecomposition per fold serves all blends: each point's held-out scores are
    scikit-learn's Ridge on the fold's standardised columns, each block times its weight."""
    head = RidgeHead(2, 8, 3, num_tokens=4, segments=1, n_stats=4)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((n, head.n_pooled + 4))
    z[:, -4:] = 3.0 * z[:, -4:] + 5.0
    y = rng.integers(0, 3, n)
    tr, va = np.arange(n * 3 // 4), np.arange(n * 3 // 4, n)
    out = ridge.path_outputs(head, z, y, tr, va, 3)
    center, inv_std = ridge._standardiser(z[tr])
    for i, (blend, alpha) in list(enumerate(ridge.path(head)))[::9]:
        weight = ridge._blended(head, inv_std, blend)
        ref = Ridge(alpha=alpha, solver="svd").fit((z[tr] - center) * weight,
                                                    2.0 * np.eye(3)[y[tr]] - 1.0)
        np.testing.assert_allclose(out[i], ref.predict((z[va] - center) * weight),
                                   rtol=1e-6, atol=1e-8)
