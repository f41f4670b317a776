"""The MiniRocket baseline: out-of-fold probabilities on the search's folds, refit, save/load."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cbdtune import baselines
from cbdtune.baselines import BaselineError, MiniRocketMember, minirocket_baseline
from cbdtune.config import CbdtuneError, DataConfig
from cbdtune.data import load_dataset, stratified_folds

ToyFit = tuple[np.ndarray, np.ndarray, baselines.OutOfFold, MiniRocketMember]
SMALL = 84 * 4  # kernels: enough features for the toy data, fast to fit


def _toy(n_per_class: int = 12, length: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two channels, three classes told apart by a sine's frequency in channel 0."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    t = np.linspace(0, 1, length)
    x = rng.normal(0, 0.3, (len(y), 2, length))
    x[:, 0] += np.sin(2 * np.pi * (1 + 2 * y[:, None]) * t[None] + rng.uniform(0, 6, (len(y), 1)))
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def toy_fit() -> ToyFit:
    x, y = _toy()
    oof, member = minirocket_baseline(x, y, stratified_folds(y, 3, 0), 3, seed=1, n_kernels=SMALL)
    return x, y, oof, member


def test_minirocket_oof_shape_and_rows_sum_to_one(toy_fit: ToyFit) -> None:
    x, y, oof, _ = toy_fit
    assert oof.proba.shape == (len(y), 3)
    np.testing.assert_allclose(oof.proba.sum(axis=1), 1.0, atol=1e-12)
    assert len(oof.fold_accuracy) == 3
    assert oof.alpha in baselines.ALPHAS and 1e-3 <= oof.temperature <= 1e3
    assert np.mean(oof.proba.argmax(axis=1) == y) >= 0.8  # the frequencies are easy to tell apart


def test_minirocket_temperature_beats_the_raw_scores(toy_fit: ToyFit) -> None:
    from cbdtune.ensemble import log_loss

    _, y, oof, _ = toy_fit
    assert log_loss(oof.proba, y) < log_loss(baselines.softmax(oof.scores), y)


def test_minirocket_leaves_global_numpy_random_alone() -> None:
    x, y = _toy(4, 20)
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    baselines.refit(x, y, 3, alpha=1.0, temperature=1.0, seed=7, n_kernels=84)
    assert np.random.random() == expected


def test_minirocket_save_load_round_trip_without_pickle(toy_fit: ToyFit, tmp_path: Path) -> None:
    x, _, _, member = toy_fit
    folder = member.save(tmp_path / "mr")
    assert sorted(p.name for p in folder.iterdir()) == [baselines.JSON, baselines.NPZ]
    with zipfile.ZipFile(folder / baselines.NPZ) as z:  # every entry a plain .npy array
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(folder / baselines.NPZ, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    assert json.loads((folder / baselines.JSON).read_text())["kind"] == "minirocket"
    loaded = baselines.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(x), member.predict_proba(x))


def test_minirocket_load_rejects_a_missing_array_with_one_line(toy_fit: ToyFit,
                                                               tmp_path: Path) -> None:
    _, _, _, member = toy_fit
    folder = member.save(tmp_path / "mr")
    with np.load(folder / baselines.NPZ, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "biases"}
    np.savez(folder / baselines.NPZ, **arrays)
    with pytest.raises(CbdtuneError, match="missing array\\(s\\) or setting\\(s\\) biases") as info:
        baselines.load(folder)
    assert "\n" not in str(info.value)


def test_minirocket_length_8_series_work(tmp_path: Path) -> None:
    x, y = _toy(6, 8, seed=2)
    oof, member = minirocket_baseline(x, y, stratified_folds(y, 2, 0), 3, seed=0, n_kernels=84)
    assert oof.proba.shape == (len(y), 3) and member.length == baselines.KERNEL_LENGTH
    p = baselines.load(member.save(tmp_path)).predict_proba(x)  # padded the same way
    np.testing.assert_array_equal(p, member.predict_proba(x))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_minirocket_rejects_other_lengths_and_bad_input(toy_fit: ToyFit) -> None:
    x, y, _, member = toy_fit
    with pytest.raises(BaselineError, match="fitted on"):
        member.predict_proba(x[:, :, :30])
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(BaselineError, match="NaN"):
        baselines.refit(bad, y, 3, alpha=1.0, temperature=1.0)
    folds = stratified_folds(y, 3, 0)
    with pytest.raises(BaselineError, match="leave"):
        baselines.out_of_fold(x, y, folds[:1], 3, n_kernels=84)


@pytest.mark.slow
def test_minirocket_gesture_refit_test_accuracy(shared_data_dir: Path) -> None:
    # MiniRocket reads ~93% on this split (results/selection_ridge_full.md: 93.38 over 5 seeds).
    ds = load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir)),
                      download=False)
    y = ds.train.y
    oof, member = minirocket_baseline(ds.train.x, y, stratified_folds(y, 5, 0), ds.n_classes)
    assert ds.test is not None
    test_acc = float(np.mean(member.predict_proba(ds.test.x).argmax(axis=1) == ds.test.y))
    assert test_acc > 0.85
    assert np.mean(oof.proba.argmax(axis=1) == y) > 0.8


@pytest.mark.parametrize("n", [15, 60])  # fewer rows than columns (N x N Gram) and more (F x F)
def test_ridge_path_matches_sklearn_ridge(n: int) -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(n)
    z, t = rng.normal(size=(n, 30)), rng.normal(size=(n, 3))
    for alpha, (w, b) in zip((0.01, 1.0, 100.0),
                             baselines._ridge_path(z, t, (0.01, 1.0, 100.0)), strict=True):
        ref = Ridge(alpha=alpha, solver="svd").fit(z, t)
        np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6, atol=1e-9)


def test_minirocket_univariate_round_trip(tmp_path: Path) -> None:
    x, y = _toy(6, 30, seed=3)
    x = x[:, :1]  # aeon transforms one channel by its own kernel loop
    member = baselines.refit(x, y, 3, alpha=1.0, temperature=0.5, n_kernels=84)
    p = baselines.load(member.save(tmp_path)).predict_proba(x)
    np.testing.assert_array_equal(p, member.predict_proba(x))
    assert np.mean(p.argmax(axis=1) == y) > 0.9  # training series, low regularisation
