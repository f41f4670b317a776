"""Readers for the two file formats: UEA/UCR ``.ts`` text and TF-C / TS-TCC ``.pt`` dicts.

Both return a :class:`RawSplit`: the series as read (possibly of different lengths, NaN kept),
their labels, and where each came from, so that later checks can name a file and line.

Why our own ``.ts`` reader and not ``aeon.datasets.load_from_ts_file`` (aeon 1.6.0): aeon
lower-cases every data line (so class labels lose their case), replaces the substring ``nan``
anywhere in a line, does not check labels against the header's ``@classLabel`` list, and its
errors give a case number at best, never the line number. The format is small (header lines,
``@data``, then one case per line: channels split by ``:``, values by ``,``, label last, ``?`` or
``NaN`` for missing), so a reader that reports ``file:line`` for every problem is short.
Timestamped ``.ts`` files (``@timeStamps true``) are rejected: no UEA/UCR classification problem
uses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune.data._dataset import DataError


def whole_copy_hint(path: Path, fetch_name: str | None = None) -> str:
    """How to get a whole copy of ``path``: re-fetch a registry dataset's file from the cache,
    else (a folder given by path, a data folder, a user's file) put one where it was read."""
    if fetch_name is not None:
        return f"re-fetch the file (python -m cbdtune.data fetch {fetch_name} --force)"
    return f"put a whole copy of {path.name} in {path.parent}"


@dataclass
class RawSplit:
    """One split as read from one file, before lengths are made equal.

    Args:
        path: the file it was read from.
        cases: the series, each float32 [C, L_i]; a 3-D float32 array when all share one shape.
        labels: int64 [N]; for ``.ts`` the index into ``class_names``, for ``.pt`` the raw value.
        class_names: the header's ``@classLabel`` list (``.ts``); empty for ``.pt``.
        lines: the line number of each case (``.ts``); ``None`` for ``.pt``.
    """

    path: Path
    cases: list[np.ndarray] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def n_channels(self) -> int:
        return int(self.cases[0].shape[0])

    def where(self, i: int) -> str:
        """``file:line`` of case ``i`` (``file: sample i`` for ``.pt``)."""
        if self.lines is None:
            return f"{self.path}: sample {i}"
        return f"{self.path}:{self.lines[i]}"


# ---- .ts ----------------------------------------------------------------------------------------


@dataclass
class _TsHeader:
    class_names: list[str] | None = None
    dimensions: int | None = None
    series_length: int | None = None
    equal_length: bool | None = None
    timestamps: bool = False
    regression: bool = False


def read_ts(path: Path, *, fetch_name: str | None = None) -> RawSplit:
    """Read a UEA/UCR ``.ts`` classification file.

    Args:
        path: the ``NAME_TRAIN.ts`` or ``NAME_TEST.ts`` file.
        fetch_name: the registry name it was fetched under, when it came from the cache: errors
            then say to re-fetch it; otherwise they say to put a whole copy where it was read.

    Returns:
        The cases (float64 parsed, stored float32 [C, L_i]; ``?``/``NaN`` -> NaN) and labels as
        indices into the header's ``@classLabel`` list, in that list's order.

    Raises:
        DataError: with ``file:line``, for a header problem, a value that is not a number, a case
            whose channel count or length disagrees with the header or the first case, a label
            absent from ``@classLabel``, or a file with no cases.
    """
    header = _TsHeader()
    cases: _TsCases | None = None  # set at the @data line
    remedy = whole_copy_hint(path, fetch_name)
    fix = f"{remedy} or fix that line"
    try:
        # surrogateescape: a bad byte becomes one marker character on its own line, so the error
        # names that line (strict decoding fails per read chunk, i.e. at "line 1").
        handle = open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror}); check the path and its "
                        f"permissions") from None
    with handle:
        for lineno, raw in enumerate(handle, 1):
            _check_utf8(raw, f"{path}:{lineno}", remedy)
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if cases is not None:
                cases.add(line, f"{path}:{lineno}", lineno)
            elif _header_line(header, line, path, lineno, fix):
                cases = _TsCases(header, fix)
    if cases is None:
        raise DataError(f"{path}: no @data line, so this is not a .ts file (or it is cut short); "
                        f"{remedy}")
    if not cases.cases:
        raise DataError(f"{path}: no cases after @data; the file is empty or cut short: {remedy}")
    return RawSplit(path=path, cases=cases.cases, labels=np.asarray(cases.labels, dtype=np.int64),
                    class_names=list(header.class_names or []), lines=cases.lines)


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes surrogateescape could not decode


def _check_utf8(raw: str, where: str, remedy: str) -> None:
    """Refuse a line that held bytes that are not UTF-8, naming the line and the first byte."""
    bad = _UNDECODABLE.search(raw)
    if bad is not None:
        byte = ord(bad.group()) - 0xDC00
        raise DataError(f"{where}: not UTF-8 text (byte 0x{byte:02x} at column {bad.start() + 1}); "
                        f"the file is corrupt: {remedy}")


