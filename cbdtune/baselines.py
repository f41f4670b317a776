"""The baseline family for ensemble selection: MiniRocket features with a ridge readout, fitted on
the search's cross-validation folds so its out-of-fold probabilities compare with a CBD trial's.

MiniRocket (Dempster, Schmidt and Webb, KDD 2021, https://arxiv.org/abs/2012.08791) is aeon's
multivariate transform (``aeon.transformations.collection.convolution_based.MiniRocket``): 84
fixed kernels of length 9 over a set of dilations, each with biases drawn from the quantiles of
one training series's convolution output, and the proportion of positive values as the feature
(Section 3). The paper's classifier is ridge regression on standardised features with the
regularisation chosen by cross-validation over 10^-3..10^3 (Section 3, "Classifier"); here the
same folds as the search choose it, by mean fold accuracy (ties: the lower squared error of the
+-1 targets). Out of fold, the transform and the ridge are both fitted on each fold's training
part alone.

Scores become probabilities by a softmax with one temperature, fitted on the out-of-fold scores
by minimising the log-loss (Guo et al., ICML 2017, "temperature scaling"); without it the +-1
ridge scores would give almost uniform probabilities and lose every log-loss comparison.

A series shorter than 9 steps is edge-padded to 9 (MiniRocket's kernel length; aeon refuses
fewer). A fitted member is saved as arrays in ``minirocket.npz`` plus ``minirocket.json``, never
pickled: loading sets aeon's fitted state (``parameters``: channels per combination, channel
indices, dilations, features per dilation, biases) on a fresh transform.

Cost: the ridge path takes one eigendecomposition of the smaller Gram matrix per fold,
O(min(N, F)^2 max(N, F)) for N series and F features. Measured on a shared 2-core CPU with the
default 10,000 kernels: 9-15 s for 5 folds + refit on 120-316 series; one refit on 7,494
series (PenDigits) 335 s. ``n_kernels`` is the budget knob: 84 * 24 kernels on PenDigits, 5
folds + refit, 71 s. The search sets it from N (``handover.n_kernels_for``: 10^7 / N, in
[1,008, 10,000]).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbdtune import classify
from cbdtune.config import CbdtuneError

KERNEL_LENGTH = 9  # MiniRocket's kernels (paper, Section 3.1)
N_KERNELS = 10_000  # features, as the paper and aeon's default
MAX_DILATIONS = 32  # per kernel, as the paper and aeon's default
ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))  # paper, Section 3: 10^-3..10^3
NPZ, JSON = "minirocket.npz", "minirocket.json"
FORMAT = 1  # the save format's version
Folds = Sequence[tuple[np.ndarray, np.ndarray]]  # (train_idx, val_idx) pairs
_PARAMETER_NAMES = ("n_channels_per_combination", "channel_indices", "dilations",
                    "n_features_per_dilation", "biases")


class BaselineError(CbdtuneError):
    """Data, folds or a saved member that the MiniRocket baseline cannot use."""


@dataclass(frozen=True, eq=False)
class MiniRocketMember:
    """MiniRocket features, standardisation and ridge weights fitted on every training series.

    Attributes:
        parameters: aeon's fitted ``MiniRocket.parameters``, by the names in ``_PARAMETER_NAMES``.
        center: feature means (F,); scale: 1/std per feature (0 for a constant one), (F,).
        weight: ridge weights (F, K) on standardised features; bias: (K,).
        temperature: scores are divided by it before the softmax.
        alpha: the ridge's regularisation, chosen on the folds.
        n_channels, length: the series the transform was fitted on (length after padding to 9).
        seed, n_kernels, max_dilations: the transform's settings.
    """

    parameters: dict[str, np.ndarray]
    center: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    temperature: float
    alpha: float
    n_channels: int
    length: int
    seed: int
    n_kernels: int = N_KERNELS
    max_dilations: int = MAX_DILATIONS

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    def scores(self, x: np.ndarray, *, n_jobs: int = 1) -> np.ndarray:
        """Ridge scores (N, K) for series (N, C, L) of the fitted channels and length."""
        x = padded(_checked_series(x, "MiniRocket member"))
        if x.shape[1:] != (self.n_channels, self.length):
            raise BaselineError(f"MiniRocket member: series are [C, L]={list(x.shape[1:])} but it "
                                f"was fitted on {[self.n_channels, self.length]}; bring them to "
                                f"the training length (cbdtune.data.to_length)")
        z = _transform(_rebuilt(self, n_jobs), x)
        return ((z - self.center) * self.scale) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray, *, n_jobs: int = 1) -> np.ndarray:
        """Class probabilities (N, K), float64: the softmax of the scores over the temperature."""
        return softmax(self.scores(x, n_jobs=n_jobs) / self.temperature)

    def save(self, folder: str | Path) -> Path:
        """Write ``minirocket.npz`` (arrays) and ``minirocket.json`` (settings) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"center": self.center, "scale": self.scale,
                                  "weight": self.weight, "bias": self.bias, **self.parameters}
        np.savez(folder / NPZ, **arrays)  # plain numeric arrays: np.load(allow_pickle=False)
        meta = {"format": FORMAT, "kind": "minirocket", "temperature": self.temperature,
                "alpha": self.alpha, "n_channels": self.n_channels, "length": self.length,
                "seed": self.seed, "n_kernels": self.n_kernels,
                "max_dilations": self.max_dilations, "n_classes": self.n_classes}
        (folder / JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return folder


@dataclass(frozen=True, eq=False)
class OutOfFold:
    """The baseline's out-of-fold result.

    Attributes:
        proba: out-of-fold probabilities (N, K), float64, rows summing to 1 (averaged over the
            repeats where folds are repeated).
        scores: the ridge scores they come from, (N, K).
        alpha: the regularisation chosen by mean fold accuracy.
        temperature: fitted on ``scores`` by minimising the log-loss.
        fold_accuracy: each fold's accuracy at ``alpha``.
    """

    proba: np.ndarray
    scores: np.ndarray
    alpha: float
    temperature: float
    fold_accuracy: tuple[float, ...]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) scores, float64."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def minirocket_baseline(x: np.ndarray, y: np.ndarray, folds: Folds, n_classes: int, *,
                        seed: int = 0, n_kernels: int = N_KERNELS,
                        n_jobs: int = 1) -> tuple[OutOfFold, MiniRocketMember]:
    """MiniRocket + ridge on the search's folds, then refit on every training series.

    Args:
        x: training series (N, C, L), finite; L < 9 is edge-padded to 9.
        y: int labels (N,) in 0..n_classes-1.
        folds: ``(train_idx, val_idx)`` pairs as :func:`cbdtune.data.stratified_folds` returns;
            the validation parts must cover every series.
        n_classes: K.
        seed: the transform's ``random_state`` (which series set the biases, channel choices).
        n_kernels: features of the transform (rounded down by aeon to a multiple of 84).
        n_jobs: numba threads for the transform.

    Returns:
        The :class:`OutOfFold` result and the :class:`MiniRocketMember` refit at its alpha and
        temperature.

    Raises:
        BaselineError: bad series, labels or folds (one line each).
    """
    oof = out_of_fold(x, y, folds, n_classes, seed=seed, n_kernels=n_kernels, n_jobs=n_jobs)
    member = refit(x, y, n_classes, alpha=oof.alpha, temperature=oof.temperature, seed=seed,
                   n_kernels=n_kernels, n_jobs=n_jobs)
    return oof, member


