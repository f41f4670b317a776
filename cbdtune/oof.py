"""A search's out-of-fold store: each completed trial's class probabilities on its held-out folds.

Ensemble selection over the whole search (Caruana et al., ICML 2004, Section 2; ``cbdtune.ensemble``)
needs every candidate's out-of-fold probabilities on the same series in the same order. A
completed trial's chief worker writes them at its end, under the search's experiment folder:

    <experiment>/oof/<trial_id>.npz    arrays only (``np.load(allow_pickle=False)``):
                                       ``proba`` (N, K) float32 at the selected stage and epoch,
                                       calibrated by the stage's temperature (Guo et al., ICML
                                       2017); ``y`` (N,) the labels; ``index`` (N,) the selection
                                       pool's rows they belong to; ``fold`` (R, N_pool) the fold
                                       of each pool series in each of the R repeats
    <experiment>/oof/<trial_id>.json   the trial's config (flat), its pretraining key (the
                                       encoder cache key, "" without a cache), seed, stage,
                                       epoch, temperature, folds digest

A trial that ASHA stopped, that diverged or failed writes none. Every trial of one search
draws its folds from ``train.seed`` (``cbdtune.data.stratified_folds``), which the search fixes
(``--seed``) and no space searches, so the folds are the search's: ``folds_digest`` lets the
handover check it and leave out a trial whose folds differ (:func:`read_all`).

The folder is a local path or a URI ``pyarrow.fs`` opens (s3://, gs://), as the encoder cache's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("cbdtune.oof")
OOF_DIR = "oof"  # under the search's experiment folder
FORMAT = 1
MAX_BYTES = 2**31  # one trial's file: N x K float32 for N up to ~10^7 series x K


@dataclass(frozen=True, eq=False)
class TrialOOF:
    """One completed trial's out-of-fold record (module docstring)."""

    trial_id: str
    proba: np.ndarray  # (N, K) float32, rows sum to 1
    y: np.ndarray  # (N,) int64
    index: np.ndarray  # (N,) pool rows
    fold: np.ndarray  # (R, N_pool) int
    meta: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        """The trial's flat config (``ExperimentConfig.to_dict()``)."""
        return dict(self.meta.get("config") or {})


def folder(experiment: str) -> str:
    """``<experiment>/oof``: where a search's trials keep their out-of-fold probabilities."""
    return f"{experiment.rstrip('/')}/{OOF_DIR}"


def folder_of_trial_storage(storage_path: str | None) -> str | None:
    """The out-of-fold folder from a trial's ``storage_path`` (``<experiment>/train``,
    :func:`cbdtune.tuning.param_space`); None without one (a trial run outside a search)."""
    if not storage_path:
        return None
    return folder(posixpath.dirname(storage_path.rstrip("/")))


def fold_assignment(folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """(R, n) int: the fold index (within its repeat) that holds each series out, -1 for none.

    ``folds`` are ``k * R`` pairs, repeat by repeat (``stratified_folds``); one validation
    split is one repeat of one fold."""
    k = _folds_per_repeat(folds, n)
    repeats = max(1, len(folds) // k)
    out = np.full((repeats, n), -1, dtype=np.int64)
    for i, (_, va) in enumerate(folds):
        out[min(i // k, repeats - 1), np.asarray(va)] = i % k
    return out


def _folds_per_repeat(folds: list[tuple[np.ndarray, np.ndarray]], n: int) -> int:
    """Folds in one repeat: the first run of folds whose validation parts cover ``n`` series."""
    seen = 0
    for i, (_, va) in enumerate(folds, start=1):
        seen += len(va)
        if seen >= n:
            return i
    return len(folds)


def digest(fold: np.ndarray) -> str:
    """sha256 of a fold assignment (:func:`fold_assignment`): equal folds, equal digests."""
    a = np.ascontiguousarray(fold, dtype=np.int64)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def write(where: str, trial_id: str, *, proba: np.ndarray, y: np.ndarray, index: np.ndarray,
          fold: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``<where>/<trial_id>.npz`` and ``.json`` (the json last: it marks the record whole).

    Args:
        where: the out-of-fold folder (:func:`folder`), a path or a URI.
        trial_id: Tune's trial id (a plain name).
        proba: (N, K) out-of-fold probabilities of the pool rows ``index``.
        y: (N,) their labels; index: (N,) their pool rows; fold: (R, N_pool).
        meta: JSON-serialisable facts about the trial (config, encoder key, seed...).
    """
    buf = io.BytesIO()
    np.savez(buf, proba=np.asarray(proba, dtype=np.float32), y=np.asarray(y, dtype=np.int64),
             index=np.asarray(index, dtype=np.int64), fold=np.asarray(fold, dtype=np.int64))
    fs, root = _fs(where)
    fs.create_dir(root, recursive=True)
    record = {"format": FORMAT, "trial_id": trial_id, "folds_digest": digest(fold), **meta}
    for name, data in ((f"{trial_id}.npz", buf.getvalue()),
                       (f"{trial_id}.json", (json.dumps(record, default=str) + "\n").encode())):
        tmp = f"{root}/.{name}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, f"{root}/{name}")


def read_all(where: str, trial_ids: list[str] | None = None) -> dict[str, TrialOOF]:
    """Every whole record in ``where`` (of ``trial_ids`` only, when given), by trial id.

    A record that does not read (no json, a damaged npz) is logged and left out; nothing is
    unpickled (``allow_pickle=False``)."""
    import pyarrow.fs as pafs

    fs, root = _fs(where)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
             if i.base_name.endswith(".json") and not i.base_name.startswith(".")]
    out = {}
    for name in sorted(names):
        trial_id = name[:-len(".json")]
        if trial_ids is not None and trial_id not in trial_ids:
            continue
        try:
            out[trial_id] = _read(fs, root, trial_id)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("out-of-fold record %s/%s left out: %s", where, trial_id, exc)
    return out


def _read(fs: Any, root: str, trial_id: str) -> TrialOOF:
    with fs.open_input_stream(f"{root}/{trial_id}.json") as f:
        meta = json.loads(f.read(MAX_BYTES))
    with fs.open_input_stream(f"{root}/{trial_id}.npz") as f:
        blob = f.read(MAX_BYTES)
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in ("proba", "y", "index", "fold")}
    if meta.get("format") != FORMAT or arrays["proba"].shape[0] != arrays["y"].shape[0]:
        raise ValueError(f"format {meta.get('format')!r} or shapes disagree")
    return TrialOOF(trial_id=trial_id, meta=meta, **arrays)


def _fs(where: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path in it (a local folder made absolute)."""
    import os

    import pyarrow.fs as pafs

    if "://" in where:
        return pafs.FileSystem.from_uri(where)
    return pafs.LocalFileSystem(), os.path.abspath(where)