class _TsCases:
    """The cases after ``@data``, each checked against the header and the first case."""

    def __init__(self, header: _TsHeader, fix: str) -> None:
        self.header = header
        self.fix = fix  # the error messages' remedy for a bad line
        self.index = {name: i for i, name in enumerate(header.class_names or [])}
        self.cases: list[np.ndarray] = []
        self.labels: list[int] = []
        self.lines: list[int] = []
        self.n_channels: int | None = None
        self.first_length: int | None = None

    def add(self, line: str, where: str, lineno: int) -> None:
        """One data line: channels split by ``:``, values by ``,``, the class label last."""
        fields = line.split(":")
        if len(fields) < 2:
            raise DataError(f"{where}: expected channel values separated by ':' with the "
                            f"class label last, but found no ':'; {self.fix}")
        label = fields[-1].strip()
        rows = [_parse_values(text, where, c, self.fix) for c, text in enumerate(fields[:-1])]
        self._check_shape(rows, where)
        if label not in self.index:
            names = self.header.class_names or []
            shown = " ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise DataError(f"{where}: label {label!r} is not in the header's @classLabel "
                            f"list ({shown}); fix the label or add it to @classLabel")
        self.cases.append(np.stack(rows).astype(np.float32))
        self.labels.append(self.index[label])
        self.lines.append(lineno)

    def _check_shape(self, rows: list[np.ndarray], where: str) -> None:
        header = self.header
        if self.n_channels is None:
            self.n_channels = len(rows)
            if header.dimensions is not None and self.n_channels != header.dimensions:
                raise DataError(f"{where}: {self.n_channels} channels but the header says "
                                f"@dimensions {header.dimensions}; {self.fix}")
        elif len(rows) != self.n_channels:
            raise DataError(f"{where}: {len(rows)} channels but earlier cases have "
                            f"{self.n_channels}; {self.fix}")
        length = len(rows[0])
        if any(len(r) != length for r in rows):
            raise DataError(f"{where}: channels have different lengths "
                            f"({', '.join(str(len(r)) for r in rows)}); all channels of "
                            f"one case must have the same length; {self.fix}")
        if header.equal_length:
            expected = header.series_length or self.first_length
            if expected is not None and length != expected:
                raise DataError(f"{where}: {length} values per channel but the header "
                                f"says @equalLength true with length {expected}; "
                                f"{self.fix}")
        self.first_length = self.first_length or length


def _header_line(header: _TsHeader, line: str, path: Path, lineno: int, fix: str) -> bool:
    """Record one header line; True once ``@data`` is reached (after checking the header)."""
    where = f"{path}:{lineno}"
    if not line.startswith("@"):
        raise DataError(f"{where}: data before the @data line (or a header line without '@'); "
                        f"{fix}")
    tokens = line[1:].split()
    key = tokens[0].lower() if tokens else ""
    values = tokens[1:]
    if key == "data":
        if header.timestamps:
            raise DataError(f"{path}: @timeStamps true is not supported; convert the file to "
                            f"plain values (no UEA/UCR classification problem uses timestamps)")
        if header.regression or header.class_names == []:
            raise DataError(f"{path}: no class labels (@classLabel false or @targetLabel true), "
                            f"so this is not a classification problem; cbdtune needs class labels")
        if header.class_names is None:
            raise DataError(f"{path}: no @classLabel line before @data; add "
                            f"'@classLabel true <labels...>' to the header")
        return True
    if key == "classlabel":
        flag = values[0].lower() if values else ""
        if flag == "true":
            if len(values) < 2:
                raise DataError(f"{where}: @classLabel true lists no labels; list them, e.g. "
                                f"'@classLabel true 1 2 3'")
            header.class_names = values[1:]
        elif flag == "false":
            header.class_names = []
        else:
            raise DataError(f"{where}: @classLabel must be followed by true or false; {fix}")
    elif key == "targetlabel":
        header.regression = bool(values) and values[0].lower() == "true"
    elif key in ("dimension", "dimensions", "serieslength"):
        try:
            number = int(values[0])
        except (IndexError, ValueError):
            raise DataError(f"{where}: @{tokens[0]} expects an integer; {fix}") from None
        if key == "serieslength":
            header.series_length = number
        else:
            header.dimensions = number
    elif key == "equallength":
        header.equal_length = bool(values) and values[0].lower() == "true"
    elif key == "timestamps":
        header.timestamps = bool(values) and values[0].lower() == "true"
    # Other keys (@problemName, @missing, @univariate, ...) carry nothing the reader needs.
    return False