def path_outputs(x: np.ndarray, y: np.ndarray, folds: Folds, n_classes: int, *, seed: int = 0,
                 n_kernels: int = N_KERNELS, n_jobs: int = 1) -> list[np.ndarray]:
    """Each fold's held-out ridge scores at every alpha, ``(len(ALPHAS), N_f, n_classes)`` per
    fold: the transform, the standardiser and the ridge fitted on the fold's training series
    (arguments as :func:`minirocket_baseline`)."""
    x, y = padded(_checked_series(x, "MiniRocket baseline")), _checked_labels(y, len(x), n_classes)
    _check_folds(folds, len(y))
    targets = _targets(y, n_classes)
    outputs = []
    for tr, va in folds:
        transform = _fitted_transform(x[tr], seed, n_kernels, n_jobs)
        z_tr, z_va = _transform(transform, x[tr]), _transform(transform, x[va])
        center, scale = _standardiser(z_tr)
        outputs.append(np.stack([((z_va - center) * scale) @ w + b for w, b in
                                 _ridge_path((z_tr - center) * scale, targets[tr], ALPHAS)]))
    return outputs


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: Folds, n_classes: int, *, seed: int = 0,
                n_kernels: int = N_KERNELS, n_jobs: int = 1) -> OutOfFold:
    """Out-of-fold ridge scores at the alpha with the best mean fold accuracy (ties to the lower
    mean squared error, then the smaller alpha), and the temperature that makes their softmax
    fit best (arguments as :func:`minirocket_baseline`)."""
    outputs = path_outputs(x, y, folds, n_classes, seed=seed, n_kernels=n_kernels, n_jobs=n_jobs)
    y = np.asarray(y)
    targets = _targets(y, n_classes)
    acc = np.array([[np.mean(o.argmax(axis=1) == y[va]) for o in out]
                    for out, (_, va) in zip(outputs, folds, strict=True)])
    mse = np.array([[np.mean((o - targets[va]) ** 2) for o in out]
                    for out, (_, va) in zip(outputs, folds, strict=True)])
    best = min(range(len(ALPHAS)), key=lambda a: (-acc[:, a].mean(), mse[:, a].mean(), a))
    sums, seen = np.zeros((len(y), n_classes)), np.zeros(len(y))
    for out, (_, va) in zip(outputs, folds, strict=True):
        sums[va] += out[best]
        seen[va] += 1
    scores = sums / seen[:, None]
    temperature = classify.fit_temperature(scores, y)
    return OutOfFold(proba=softmax(scores / temperature), scores=scores, alpha=ALPHAS[best],
                     temperature=temperature, fold_accuracy=tuple(float(v) for v in acc[:, best]))


