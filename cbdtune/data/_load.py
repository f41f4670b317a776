"""``load_dataset``: name -> files -> arrays -> one length -> labels 0..K-1 -> train/val/test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbdtune.config import DataConfig
from cbdtune.data._dataset import DataError, Dataset, Split, ValOrigin
from cbdtune.data._fetch import cache_dir, locate
from cbdtune.data._lengths import fix_length
from cbdtune.data._readers import RawSplit, read_pt, read_ts
from cbdtune.data._registry import DatasetInfo, check_loaded, resolve
from cbdtune.data._splits import stratified_split


def load_dataset(cfg: DataConfig, *, seed: int = 0, download: bool = True) -> Dataset:
    """Load a dataset as float32 [N, C, L] splits with int64 labels 0..K-1.

    Files come from ``cfg.data_dir`` (else ``$CBDTUNE_DATA_DIR``), else the cache, else a download
    (see :mod:`cbdtune.data._fetch`). Series are brought to one length, the longest TRAINING
    series, by ``cfg.length_policy``; a longer test (or held-out val) series is cut or resampled
    to it (see :mod:`cbdtune.data._lengths`). Labels follow the header's ``@classLabel`` order for
    ``.ts`` and ascending value for ``.pt``; ``class_names`` keeps the originals.

    With ``cfg.cv_folds > 0`` (the default) there is no validation split: ``train`` holds every
    training series (an archive's own ``val.pt`` included) and the pipeline cross-validates on
    it. With ``cfg.cv_folds = 0`` the validation split is the archive's own where it has one
    (HAR, TF-C ``val.pt``); otherwise it is carved from train, stratified by class, with
    ``cfg.val_fraction`` and ``seed``.

    Args:
        cfg: the dataset name, alias, archive name or folder path, and the options above.
        seed: seeds the validation split (``numpy.random.default_rng``); same seed, same split.
        download: allow a download when the files are neither local nor cached.

    Returns:
        The :class:`Dataset`.

    Raises:
        DataError: unknown name, files not found, a corrupt file (with file and line), labels
            outside the header's class list, splits with different channel counts, an all-NaN
            series, or a train split too small to carve a validation split from.

    Example:
        >>> ds = load_dataset(DataConfig(dataset="gesture"), seed=0)  # doctest: +SKIP
        >>> ds.train.x.shape, ds.test.x.shape  # doctest: +SKIP
        ((96, 3, 315), (320, 3, 315))
    """
    info = resolve(cfg.dataset)
    folder = Path(info.path) if info.path is not None else locate(info, cfg.data_dir,
                                                                  download=download)
    fetch_name = info.name if _fetched(info, folder) else None  # else: a hint names the folder
    if info.format == "ts":
        parts, class_names = _read_ts_pair(info, folder, fetch_name)
        names: tuple[str, ...] = ("train", "test")
    else:
        parts, names, class_names = _read_pt_folder(folder)
    read = dict(zip(names, parts, strict=True))
    check_loaded(info, read, class_names, fetch_name=fetch_name)
    # The model's length comes from the training series alone: train, and an archive's val
    # where cross-validation folds it into train (see _train_and_val); never the test split.
    n_train = 2 if cfg.cv_folds and names[:2] == ("train", "val") else 1
    arrays = dict(zip(names, fix_length(parts, cfg.length_policy, n_train=n_train),
                      strict=True))
    splits = {name: Split(arrays[name], read[name].labels) for name in names}
    train, val, val_origin = _train_and_val(splits, cfg, seed, folder)
    return Dataset(name=info.name, train=train, val=val, test=splits.get("test"),
                   class_names=class_names, source=info.source, location=str(folder),
                   val_origin=val_origin)


def _train_and_val(splits: dict[str, Split], cfg: DataConfig, seed: int,
                   folder: Path) -> tuple[Split, Split, ValOrigin]:
    """The training and validation splits, and where the validation split comes from."""
    train = splits["train"]
    if cfg.cv_folds:  # cross-validation runs on every training series, the archive's val too
        if "val" in splits:
            train = Split(np.concatenate([train.x, splits["val"].x]),
                          np.concatenate([train.y, splits["val"].y]))
        return train, Split(train.x[:0], train.y[:0]), "none"
    if "val" in splits:
        return train, splits["val"], "archive"
    train_idx, val_idx = stratified_split(train.y, cfg.val_fraction, seed)
    if val_idx.size == 0:
        raise DataError(f"{folder}: train has no class with two or more series, so no "
                        f"validation split can be carved from it; add a val split")
    return (Split(train.x[train_idx], train.y[train_idx]),
            Split(train.x[val_idx], train.y[val_idx]), "carved")


def _fetched(info: DatasetInfo, folder: Path) -> bool:
    """``folder`` is a registry dataset's copy in the cache, where ``fetch NAME --force`` renews
    it; a data folder (``data_dir``) comes before the cache, so re-fetching would not."""
    if info.path is not None or info.download == "none":
        return False
    cache = cache_dir().resolve()
    return cache in (folder.resolve(), folder.resolve().parent)


def _read_ts_pair(info: DatasetInfo, folder: Path,
                  fetch_name: str | None) -> tuple[list[RawSplit], list[str]]:
    """``NAME_TRAIN.ts`` and ``NAME_TEST.ts``; test labels are mapped onto train's class list."""
    train = read_ts(folder / f"{info.name}_TRAIN.ts", fetch_name=fetch_name)
    test = read_ts(folder / f"{info.name}_TEST.ts", fetch_name=fetch_name)
    if test.class_names != train.class_names:
        # Each file was checked against its own header; re-index test by train's list.
        index = {name: i for i, name in enumerate(train.class_names)}
        remapped = np.empty_like(test.labels)
        for i, label in enumerate(test.labels):
            name = test.class_names[label]
            if name not in index:
                raise DataError(f"{test.where(i)}: label {name!r} is not in the @classLabel list "
                                f"of {train.path.name}; train and test must list the same classes")
            remapped[i] = index[name]
        test.labels = remapped
    return [train, test], list(train.class_names)


def _read_pt_folder(folder: Path) -> tuple[list[RawSplit], tuple[str, ...], list[str]]:
    """``train.pt`` plus optional ``val.pt`` and ``test.pt``; labels -> 0..K-1 by sorted value."""
    names = tuple(n for n in ("train", "val", "test") if (folder / f"{n}.pt").is_file())
    if "train" not in names:
        raise DataError(f"{folder}: no train.pt; a TF-C style folder holds train.pt, val.pt and "
                        f"optionally test.pt")
    parts = [read_pt(folder / f"{n}.pt") for n in names]
    values = np.unique(np.concatenate([p.labels for p in parts]))
    for part in parts:
        part.labels = np.searchsorted(values, part.labels).astype(np.int64)
    return parts, names, [str(int(v)) for v in values]
