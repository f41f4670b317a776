"""Bring every series of a dataset to one length: the variable-length and NaN policy.

UEA/UCR hold variable-length problems (SpokenArabicDigits: 4..93 steps) and NaN-padded ones,
while the model takes one fixed [C, L]. The policy is chosen by ``DataConfig.length_policy``:

- ``"pad"``: each channel is extended to the length ``L`` with its last valid (non-NaN) value;
  trailing NaN padding counts as absent. Missing values inside a series stay NaN until the last
  step below.
- ``"resample"``: each channel is linearly interpolated from its own length to ``L``
  (``numpy.interp`` over its valid points, so inner missing values are interpolated too).

Then NaN -> 0, as the paper does (Han et al., AAAI 2025).
The length ``L`` is that of the longest TRAINING series (the train split, plus an archive's
val split where it joins train under cross-validation): the model's shape must not
depend on the series it is tested on. The other splits are brought to ``L`` by
:func:`to_length`, the rule serving applies too: under ``"pad"`` a longer series is cut to its
first ``L`` steps, under ``"resample"`` it is interpolated down. A series whose every value is NaN
is an error (it holds no data); a single all-NaN channel becomes zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cbdtune.config import LengthPolicy
from cbdtune.data._dataset import DataError
from cbdtune.data._readers import RawSplit


def fix_length(parts: Sequence[RawSplit], policy: LengthPolicy, *,
               n_train: int = 1) -> list[np.ndarray]:
    """Stack each split into float32 [N, C, L] with one L for all splits.

    Args:
        parts: the splits as read; the first one names the channel count the others must match.
        policy: ``"pad"`` or ``"resample"`` (see the module docstring).
        n_train: how many leading ``parts`` are training series; ``L`` is their longest valid
            length, and the rest (val, test) are fitted to it.

    Returns:
        One C-contiguous float32 array [N_i, C, L] per part, NaN-free.

    Raises:
        DataError: a split with another channel count than the first, or an all-NaN series.
    """
    if policy not in ("pad", "resample"):
        raise DataError(f"length policy {policy!r} is unknown; use 'pad' or 'resample'")
    first = parts[0]
    for part in parts[1:]:
        if part.n_channels != first.n_channels:
            raise DataError(f"{part.path} has {part.n_channels} channels but {first.path} has "
                            f"{first.n_channels}; train and test must have the same channels "
                            f"(same @dimensions): use files of one dataset")
    if not 1 <= n_train <= len(parts):
        raise ValueError(f"n_train={n_train} must be 1..{len(parts)} (the number of parts)")
    valid = [_valid_lengths(part) for part in parts]
    length = int(max(v.max() for v in valid[:n_train]))
    return [_fit(part, v, length, policy) for part, v in zip(parts, valid, strict=True)]


def to_length(x: np.ndarray, length: int, policy: LengthPolicy) -> np.ndarray:
    """Bring one series ``x`` [C, n] to ``length`` steps, the way the model's inputs were built.

    Args:
        x: one series, float, may hold NaN (trailing NaN counts as padding).
        length: the model's length ``L`` (the longest training series).
        policy: ``"pad"``: a shorter series is extended with each channel's last valid value
            (:func:`pad_series`), a longer one is cut to its first ``length`` steps;
            ``"resample"``: linear interpolation from ``n`` to ``length`` either way
            (:func:`resample_series`).

    Returns:
        float64 [C, length]; NaN stays NaN where the policy leaves it (the caller sets NaN -> 0).

    Raises:
        DataError: an unknown policy, a length below 1, or ``x`` that is not 2-D.
    """
    if policy not in ("pad", "resample"):
        raise DataError(f"length policy {policy!r} is unknown; use 'pad' or 'resample'")
    if length < 1 or np.ndim(x) != 2:
        raise DataError(f"cannot bring a series of shape {np.shape(x)} to length {length}: "
                        f"need one series [channels, steps] and a length >= 1")
    x = np.asarray(x, dtype=np.float64)
    if policy == "resample":
        if x.shape[1] == length and np.isfinite(x).all():
            return x.copy()
        return resample_series(x, length)
    return pad_series(x[:, :length], length)  # cut first, then fill trailing NaN / short ones


def pad_series(x: np.ndarray, length: int) -> np.ndarray:
    """Extend each channel of ``x`` [C, n] to ``length`` with its last non-NaN value.

    Positions after a channel's last valid value (trailing NaN padding) take that value too. An
    all-NaN channel stays NaN (the caller sets NaN -> 0).
    """
    c, n = x.shape
    out = np.empty((c, length), dtype=np.float64)
    out[:, :n] = x
    finite = np.isfinite(x)
    last = n - 1 - np.argmax(finite[:, ::-1], axis=1)  # (C,) index of each channel's last value
    last_value = x[np.arange(c), last]  # NaN where a channel has no value at all
    after = np.arange(length)[None, :] > last[:, None]  # (C, length)
    return np.where(after, last_value[:, None], out)


def resample_series(x: np.ndarray, length: int) -> np.ndarray:
    """Linearly interpolate each channel of ``x`` [C, n] onto ``length`` evenly spaced points.

    Only valid (non-NaN) points are used, so inner gaps are interpolated; an all-NaN channel
    stays NaN (the caller sets NaN -> 0).
    """
    c, n = x.shape
    grid = np.linspace(0.0, n - 1, length)
    out = np.full((c, length), np.nan)
    for ch in range(c):
        ok = np.flatnonzero(np.isfinite(x[ch]))
        if ok.size:
            out[ch] = np.interp(grid, ok, x[ch, ok])  # one point -> a constant
    return out


def _valid_lengths(part: RawSplit) -> np.ndarray:
    """Per case: 1 + the last time step where any channel has a value (trailing NaN dropped)."""
    out = np.empty(len(part), dtype=np.int64)
    for i, case in enumerate(part.cases):
        has_value = np.isfinite(case).any(axis=0)  # (L_i,)
        if not has_value.any():
            raise DataError(f"{part.where(i)}: the series is all NaN (no values in any channel); "
                            f"remove this case from the file")
        out[i] = case.shape[1] - int(np.argmax(has_value[::-1]))
    return out


def _fit(part: RawSplit, valid: np.ndarray, length: int, policy: LengthPolicy) -> np.ndarray:
    cases = part.cases
    if isinstance(cases, np.ndarray) and cases.shape[2] == length and not np.isnan(cases).any():
        return np.ascontiguousarray(cases, dtype=np.float32)  # common case: nothing to do
    out = np.empty((len(part), part.n_channels, length), dtype=np.float32)
    for i, case in enumerate(cases):
        x = case[:, : valid[i]]
        if x.shape[1] == length and np.isfinite(x).all():
            out[i] = x
        else:
            out[i] = to_length(x, length, policy)  # a longer (non-training) one is cut/resampled
    np.nan_to_num(out, copy=False, nan=0.0)  # the paper's NaN -> 0, after the policy
    return out