def refit(x: np.ndarray, y: np.ndarray, n_classes: int, *, alpha: float, temperature: float,
          seed: int = 0, n_kernels: int = N_KERNELS, n_jobs: int = 1) -> MiniRocketMember:
    """The transform and the ridge at ``alpha`` fitted on every series (N, C, L) of ``x``."""
    x, y = padded(_checked_series(x, "MiniRocket baseline")), _checked_labels(y, len(x), n_classes)
    transform = _fitted_transform(x, seed, n_kernels, n_jobs)
    z = _transform(transform, x)
    center, scale = _standardiser(z)
    ((w, b),) = _ridge_path((z - center) * scale, _targets(y, n_classes), (alpha,))
    params = dict(zip(_PARAMETER_NAMES, (np.asarray(p) for p in transform.parameters),
                      strict=True))
    return MiniRocketMember(parameters=params, center=center, scale=scale, weight=w, bias=b,
                            temperature=temperature, alpha=alpha, n_channels=x.shape[1],
                            length=x.shape[2], seed=seed, n_kernels=n_kernels,
                            max_dilations=MAX_DILATIONS)


def load(folder: str | Path) -> MiniRocketMember:
    """A member written by :meth:`MiniRocketMember.save`; arrays only, nothing is unpickled.

    Raises:
        BaselineError: a file is missing, of another format, or its arrays disagree in shape.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / JSON).read_text())
        with np.load(folder / NPZ, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise BaselineError(f"{folder}: cannot read a saved MiniRocket member ({err}); save it "
                            f"again with MiniRocketMember.save") from err
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT
            or meta.get("kind") != "minirocket"):
        raise BaselineError(f"{folder / JSON}: not a MiniRocket member of format {FORMAT}; save "
                            f"it again with MiniRocketMember.save")
    missing = sorted({"center", "scale", "weight", "bias", *_PARAMETER_NAMES} - set(arrays))
    missing += sorted({"temperature", "alpha", "n_channels", "length", "seed", "n_kernels",
                       "max_dilations"} - set(meta))
    if missing:
        raise BaselineError(f"{folder}: missing array(s) or setting(s) {', '.join(missing)}; "
                            f"save it again")
    member = MiniRocketMember(
        parameters={k: arrays[k] for k in _PARAMETER_NAMES}, center=arrays["center"],
        scale=arrays["scale"], weight=arrays["weight"], bias=arrays["bias"],
        temperature=float(meta["temperature"]), alpha=float(meta["alpha"]),
        n_channels=int(meta["n_channels"]), length=int(meta["length"]), seed=int(meta["seed"]),
        n_kernels=int(meta["n_kernels"]), max_dilations=int(meta["max_dilations"]))
    f = member.parameters["biases"].shape[0]
    if member.center.shape != (f,) or member.scale.shape != (f,) or member.weight.shape[0] != f:
        raise BaselineError(f"{folder / NPZ}: {f} biases but center {member.center.shape}, scale "
                            f"{member.scale.shape}, weight {member.weight.shape}; save it again")
    return member


# ---- pieces ------------------------------------------------------------------------------------


def _fitted_transform(x: np.ndarray, seed: int, n_kernels: int, n_jobs: int) -> Any:
    """aeon's MiniRocket fitted on ``x``, leaving the global ``np.random`` as it was (aeon's fit
    calls ``np.random.seed(seed)``)."""
    from aeon.transformations.collection.convolution_based import MiniRocket

    state = np.random.get_state()
    try:
        return MiniRocket(n_kernels=n_kernels, max_dilations_per_kernel=MAX_DILATIONS,
                          n_jobs=n_jobs, random_state=seed).fit(x)
    finally:
        np.random.set_state(state)


def _rebuilt(member: MiniRocketMember, n_jobs: int) -> Any:
    """A fresh aeon MiniRocket carrying ``member``'s fitted state: what ``fit`` sets
    (aeon 1.6: ``parameters``, ``n_kernels_``, ``_n_jobs``, ``metadata_``, ``is_fitted``)."""
    from aeon.transformations.collection.convolution_based import MiniRocket

    t = MiniRocket(n_kernels=member.n_kernels, max_dilations_per_kernel=member.max_dilations,
                   n_jobs=n_jobs, random_state=member.seed)
    p = member.parameters
    t.parameters = tuple(p[k].astype(np.float32 if k == "biases" else np.int32)
                         for k in _PARAMETER_NAMES)
    t.n_kernels_ = max(member.n_kernels, 84)
    t._n_jobs = n_jobs
    t.metadata_ = {"multivariate": member.n_channels > 1, "missing_values": False,
                   "unequal_length": False, "n_cases": 0, "n_channels": member.n_channels,
                   "n_timepoints": member.length}
    t.is_fitted = True
    return t


def _transform(transform: Any, x: np.ndarray) -> np.ndarray:
    """MiniRocket features (N, F) as float64."""
    return np.asarray(transform.transform(x), dtype=np.float64)


def _standardiser(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and 1/std (0 for a constant column) of training features (N, F)."""
    std = z.std(axis=0)
    return z.mean(axis=0), np.divide(1.0, std, out=np.zeros_like(std), where=std > 1e-8)


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    return 2.0 * np.eye(n_classes)[y] - 1.0  # (N, K) in {-1, +1}, as RidgeClassifier


