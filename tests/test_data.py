"""Tests for cbdtune.data: real datasets, splits, length policy, downloads, and every bad input.

No test touches the network: downloads go to ``file://`` URLs in tmp_path, and an autouse fixture
makes any other URL fail the test.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cbdtune.config import DataConfig
from cbdtune.data import (
    DataError,
    Dataset,
    DatasetInfo,
    FileSpec,
    Split,
    _fetch,
    _registry,
    fetch,
    list_datasets,
    load_dataset,
    resolve,
)
from cbdtune.data.__main__ import main
from cbdtune.data._lengths import fix_length, pad_series, resample_series, to_length
from cbdtune.data._readers import read_ts
from cbdtune.data._splits import stratified_folds, stratified_split

PAPER_TEN = {"HAR", "PhonemeSpectra", "SelfRegulationSCP1", "MotorImagery", "FingerMovements",
             "ArticularyWordRecognition", "SpokenArabicDigits", "ECG5000", "FordB",
             "UWaveGestureLibraryAll"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private cache per test, no archive mirror, and only ``file://`` downloads."""
    monkeypatch.setenv("CBDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CBDTUNE_ARCHIVE_URL", raising=False)
    real_open = _fetch._urlopen

    def file_only(url: str, *args: object, **kwargs: object) -> object:
        if not url.startswith("file:"):
            raise AssertionError(f"a test tried to use the network: {url}")
        return real_open(url, *args, **kwargs)

    monkeypatch.setattr(_fetch, "_urlopen", file_only)


@pytest.fixture(scope="module")
def real(shared_data_dir: Path) -> Callable[..., Dataset]:
    """Load a dataset from the shared data once per module (parsing .ts costs ~0.2 s each)."""
    loaded: dict[tuple[str, int], Dataset] = {}

    def load(name: str, seed: int = 0) -> Dataset:
        if (name, seed) not in loaded:
            cfg = DataConfig(dataset=name, data_dir=str(shared_data_dir), cv_folds=0)
            loaded[name, seed] = load_dataset(cfg, seed=seed, download=False)
        return loaded[name, seed]

    return load


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from {lines[0]!r}"


# A tiny two-channel .ts dataset; the first case is on line 7.
TOY_HEADER = """@problemName Toy
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true a b
@data
"""
TOY_TRAIN = "1,2,3:4,5,6:a\n2,3,4:5,6,7:a\n3,4,5:6,7,8:b\n4,5,6:7,8,9:b\n"
TOY_TEST = "1,2,3:4,5,6:a\n4,5,6:7,8,9:b\n"


def _toy(tmp_path: Path, train: str = TOY_HEADER + TOY_TRAIN, test: str = TOY_HEADER + TOY_TEST,
         name: str = "Toy") -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / f"{name}_TRAIN.ts").write_text(train)
    (folder / f"{name}_TEST.ts").write_text(test)
    return folder


def _save_pt(folder: Path, split: str, obj: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / f"{split}.pt")


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


# ---- real datasets ------------------------------------------------------------------------------

PUBLISHED = [  # name, canonical, archive train, test, C, L, K, train/test counts of class 0
    ("gesture", "UWaveGestureLibrary", 120, 320, 3, 315, 8, 15, 40),
    ("ArticularyWordRecognition", "ArticularyWordRecognition", 275, 300, 9, 144, 25, 11, 12),
    ("FingerMovements", "FingerMovements", 316, 100, 28, 50, 2, 159, 49),
]


@pytest.mark.parametrize("name,canonical,n_train,n_test,c,length,k,train0,test0", PUBLISHED)
def test_load_dataset_real_has_published_shapes(real: Callable[..., Dataset], name: str,
                                                canonical: str, n_train: int, n_test: int, c: int,
                                                length: int, k: int, train0: int,
                                                test0: int) -> None:
    """UEA files in ../shared/data load with their published sizes, shapes and class counts."""
    ds = real(name)
    assert ds.name == canonical
    assert (len(ds.train) + len(ds.val), len(ds.test)) == (n_train, n_test)
    assert (ds.n_channels, ds.seq_len, ds.n_classes) == (c, length, k)
    for split in ds.splits().values():
        assert split.x.dtype == np.float32 and split.x.flags.c_contiguous
        assert split.y.dtype == np.int64
        assert np.isfinite(split.x).all()
    archive_train = np.concatenate([ds.train.y, ds.val.y])
    assert np.bincount(archive_train, minlength=k)[0] == train0
    assert ds.test.class_counts(k)[0] == test0
    info = resolve(name)  # the registry's published facts agree with the files
    assert (info.n_channels, info.seq_len, info.n_classes, info.n_train, info.n_test) == (
        c, length, k, n_train, n_test)