def _parse_values(text: str, where: str, channel: int, fix: str) -> np.ndarray:
    """Parse one channel's comma-separated values; ``?`` and ``NaN`` become NaN."""
    # numpy parses "NaN"/"nan" itself; "?" is the archive's other spelling of a missing value.
    tokens = ["nan" if t.strip() == "?" else t for t in text.split(",")]
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        for j, token in enumerate(tokens):  # find the bad value to name it
            try:
                float(token)
            except ValueError:
                raise DataError(f"{where}: channel {channel + 1}, value {j + 1}: {token.strip()!r} "
                                f"is not a number; {fix}") from None
        raise
    if np.isinf(values).any():
        j = int(np.flatnonzero(np.isinf(values))[0])
        raise DataError(f"{where}: channel {channel + 1}, value {j + 1}: infinite value; "
                        f"{fix}")
    big = np.abs(values) > np.finfo(np.float32).max  # stored float32: it would become inf
    if big.any():
        j = int(np.flatnonzero(big)[0])
        raise DataError(f"{where}: channel {channel + 1}, value {j + 1}: {values[j]:.3g} is too "
                        f"large for float32 (at most 3.4e+38); rescale the series")
    return values


# ---- .pt ----------------------------------------------------------------------------------------

_PT_HELP = "a TF-C/TS-TCC split is a dict with 'samples' [N, C, L] and 'labels' [N]"


def read_pt(path: Path) -> RawSplit:
    """Read one TF-C / TS-TCC split file (``train.pt``, ``val.pt`` or ``test.pt``).

    Loads with ``torch.load(path, weights_only=True)``: these files come from third parties, and
    ``weights_only`` refuses to run code stored in a pickle.

    ``samples`` [N, L] is read as [N, 1, L]. ``samples`` [N, A, B] with B < A is read as channels
    last and transposed to [N, B, A]: the TS-TCC and TF-C loaders, for which these files were
    written, do the same (``dataloader.py``: "make sure the Channels in second dim"). A dataset with
    more channels than time steps must therefore be stored as [N, L, C].

    Args:
        path: the ``.pt`` file.

    Returns:
        Samples float32 [N, C, L] (NaN kept) and labels int64 [N] as stored (float labels are
        accepted when they are whole numbers).

    Raises:
        DataError: the file does not load, is not a dict with ``samples`` and ``labels``, has
            shapes other than the above, non-numeric or infinite samples, or non-integer labels.
    """
    obj = _load_pt_dict(path)
    samples = _to_numpy(obj["samples"], path, "samples")
    labels = _to_numpy(obj["labels"], path, "labels")
    samples = _channels_first(samples, path)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (samples.shape[0],):
        raise DataError(f"{path}: 'labels' has shape {list(labels.shape)} but 'samples' has "
                        f"{samples.shape[0]} series; {_PT_HELP}")
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if np.isinf(samples).any():
        i = int(np.flatnonzero(np.isinf(samples).any(axis=(1, 2)))[0])
        raise DataError(f"{path}: sample {i} has an infinite value; fix or drop that sample")
    return RawSplit(path=path, cases=samples, labels=_integer_labels(labels, path),
                    class_names=[], lines=None)


def _load_pt_dict(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a dict holding ``samples`` and ``labels``."""
    import torch  # here, not at module level: .ts users should not pay torch's import time

    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types here: pickle, zip, EOF, Runtime errors
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: torch.load(weights_only=True) failed ({type(exc).__name__}: "
                        f"{reason}); {_PT_HELP}, saved with torch.save") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a dict; {_PT_HELP}")
    missing = [k for k in ("samples", "labels") if k not in obj]
    if missing:
        present = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{path}: missing key(s) {', '.join(repr(k) for k in missing)} (has "
                        f"{present}); {_PT_HELP}")
    return obj


def _channels_first(samples: np.ndarray, path: Path) -> np.ndarray:
    """Numeric samples as [N, C, L]: [N, L] -> [N, 1, L]; [N, A, B] with B < A transposed."""
    if not (np.issubdtype(samples.dtype, np.floating) or np.issubdtype(samples.dtype, np.integer)):
        raise DataError(f"{path}: 'samples' has dtype {samples.dtype}, not numbers; {_PT_HELP}")
    if samples.ndim == 2:
        samples = samples[:, None, :]
    elif samples.ndim == 3:
        if samples.shape[2] < samples.shape[1]:  # channels last, as TS-TCC/TF-C loaders assume
            samples = samples.transpose(0, 2, 1)
    else:
        raise DataError(f"{path}: 'samples' has shape {list(samples.shape)}; {_PT_HELP}")
    if samples.shape[0] == 0 or samples.shape[2] == 0:
        raise DataError(f"{path}: 'samples' has shape {list(samples.shape)}, with no series or no "
                        f"time steps; {_PT_HELP}")
    return samples


def _to_numpy(value: object, path: Path, key: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DataError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor; {_PT_HELP}")


def _integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """int64 labels; float labels (TF-C stores 0.0 .. 7.0) must be whole numbers."""
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.floating):
        raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; labels must be integers")
    bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: label of sample {i} is {labels[i]!r}, not a whole number; "
                        f"labels must be class indices (integers)")
    return labels.astype(np.int64)