def _ridge_path(z: np.ndarray, t: np.ndarray,
                alphas: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ridge weights (F, K) and intercepts (K,) on columns ``z`` (N, F) for every alpha: the
    readout's solver (:func:`cbdtune.ridge.solutions`, one eigendecomposition) on centred
    columns, the intercepts from the means."""
    from cbdtune.ridge import solutions

    mean = z.mean(axis=0)
    t_mean = t.mean(axis=0)
    return [(w, t_mean - mean @ w) for w in solutions(z - mean, t, tuple(alphas))]


def _checked_series(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[2] == 0:
        raise BaselineError(f"{where}: series must be a non-empty (N, C, L) array, but got shape "
                            f"{x.shape}")
    if not np.all(np.isfinite(x)):
        raise BaselineError(f"{where}: series hold NaN or inf; load them with cbdtune.data, "
                            f"which fills missing values")
    return x.astype(np.float32)


def padded(x: np.ndarray) -> np.ndarray:
    """Series shorter than MiniRocket's kernel, edge-padded at the end to its 9 steps."""
    short = KERNEL_LENGTH - x.shape[2]
    return np.pad(x, ((0, 0), (0, 0), (0, short)), mode="edge") if short > 0 else x


def _checked_labels(y: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or n_classes < 2:
        raise BaselineError(f"MiniRocket baseline: labels must be ints of shape ({n},) for "
                            f"n_classes >= 2, but got dtype {y.dtype} shape {y.shape}, "
                            f"n_classes={n_classes}")
    if y.min() < 0 or y.max() >= n_classes:
        raise BaselineError(f"MiniRocket baseline: labels must be in 0..{n_classes - 1}, but got "
                            f"{y.min()}..{y.max()}")
    return y.astype(np.int64)


def _check_folds(folds: Folds, n: int) -> None:
    covered = np.zeros(n, dtype=bool)
    for i, (tr, va) in enumerate(folds):
        tr, va = np.asarray(tr), np.asarray(va)
        if (not len(tr) or not len(va) or min(tr.min(), va.min()) < 0
                or max(tr.max(), va.max()) >= n or np.intersect1d(tr, va).size):
            raise BaselineError(f"MiniRocket baseline: fold {i}: train and validation indices must "
                                f"be non-empty, disjoint and in 0..{n - 1}; use "
                                f"cbdtune.data.stratified_folds")
        covered[va] = True
    if not folds or not covered.all():
        raise BaselineError(f"MiniRocket baseline: the folds' validation parts leave "
                            f"{int((~covered).sum())} of {n} series out; every series needs an "
                            f"out-of-fold prediction (use cbdtune.data.stratified_folds)")