def test_load_dataset_keeps_original_class_names(real: Callable[..., Dataset]) -> None:
    """Labels follow the header's @classLabel order; class_names keeps the strings."""
    assert real("FingerMovements").class_names == ["left", "right"]
    assert real("gesture").class_names == [f"{i}.0" for i in range(1, 9)]


def test_registry_sha256_matches_shared_files(shared_data_dir: Path) -> None:
    """The sha256 values copied from SOURCE.md match the shared files (guards typos)."""
    checked = 0
    for info in list_datasets():
        for spec in info.files:
            if spec.sha256 is None:
                continue
            folder = _fetch.find_in(info, shared_data_dir)
            assert folder is not None, f"{info.name} not in {shared_data_dir}"
            digest = hashlib.sha256((folder / spec.name).read_bytes()).hexdigest()
            assert digest == spec.sha256, f"{info.name}/{spec.name}"
            checked += 1
    assert checked == 11


def test_load_dataset_tfc_gesture_by_path(shared_data_dir: Path) -> None:
    """A TF-C folder given by path uses its own val split; float labels become int64."""
    ds = load_dataset(DataConfig(dataset=str(shared_data_dir / "TFC_Gesture"), cv_folds=0))
    assert ds.val_origin == "archive"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (320, 120, 120)
    assert (ds.n_channels, ds.seq_len, ds.n_classes) == (3, 206, 8)
    assert ds.class_names == [str(i) for i in range(8)]
    assert ds.train.y.dtype == np.int64 and (ds.train.class_counts(8) == 40).all()


def test_load_dataset_epilepsy_tfc_by_path_has_no_test(shared_data_dir: Path) -> None:
    """A TF-C folder without test.pt loads with test None."""
    ds = load_dataset(DataConfig(dataset=str(shared_data_dir / "Epilepsy_TFC"), cv_folds=0))
    assert ds.test is None
    assert (len(ds.train), len(ds.val), ds.n_channels, ds.seq_len, ds.n_classes) == (
        60, 20, 1, 178, 2)


def test_load_dataset_tfc_by_alias_from_data_dir(shared_data_dir: Path) -> None:
    """A registered TF-C folder is also found by alias in the data dir."""
    ds = load_dataset(DataConfig(dataset="epilepsy", data_dir=str(shared_data_dir)),
                      download=False)
    assert Path(ds.location) == shared_data_dir / "Epilepsy_TFC"


# ---- registry -----------------------------------------------------------------------------------


def test_list_datasets_has_gesture_and_paper_ten() -> None:
    names = {info.name for info in list_datasets()}
    assert PAPER_TEN | {"UWaveGestureLibrary"} <= names


def test_resolve_alias_is_case_insensitive() -> None:
    assert resolve("AWR").name == "ArticularyWordRecognition"
    assert resolve("Gesture").name == "UWaveGestureLibrary"


def test_resolve_other_archive_name() -> None:
    """A UEA/UCR name outside the registry resolves, with the archive's spelling."""
    info = resolve("basicmotions")
    assert (info.name, info.kind) == ("BasicMotions", "uea")


def test_resolve_unknown_name_suggests_closest() -> None:
    with pytest.raises(DataError, match="did you mean gesture"):
        resolve("gestrue")


# ---- splits -------------------------------------------------------------------------------------


def test_stratified_split_keeps_class_proportions() -> None:
    """Each class gives round(n * fraction) to val, at least one to each side when n >= 2."""
    y = np.repeat([0, 1, 2, 3, 4], [50, 30, 20, 2, 1])
    train_idx, val_idx = stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[val_idx], minlength=5).tolist() == [10, 6, 4, 1, 0]
    assert np.bincount(y[train_idx], minlength=5).tolist() == [40, 24, 16, 1, 1]
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(len(y)))


