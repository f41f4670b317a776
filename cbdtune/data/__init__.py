"""The dataset layer: named UEA/UCR, TS-TCC and TF-C datasets as float32 [N, C, L] arrays.

Example:
    >>> from cbdtune.config import DataConfig
    >>> from cbdtune.data import load_dataset
    >>> ds = load_dataset(DataConfig(dataset="gesture"), seed=0)  # doctest: +SKIP
    >>> ds.n_channels, ds.seq_len, ds.n_classes  # doctest: +SKIP
    (3, 315, 8)

Where files come from: :mod:`cbdtune.data._fetch`. How lengths and NaN are handled:
:mod:`cbdtune.data._lengths`. The registry: :mod:`cbdtune.data._registry`. The command line:
``python -m cbdtune.data list | info NAME | fetch NAME``.
"""

from __future__ import annotations

from cbdtune.data._dataset import DataError, Dataset, Split
from cbdtune.data._fetch import cache_dir, fetch, locate
from cbdtune.data._load import load_dataset
from cbdtune.data._registry import DatasetInfo, FileSpec, list_datasets, resolve
from cbdtune.data._splits import stratified_folds, stratified_split

__all__ = [
    "DataError",
    "Dataset",
    "DatasetInfo",
    "FileSpec",
    "Split",
    "cache_dir",
    "fetch",
    "list_datasets",
    "load_dataset",
    "locate",
    "resolve",
    "stratified_folds",
    "stratified_split",
]
