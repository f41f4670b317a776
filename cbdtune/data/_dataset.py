"""What a loaded dataset is: ``Split`` (x, y arrays), ``Dataset`` (named splits) and ``DataError``.

Every loader in this package ends by building these, so the invariants the model and pipeline rely
on (float32 [N, C, L] C-contiguous, int64 labels 0..K-1, the same C and L in every split) are
checked once, here, where the data enters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from cbdtune.config import CbdtuneError

ValOrigin = Literal["carved", "archive", "none"]  # where Dataset.val came from


class DataError(CbdtuneError):
    """A data problem the user can fix: one line saying what, which file/line, and what to do."""

    def __init__(self, message: str) -> None:
        # The CLI prints the message as is; a newline carried in from a wrapped OS or torch error
        # would break the one-line contract, so whitespace is collapsed here, once.
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset.

    Args:
        x: series, float32 [N, C, L], C-contiguous (other dtypes/layouts are converted once here).
        y: labels, int64 [N], values 0..K-1.

    Raises:
        DataError: ``x`` is not 3-D or ``y`` does not have one label per series.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        x = np.ascontiguousarray(self.x, dtype=np.float32)  # no copy when already right
        y = np.asarray(self.y)
        if x.ndim != 3:
            raise DataError(f"split x must be [N, C, L], but got shape {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise DataError(f"split y must be [N] with N={x.shape[0]}, but got shape {y.shape}")
        if y.dtype != np.int64:
            if y.size and not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"split y must hold integer labels, but got dtype {y.dtype}")
            y = y.astype(np.int64)
        # frozen: the dataclass forbids normal assignment, so set the converted arrays directly.
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def class_counts(self, n_classes: int) -> np.ndarray:
        """Number of series per class, int64 [n_classes]."""
        return np.bincount(self.y, minlength=n_classes)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: train/val/test splits with one channel count and one length.

    Args:
        name: canonical name, e.g. ``"UWaveGestureLibrary"`` (a folder's name for a folder).
        train: the training split (the archive's train minus ``val`` when ``val`` was carved).
        val: validation split, stratified from the archive's train, or the archive's own; empty
            under cross-validation (``val_origin="none"``).
        test: the archive's test split; ``None`` only for TF-C folders without ``test.pt``.
        class_names: original labels as strings; index = int label.
        source: where the data was published (archive URL, repository, citation).
        location: the folder the files were read from.
        val_origin: ``"carved"`` (from train, by seed), ``"archive"`` (the archive's val split) or
            ``"none"`` (cross-validation on train).

    Raises:
        DataError: the splits disagree on channels or length, or a label is out of range.
    """

    name: str
    train: Split
    val: Split
    test: Split | None
    class_names: list[str]
    source: str
    location: str
    val_origin: ValOrigin = "carved"

    def __post_init__(self) -> None:
        k = len(self.class_names)
        for split_name, split in self.splits().items():
            if split.x.shape[1:] != self.train.x.shape[1:]:
                raise DataError(
                    f"{self.name}: {split_name} is [C, L]={list(split.x.shape[1:])} but train is "
                    f"{list(self.train.x.shape[1:])}; every split must have the same shape"
                )
            if len(split) and (split.y.min() < 0 or split.y.max() >= k):
                raise DataError(
                    f"{self.name}: {split_name} has labels outside 0..{k - 1} "
                    f"({k} class names); labels must index class_names"
                )

    @property
    def n_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def seq_len(self) -> int:
        return int(self.train.x.shape[2])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        """The splits that exist, in order train, val, test."""
        out = {"train": self.train, "val": self.val}
        if self.test is not None:
            out["test"] = self.test
        return out