def test_stratified_split_same_seed_same_split_other_seed_differs() -> None:
    y = np.repeat(np.arange(4), 25)
    a, b, c = (stratified_split(y, 0.2, seed=s)[1] for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_load_dataset_val_split_reproducible_by_seed(shared_data_dir: Path,
                                                     real: Callable[..., Dataset]) -> None:
    """Same seed, same validation series; another seed, others; class proportions kept."""
    ds0, ds1 = real("gesture", 0), real("gesture", 1)
    again = load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir), cv_folds=0),
                         seed=0)
    assert np.array_equal(ds0.val.x, again.val.x) and np.array_equal(ds0.val.y, again.val.y)
    assert not np.array_equal(ds0.val.x, ds1.val.x)
    assert (ds0.val.class_counts(8) == 3).all() and (ds0.train.class_counts(8) == 12).all()


def test_stratified_folds_are_stratified_disjoint_and_cover_train() -> None:
    """Within each repeat the held-out parts are disjoint and cover every index once, each
    fold's train part is the rest, and every class is spread evenly (gesture: 15 per class)."""
    y = np.repeat(np.arange(8), 15)
    folds = stratified_folds(y, 5, seed=0, repeats=2)
    assert len(folds) == 10
    for r in range(2):
        held = np.concatenate([va for _, va in folds[5 * r:5 * r + 5]])
        assert sorted(held.tolist()) == list(range(120))
    for tr, va in folds:
        assert not set(tr.tolist()) & set(va.tolist())
        assert len(tr) + len(va) == 120
        assert (np.bincount(y[va], minlength=8) == 3).all()
    assert not np.array_equal(folds[0][1], folds[5][1]), "a repeat must reshuffle"
    again = stratified_folds(y, 5, seed=0, repeats=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_stratified_folds_lower_k_to_the_largest_class() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    folds = stratified_folds(y, 5, seed=0)
    assert len(folds) == 3
    assert sorted(np.concatenate([va for _, va in folds]).tolist()) == list(range(6))


def test_cross_validation_merges_an_archive_val_split_into_train(shared_data_dir: Path) -> None:
    """Under CV (the default) there is no validation split: train holds every labelled series."""
    ds = load_dataset(DataConfig(dataset=str(shared_data_dir / "TFC_Gesture")))
    assert (ds.val_origin, len(ds.train), len(ds.val)) == ("none", 440, 0)
    ds = load_dataset(DataConfig(dataset="gesture", data_dir=str(shared_data_dir)))
    assert (ds.val_origin, len(ds.train), len(ds.val)) == ("none", 120, 0)


# ---- length and NaN policy ----------------------------------------------------------------------


def test_pad_series_repeats_last_valid_value() -> None:
    x = np.array([[1.0, 2.0, np.nan], [4.0, np.nan, np.nan]])
    np.testing.assert_array_equal(pad_series(x, 5), [[1, 2, 2, 2, 2], [4, 4, 4, 4, 4]])


def test_resample_series_interpolates_linearly() -> None:
    x = np.array([[0.0, 2.0], [1.0, np.nan]])
    np.testing.assert_allclose(resample_series(x, 5), [[0, 0.5, 1, 1.5, 2], [1, 1, 1, 1, 1]])


def test_to_length_pad_cuts_longer_and_pads_shorter() -> None:
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, np.nan, np.nan]])
    cut = to_length(x, 3, "pad")
    assert cut.dtype == np.float64 and cut.shape == (2, 3)
    np.testing.assert_array_equal(cut, [[1, 2, 3], [5, 6, 6]])  # first 3 steps, trailing NaN filled
    np.testing.assert_array_equal(to_length(x, 6, "pad"), [[1, 2, 3, 4, 4, 4], [5, 6, 6, 6, 6, 6]])
    same = np.array([[1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_length(same, 2, "pad"), same)


def test_to_length_resample_interpolates_both_ways() -> None:
    x = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(to_length(x, 3, "resample"), [[0, 2, 4]])
    np.testing.assert_allclose(to_length(x[:, :3], 5, "resample"), [[0, 0.5, 1, 1.5, 2]])
    np.testing.assert_array_equal(to_length(x, 5, "resample"), x)


@pytest.mark.parametrize(("x", "length", "policy"), [
    (np.zeros((1, 3)), 2, "evil"), (np.zeros((1, 3)), 0, "pad"), (np.zeros(3), 2, "pad")])
def test_to_length_refuses_bad_arguments(x: np.ndarray, length: int, policy: str) -> None:
    with pytest.raises(DataError):
        to_length(x, length, policy)  # type: ignore[arg-type]


VARIABLE_HEADER = (
    "@problemName Var\n@dimensions 2\n@equalLength false\n@classLabel true a b\n@data\n")


def test_fix_length_variable_length_pad_and_resample(tmp_path: Path) -> None:
    """Train and test reach train's longest length (a longer test series is cut under pad,
    resampled under resample); inner NaN -> 0 under pad."""
    folder = _toy(tmp_path, name="Var",
                  train=VARIABLE_HEADER + "1,2,3:1,1,1:a\n1,NaN,3,4:3,3,3,3:b\n5,6:?,?:b\n",
                  test=VARIABLE_HEADER + "1,2,3,4,5:1,2,3,4,5:a\n")
    parts = [read_ts(folder / "Var_TRAIN.ts"), read_ts(folder / "Var_TEST.ts")]
    train, test = fix_length(parts, "pad")
    assert train.shape == (3, 2, 4) and test.shape == (1, 2, 4)  # L: train's longest, not test's
    np.testing.assert_array_equal(train[0], [[1, 2, 3, 3], [1, 1, 1, 1]])
    np.testing.assert_array_equal(train[1], [[1, 0, 3, 4], [3, 3, 3, 3]])
    np.testing.assert_array_equal(train[2], [[5, 6, 6, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(test[0], [[1, 2, 3, 4], [1, 2, 3, 4]])  # cut to the first 4
    train, test = fix_length(parts, "resample")
    np.testing.assert_allclose(train[0, 0], [1, 1 + 2 / 3, 2 + 1 / 3, 3])
    np.testing.assert_allclose(train[1, 0], [1, 2, 3, 4])  # the inner NaN interpolated
    np.testing.assert_array_equal(train[2, 1], 0)
    np.testing.assert_allclose(test[0, 0], [1, 1 + 4 / 3, 1 + 8 / 3, 5])  # 5 steps onto 4


def test_fix_length_counts_val_as_training_only_when_asked(tmp_path: Path) -> None:
    """n_train=2: a longer val split sets L (it joins train); n_train=1: it is cut to train's L."""
    folder = _toy(tmp_path, name="Var", train=VARIABLE_HEADER + "1,2:1,1:a\n",
                  test=VARIABLE_HEADER + "1,2,3:4,5,6:b\n")
    parts = [read_ts(folder / "Var_TRAIN.ts"), read_ts(folder / "Var_TEST.ts")]
    assert [a.shape[2] for a in fix_length(parts, "pad", n_train=2)] == [3, 3]
    assert [a.shape[2] for a in fix_length(parts, "pad", n_train=1)] == [2, 2]


def test_load_dataset_tfc_val_sets_length_only_under_cv(tmp_path: Path) -> None:
    """A TF-C val.pt joins train under cross-validation, so its length counts there; with
    cv_folds 0 it is a held-out split and is cut like test."""
    folder = tmp_path / "tfc"
    _save_pt(folder, "train", {"samples": torch.ones(4, 1, 5), "labels": torch.tensor([0, 0, 1, 1])})
    val = torch.arange(16.0).reshape(2, 1, 8)
    _save_pt(folder, "val", {"samples": val, "labels": torch.tensor([0, 1])})
    _save_pt(folder, "test", {"samples": torch.ones(2, 1, 9), "labels": torch.tensor([0, 1])})
    cv = load_dataset(DataConfig(dataset=str(folder), cv_folds=2))
    assert cv.seq_len == 8 and cv.test.x.shape == (2, 1, 8)
    held_out = load_dataset(DataConfig(dataset=str(folder), cv_folds=0))
    assert held_out.seq_len == 5
    np.testing.assert_array_equal(held_out.val.x, val[:, :, :5].numpy())


@pytest.mark.parametrize("policy", ["pad", "resample"])
def test_load_dataset_japanese_vowels_length_is_the_longest_training_series(
        shared_data_dir: Path, policy: str) -> None:
    """JapaneseVowels: train series are 7..26 steps, test 7..29; the model's length is 26 and
    each longer test series is cut (pad) or resampled onto 26 steps, as serving does."""
    folder = shared_data_dir / "UEA_JapaneseVowels"
    raw_test = read_ts(folder / "JapaneseVowels_TEST.ts")
    ds = load_dataset(DataConfig(dataset="JapaneseVowels", data_dir=str(shared_data_dir),
                                 length_policy=policy, cv_folds=0), download=False)
    assert ds.seq_len == 26 and ds.test.x.shape == (370, 12, 26)
    longer = [i for i, case in enumerate(raw_test.cases) if case.shape[1] > 26]
    assert longer, "the test split has series longer than train's longest"
    for i in longer:
        expected = to_length(raw_test.cases[i].astype(np.float64), 26, policy)
        np.testing.assert_array_equal(ds.test.x[i], expected.astype(np.float32))
    if policy == "pad":
        np.testing.assert_array_equal(ds.test.x[longer[0]], raw_test.cases[longer[0]][:, :26])


def test_load_dataset_nan_padded_series_end_to_end(tmp_path: Path) -> None:
    """Trailing NaN padding is dropped and padded by policy; no NaN reaches the arrays."""
    header = TOY_HEADER.replace("@seriesLength 3", "@seriesLength 4")
    train = header + ("1,2,3,4:1,1,1,1:a\n1,2,NaN,NaN:2,2,NaN,NaN:a\n"
                      "1,2,3,4:1,1,1,1:b\n5,6,7,8:1,1,1,1:b\n")
    folder = _toy(tmp_path, train=train, test=header + "1,2,3,4:1,1,1,1:a\n")
    for policy in ("pad", "resample"):
        ds = load_dataset(DataConfig(dataset=str(folder), length_policy=policy))
        assert ds.seq_len == 4
        assert all(np.isfinite(s.x).all() for s in ds.splits().values())


# ---- downloads and the cache --------------------------------------------------------------------


def test_fetch_archive_zip_into_cache_with_checksum(shared_data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """zip -> cache, sha256 checked, then loaded from the cache when no data dir has it."""
    source = shared_data_dir / "UEA_FingerMovements"
    _zip(tmp_path / "FingerMovements.zip", {  # nested, as some archive zips are
        f"FingerMovements/{f}": (source / f).read_bytes()
        for f in ("FingerMovements_TRAIN.ts", "FingerMovements_TEST.ts")})
    monkeypatch.setenv("CBDTUNE_ARCHIVE_URL", tmp_path.as_uri() + "/{name}.zip")
    code, out, _ = _cli(capsys, "fetch", "fingers")
    cached = tmp_path / "cache" / "FingerMovements"
    assert code == 0 and str(cached) in out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["FingerMovements"]
    empty = tmp_path / "empty"
    empty.mkdir()
    ds = load_dataset(DataConfig(dataset="fm", data_dir=str(empty)), download=False)
    assert Path(ds.location) == cached and len(ds.test) == 100


def test_fetch_pinned_files_then_reuses_cache(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Registry entries with per-file URLs are downloaded once, checked, and then reused."""
    remote = tmp_path / "remote"
    _save_pt(remote, "train", {"samples": torch.arange(96.0).reshape(6, 2, 8),
                               "labels": torch.tensor([0, 1] * 3)})
    _save_pt(remote, "val", {"samples": torch.arange(32.0).reshape(2, 2, 8),
                             "labels": torch.tensor([0, 1])})
    files = tuple(FileSpec(f"{s}.pt", hashlib.sha256((remote / f"{s}.pt").read_bytes()).hexdigest(),
                           (remote / f"{s}.pt").as_uri()) for s in ("train", "val"))
    info = DatasetInfo(name="Tiny", kind="tf-c", format="pt", files=files, download="files")
    monkeypatch.setitem(_registry.REGISTRY, "Tiny", info)
    ds = load_dataset(DataConfig(dataset="tiny", cv_folds=0))  # not local, not cached: fetched
    assert Path(ds.location) == tmp_path / "cache" / "Tiny"
    assert (len(ds.train), len(ds.val), ds.test) == (6, 2, None)
    calls: list[str] = []
    monkeypatch.setattr(_fetch, "_urlopen", lambda url, **kw: calls.append(url))
    assert fetch(info) == tmp_path / "cache" / "Tiny" and calls == []


# ---- bad input: one line on stderr, exit code 2 -------------------------------------------------


def test_cli_unknown_name_suggests_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "info", "gestrue")
    _assert_one_error_line(code, err, "unknown dataset 'gestrue'", "did you mean gesture")


def test_cli_files_not_found_says_where_and_how(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "info", "FingerMovements", "--data-dir", str(tmp_path),
                        "--no-download")
    _assert_one_error_line(code, err, "files not found", str(tmp_path), str(tmp_path / "cache"),
                           "python -m cbdtune.data fetch FingerMovements")


def test_cli_files_not_found_without_download_says_how_to_get(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "info", "har", "--data-dir", str(tmp_path))
    _assert_one_error_line(code, err, "HAR: files not found", str(tmp_path), "TS-TCC")


def test_cli_download_failure_says_where_it_looked(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CBDTUNE_ARCHIVE_URL", tmp_path.as_uri() + "/absent/{name}.zip")
    code, _, err = _cli(capsys, "info", "ecg", "--data-dir", str(tmp_path))
    _assert_one_error_line(code, err, "ECG5000: files not found", "could not download")


def test_cli_incomplete_folder_names_missing_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "FingerMovements"
    folder.mkdir()
    (folder / "FingerMovements_TRAIN.ts").write_text(TOY_HEADER + TOY_TRAIN)
    code, _, err = _cli(capsys, "info", "fingers", "--data-dir", str(tmp_path))
    _assert_one_error_line(code, err, "but not FingerMovements_TEST.ts")


def test_cli_corrupt_ts_line_gives_line_number(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = _toy(tmp_path, train=TOY_HEADER + "1,2,3:4,5,6:a\n1,abc,3:4,5,6:a\n")
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TRAIN.ts:8:", "channel 1, value 2", "'abc'")


def test_cli_non_utf8_ts_names_the_line_of_the_bad_bytes(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Bad bytes on line 15 (a case; the header is lines 1-6) are reported at line 15, not 1."""
    cases = [f"{i},2,3:4,5,6:{'ab'[i % 2]}\n".encode() for i in range(20)]
    cases[8] = b"1,2,3:4,\xff\xfe5,6:a\n"  # line 7 + 8
    folder = _toy(tmp_path)
    (folder / "Toy_TRAIN.ts").write_bytes(TOY_HEADER.encode() + b"".join(cases))
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TRAIN.ts:15:", "not UTF-8", "0xff at column 9")
    with pytest.raises(DataError, match=r"Toy_TRAIN\.ts:15: not UTF-8"):
        read_ts(folder / "Toy_TRAIN.ts")


@pytest.mark.parametrize("given", ["folder", "data_dir", "cache"])
def test_corrupt_ts_hint_fits_where_the_file_was(tmp_path: Path, given: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A folder given by path or a data folder: name the file expected there (re-fetching into
    the cache would not replace it); a registry dataset read from the cache: the fetch command."""
    monkeypatch.setitem(_registry.REGISTRY, "Toy", DatasetInfo(name="Toy", kind="uea"))
    monkeypatch.delenv("CBDTUNE_DATA_DIR", raising=False)
    root = tmp_path / ("cache" if given == "cache" else "data")
    folder = _toy(root, train=TOY_HEADER + "1,2,3:4,5,6:a\n1,abc,3:4,5,6:a\n")
    argv = {"folder": [str(folder)], "data_dir": ["toy", "--data-dir", str(root)],
            "cache": ["toy"]}[given]
    code, _, err = _cli(capsys, "info", *argv)
    hint = ("re-fetch the file (python -m cbdtune.data fetch Toy --force)" if given == "cache"
            else f"put a whole copy of Toy_TRAIN.ts in {folder}")
    _assert_one_error_line(code, err, "Toy_TRAIN.ts:8:", "'abc'", f"{hint} or fix that line")
    assert ("fetch" in err) == (given == "cache")
    # a user's file read on its own (cbdtune.predict) gets the folder hint too
    with pytest.raises(DataError, match="put a whole copy of Toy_TRAIN.ts in "):
        read_ts(folder / "Toy_TRAIN.ts")


def test_cli_corrupt_ts_line_wrong_channel_count(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = _toy(tmp_path, test=TOY_HEADER + "1,2,3:4,5,6:a\n1,2,3:a\n")
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TEST.ts:8:", "1 channels but earlier cases have 2")


def test_cli_checksum_mismatch_leaves_cache_empty(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _zip(tmp_path / "FingerMovements.zip", {"FingerMovements_TRAIN.ts": TOY_HEADER + TOY_TRAIN,
                                            "FingerMovements_TEST.ts": TOY_HEADER + TOY_TEST})
    monkeypatch.setenv("CBDTUNE_ARCHIVE_URL", tmp_path.as_uri() + "/{name}.zip")
    code, _, err = _cli(capsys, "fetch", "FingerMovements")
    _assert_one_error_line(code, err, "FingerMovements_TRAIN.ts: checksum mismatch",
                           "fetch FingerMovements --force")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial copy, no temp folder


def test_cli_download_not_a_zip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ECG5000.zip").write_text("<html>not found</html>")
    monkeypatch.setenv("CBDTUNE_ARCHIVE_URL", tmp_path.as_uri() + "/{name}.zip")
    code, _, err = _cli(capsys, "fetch", "ECG5000")
    _assert_one_error_line(code, err, "not a zip file")


@pytest.mark.parametrize("obj,needle", [
    ({"samples": torch.zeros(4, 1, 8)}, "missing key(s) 'labels'"),
    ({"samples": torch.zeros(4, 1, 8), "labels": torch.zeros(3)}, "'labels' has shape [3]"),
    ({"samples": torch.zeros(4, 1, 8, 2), "labels": torch.zeros(4)}, "'samples' has shape"),
    ({"samples": torch.zeros(4, 1, 8), "labels": torch.tensor([0, 0.5, 1, 1])},
     "not a whole number"),
    ([1, 2, 3], "not a dict"),
])
def test_cli_bad_pt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], obj: object,
                         needle: str) -> None:
    folder = tmp_path / "tfc"
    _save_pt(folder, "train", obj)
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "train.pt", needle)


def test_cli_label_absent_from_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _toy(tmp_path, test=TOY_HEADER + "1,2,3:4,5,6:a\n1,2,3:4,5,6:c\n")
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TEST.ts:8:", "label 'c' is not in the header's "
                           "@classLabel list (a b)")


def test_cli_train_test_channel_mismatch(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    test = TOY_HEADER.replace("@dimensions 2", "@dimensions 3") + "1,2,3:4,5,6:7,8,9:a\n"
    folder = _toy(tmp_path, test=test)
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TEST.ts has 3 channels but", "Toy_TRAIN.ts has 2")


def test_cli_all_nan_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _toy(tmp_path, train=TOY_HEADER + TOY_TRAIN + "NaN,?,NaN:?,?,?:b\n")
    code, _, err = _cli(capsys, "info", str(folder))
    _assert_one_error_line(code, err, "Toy_TRAIN.ts:11:", "all NaN")


def test_cli_debug_raises_instead(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        main(["--debug", "info", "gestrue"])


# ---- the command line on good input -------------------------------------------------------------


def test_cli_info_gesture_prints_published_facts(shared_data_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """What `CBDTUNE_DATA_DIR=../shared/data python -m cbdtune.data info gesture` prints."""
    code, out, _ = _cli(capsys, "info", "gesture", "--data-dir", str(shared_data_dir))
    assert code == 0
    for needle in ("UWaveGestureLibrary", "120 train / 320 test", "96 train / 24 val",
                   "channels:  3", "length:    315", "classes:   8", "location:  "):
        assert needle in out


def test_cli_list_shows_registry(shared_data_dir: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "list", "--data-dir", str(shared_data_dir))
    assert code == 0
    assert all(name in out for name in PAPER_TEN)
    assert "gesture" in out


def test_cli_toy_folder_info_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "info", str(_toy(tmp_path)), "--val-fraction", "0.5")
    assert code == 0 and "archive 4 train / 2 test" in out and "2 train / 2 val" in out


# ---- Split and Dataset invariants ---------------------------------------------------------------


def test_split_converts_to_float32_contiguous() -> None:
    split = Split(np.ones((4, 3, 2), dtype=np.float64).transpose(0, 2, 1), np.arange(4))
    assert split.x.dtype == np.float32 and split.x.flags.c_contiguous and len(split) == 4


def test_dataset_rejects_splits_of_different_shape() -> None:
    a = Split(np.zeros((2, 1, 5)), np.array([0, 1]))
    b = Split(np.zeros((2, 1, 6)), np.array([0, 1]))
    with pytest.raises(DataError, match="same shape"):
        Dataset("x", a, b, None, ["0", "1"], "", "")


def test_data_error_is_one_line() -> None:
    assert str(DataError("a\nb   c")) == "a b c"


def test_read_ts_accepts_crlf_and_comments(tmp_path: Path) -> None:
    """A CRLF file with comments parses like an LF one."""
    folder = _toy(tmp_path, train=("# c\n" + TOY_HEADER + TOY_TRAIN).replace("\n", "\r\n"))
    part = read_ts(folder / "Toy_TRAIN.ts")
    assert len(part) == 4 and part.lines[0] == 8 and part.labels.tolist() == [0, 0, 1, 1]


def test_archive_url_accepts_template_or_base(monkeypatch: pytest.MonkeyPatch) -> None:
    info = resolve("ECG5000")
    assert info.archive_url == "https://timeseriesclassification.com/aeon-toolkit/ECG5000.zip"
    monkeypatch.setenv("CBDTUNE_ARCHIVE_URL", "file:///mirror/")
    assert info.archive_url == "file:///mirror/ECG5000.zip"


def _cut_gesture(tmp_path: Path, shared_data_dir: Path, keep: Callable[[int], int]) -> Path:
    """A copy of gesture whose TRAIN.ts keeps ``keep(n)`` of its n data lines (a cut at a line
    boundary: the file still parses)."""
    folder = tmp_path / "data" / "UWaveGestureLibrary"
    folder.mkdir(parents=True)
    src = shared_data_dir / "UWaveGestureLibrary"
    (folder / "UWaveGestureLibrary_TEST.ts").write_bytes(
        (src / "UWaveGestureLibrary_TEST.ts").read_bytes())
    lines = (src / "UWaveGestureLibrary_TRAIN.ts").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
    n = len(lines) - start
    (folder / "UWaveGestureLibrary_TRAIN.ts").write_text("".join(lines[:start + keep(n)]))
    return folder.parent


@pytest.mark.parametrize(("keep", "message"), [
    (lambda n: n // 2, r"no training series of class\(es\) 5.0, 6.0, 7.0, 8.0 \(4 of 8\)"),
    (lambda n: n - 1, "119 series, but UWaveGestureLibrary's train split has 120"),
])
@pytest.mark.parametrize("where", ["data_dir", "cache"])
def test_registry_dataset_cut_at_a_line_boundary_fails_loudly(
        tmp_path: Path, shared_data_dir: Path, keep: Callable[[int], int], message: str,
        where: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut in half, gesture's train file loaded silently with 4 of its 8 classes. The hint fits
    where the file was: a data folder comes before the cache, so only a cached copy is re-fetched."""
    data_dir = _cut_gesture(tmp_path, shared_data_dir, keep)
    argv = ["--data-dir", str(data_dir)]
    hint = f"put a whole copy of UWaveGestureLibrary_TRAIN.ts in {data_dir / 'UWaveGestureLibrary'}"
    if where == "cache":
        data_dir = data_dir.rename(tmp_path / "cache")
        monkeypatch.delenv("CBDTUNE_DATA_DIR", raising=False)
        argv, hint = [], "python -m cbdtune.data fetch UWaveGestureLibrary --force"
    with pytest.raises(DataError, match=message) as err:
        load_dataset(DataConfig(dataset="gesture", data_dir=argv[1] if argv else None))
    assert "UWaveGestureLibrary_TRAIN.ts" in str(err.value)
    assert hint in str(err.value)
    assert (where == "cache") == ("fetch" in str(err.value))
    # the command line: one line, exit 2
    capsys.readouterr()
    assert main(["info", "gesture", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "series" in err[0]


def test_folder_with_a_class_missing_from_train_fails_loudly(tmp_path: Path) -> None:
    train = TOY_HEADER + TOY_TRAIN.replace(":b\n", ":a\n")  # every series of class b relabelled
    folder = _toy(tmp_path, train=train)
    with pytest.raises(DataError, match=r"no training series of class\(es\) b \(1 of 2\)"):
        load_dataset(DataConfig(dataset=str(folder)))
