"""CBDEnsemble: a saved model loaded for inference, its input checks, its weighted softmax mean."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune.config import ExperimentConfig
from cbdtune.data._lengths import to_length
from cbdtune.serving.contract import CBD, MINIROCKET, InputError, ModelContract, member_weights
from cbdtune.serving.folder import ModelError, find_model_dir, first_line
from cbdtune.serving.members import load_baseline, load_member

BATCH_SIZE = 256


@dataclass
class CBDEnsemble:
    """The softmax average of one or more trained classifiers, with the input contract.

    Build it with :meth:`load`. Inputs are raw series; see :meth:`check_input` for what is
    accepted and how other lengths are fitted.
    """

    contract: ModelContract
    members: list[Any]  # CBDClassifier (eval mode, on ``device``) or a MiniRocket member
    device: str = "cpu"
    configs: list[ExperimentConfig | None] = field(default_factory=list)  # None: a baseline
    weights: list[float] = field(default_factory=list)  # empty: equal weights

    @property
    def class_names(self) -> list[str]:
        return list(self.contract.class_names)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu") -> CBDEnsemble:
        """Load a model directory, or the MLflow pyfunc directory :func:`log_model` wrote.

        Args:
            path: the folder with ``contract.json`` or with MLflow's ``MLmodel``.
            device: torch device for inference (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

        Raises:
            ModelError: a device that cannot be used, not a model directory, a member file
                that is missing, is not a plain tensor dict, or does not fit its config.
        """
        import torch

        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:  # a bad name, or no CUDA in this torch
            raise ModelError(f"device {device!r} cannot be used here ({first_line(exc)}); use "
                             f"cpu or an available cuda device") from None
        model_dir = find_model_dir(path)
        contract = ModelContract.read(model_dir)
        members: list[Any] = []
        configs: list[ExperimentConfig | None] = []
        for i, entry in enumerate(contract.members):
            if entry.get("kind", CBD) == MINIROCKET:
                members.append(load_baseline(model_dir, contract, i))
                configs.append(None)
                continue
            cfg, clf = load_member(model_dir, contract, i)
            members.append(clf.to(device))
            configs.append(cfg)
        return cls(contract=contract, members=members, device=device, configs=configs,
                   weights=member_weights(contract))

    def check_input(self, x: Any, *, where: Callable[[int], str] | None = None) -> np.ndarray:
        """Validate raw series and fit them to the contract's ``[C, L]``.

        Series of another length are fitted by the contract's policy, as the training series
        were (:func:`cbdtune.data._lengths.to_length`): ``pad`` extends a shorter series with
        each channel's last value and cuts a longer one to its first ``L`` steps; ``resample``
        linearly interpolates any length >= 2 to ``L``.

        Args:
            x: real numbers [N, C, L_in], or a sequence of [C, L_i] arrays (lengths may differ).
            where: names series ``i`` in messages (default ``"series i"``), e.g. ``file:line``.

        Returns:
            float32 [N, C, L], C-contiguous.

        Raises:
            InputError: not real numbers (complex ones included), not [N, C, L], no series,
                another channel count, NaN or infinite values (how many, and the first one's
                position), values too large for the model's float32 arithmetic, or a series
                too short for the policy.
        """
        where = where or (lambda i: f"series {i}")
        cases = _as_cases(x, self.contract)
        c = self.contract.in_channels
        for i, case in enumerate(cases[:1] if isinstance(cases, np.ndarray) else cases):
            if case.shape[0] != c:
                what = "input" if isinstance(cases, np.ndarray) else where(i)
                raise InputError(f"{what}: {case.shape[0]} channels, but the model takes {c} "
                                 f"(trained on {self.contract.dataset}, input "
                                 f"{self.contract.input_shape}); give series with {c} channels")
        _check_finite(cases, where)
        _check_magnitude(cases, where, self.contract.max_magnitude)
        if isinstance(cases, np.ndarray) and cases.shape[2] == self.contract.seq_len:
            return np.ascontiguousarray(cases, dtype=np.float32)  # the common case
        return self._fit_lengths(cases, where)

    def _fit_lengths(self, cases: np.ndarray | list[np.ndarray],
                     where: Callable[[int], str]) -> np.ndarray:
        length, policy = self.contract.seq_len, self.contract.length_policy
        shortest = 2 if policy == "resample" else 1
        out = np.empty((len(cases), self.contract.in_channels, length), dtype=np.float32)
        for i, case in enumerate(cases):
            if case.shape[1] < shortest:
                raise InputError(f"{where(i)}: {case.shape[1]} time step(s), too few to "
                                 f"{policy} to {length}; give series of at least {shortest} "
                                 f"steps")
            out[i] = to_length(case, length, policy)
        return out

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities, float64 [N, K]: the weighted mean over members of each one's
        softmax (the contract's weights; equal without them).

        Args:
            x: raw series as :meth:`check_input` takes them.

        Raises:
            InputError: input the model cannot take (see :meth:`check_input`).
        """
        import torch

        x = self.check_input(x)
        weights = self.weights or [1.0 / len(self.members)] * len(self.members)
        out = np.zeros((len(x), len(self.contract.class_names)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(x), BATCH_SIZE):
                chunk = x[start:start + BATCH_SIZE]
                batch = torch.from_numpy(chunk).to(self.device)
                for m, w in zip(self.members, weights, strict=True):
                    if isinstance(m, torch.nn.Module):  # (B, K) softmax, averaged in float64
                        p = m(batch).float().softmax(dim=-1).double().cpu().numpy()
                    else:  # a MiniRocket member: its temperature-scaled softmax
                        p = m.predict_proba(chunk)
                    out[start:start + len(chunk)] += w * p
        return out

    def predict(self, x: Any) -> list[str]:
        """The most probable class name of each series."""
        return [self.contract.class_names[k] for k in self.predict_proba(x).argmax(axis=1)]

    def predict_frame(self, x: Any) -> Any:
        """A pandas DataFrame: ``label`` and one ``prob_<class name>`` column per class."""
        import pandas as pd

        proba = self.predict_proba(x)
        names = self.contract.class_names
        frame = pd.DataFrame(proba, columns=[f"prob_{c}" for c in names])
        frame.insert(0, "label", [names[k] for k in proba.argmax(axis=1)])
        return frame


def _as_cases(x: Any, contract: ModelContract) -> np.ndarray | list[np.ndarray]:
    """float64 [N, C, L] when all series share a length, else a list of [C, L_i]."""
    hint = f"the model takes {contract.input_shape} (a batch of series, channels, time steps)"
    try:
        arr = _real(x, "input", hint)
    except (TypeError, ValueError):
        if not isinstance(x, (list, tuple)):
            raise InputError(f"input of type {type(x).__name__} is not an array of numbers; "
                             f"{hint}") from None
        arr = None  # a ragged list: series of different lengths
    if arr is not None:
        if arr.ndim != 3 or 0 in arr.shape[1:]:
            raise InputError(f"input has shape {list(arr.shape)}, but {hint}; for one series "
                             f"of shape [C, L] use x[None]")
        if len(arr) == 0:
            raise InputError(f"input holds no series; {hint}")
        return arr
    cases = []
    for i, case in enumerate(x):
        try:
            case = _real(case, f"series {i}", hint)
        except (TypeError, ValueError):
            raise InputError(f"series {i} is not an array of numbers; {hint}") from None
        if case.ndim != 2 or 0 in case.shape:
            raise InputError(f"series {i} has shape {list(case.shape)}, but each series must be "
                             f"[C, L] with C, L >= 1; {hint}")
        cases.append(case)
    if not cases:
        raise InputError(f"input holds no series; {hint}")
    return cases


def _real(x: Any, what: str, hint: str) -> np.ndarray:
    """``x`` as float64; complex numbers are refused (a cast would drop the imaginary part).

    Raises:
        InputError: complex input. TypeError, ValueError: not numbers, or ragged.
    """
    arr = np.asarray(x)
    if arr.dtype == object:  # e.g. numbers of mixed Python types: float() decides (or raises)
        arr = np.asarray(x, dtype=np.float64)
    if np.iscomplexobj(arr):
        raise InputError(f"{what} holds complex numbers; the model takes real series ({hint}): "
                         f"pass the real part, the magnitude, or both as separate channels")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_magnitude(cases: np.ndarray | list[np.ndarray], where: Callable[[int], str],
                     limit: float) -> None:
    """Raise on a value too large for the model's float32 arithmetic, naming the first one."""
    for i, case in enumerate(cases):
        big = np.abs(case) > limit
        if big.any():
            c, t = (int(v[0]) for v in np.nonzero(big))
            beyond = "float32's maximum" if abs(case[c, t]) > np.finfo(np.float32).max else \
                "what the model's float32 arithmetic holds"
            raise InputError(f"{where(i)}: channel {c}, step {t} (0-based) is {case[c, t]:.3g}, "
                             f"too large for float32 (beyond {beyond}; this model takes "
                             f"|x| <= {limit:.3g}); rescale the series, e.g. to other units")


def _check_finite(cases: np.ndarray | list[np.ndarray], where: Callable[[int], str]) -> None:
    """Raise on NaN or inf, naming the first one and counting all of them."""
    if isinstance(cases, np.ndarray):
        bad = ~np.isfinite(cases)  # (N, C, L)
        per_series = bad.sum(axis=(1, 2))
    else:
        bad = None
        per_series = np.array([int((~np.isfinite(case)).sum()) for case in cases])
    total = int(per_series.sum())
    if not total:
        return
    i = int(np.flatnonzero(per_series)[0])
    first = bad[i] if bad is not None else ~np.isfinite(cases[i])
    c, t = (int(v[0]) for v in np.nonzero(first))
    more = "" if total == 1 else (f" (the first of {total} such values, in "
                                  f"{np.count_nonzero(per_series)} series)")
    raise InputError(f"{where(i)}: channel {c}, step {t} (0-based) is NaN or infinite{more}; the "
                     f"model takes complete series: fill the gaps (e.g. interpolate) or drop "
                     f"those series")
