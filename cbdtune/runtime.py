"""What every training loop of a trial shares: where it runs, seeding, loaders, mixed precision,
evaluation. Plain PyTorch; nothing here knows of Ray (the worker passes a :class:`Runtime`).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cbdtune.config import CbdtuneError, TrainConfig
from cbdtune.model import CBDModel

# report(metrics, state): metrics is a flat dict of numbers (plus "stage"); state is None or a
# checkpoint payload (tensors and plain Python only, loadable with weights_only=True).
Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]


class TrialDiverged(CbdtuneError):
    """The loss became NaN or infinite; the trial stops with this reason."""


@dataclass
class Runtime:
    """Where and how a trial runs. The defaults are a single process on the best device."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. ray.train.torch.prepare_model
    progress: bool = False  # tqdm bars (interactive runs only; quiet under Ray)
    # A log line per tenth of a stage's epochs, for a run whose stderr is a file (no bars there).
    progress_log: bool = False
    # Pretrained encoders are reused from and stored under this root (a folder or an s3:// /
    # gs:// URI; cbdtune.encoder_cache); None pretrains every trial and stores nothing.
    encoder_cache: str | None = None
    trial: str = ""  # who runs: "<search>/<trial id>", recorded with an encoder it pretrains

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def resolve_device(train: TrainConfig) -> torch.device:
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CbdtuneError("train.device=cuda but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed torch (and CUDA). Model code draws its own randomness from explicit generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # only third-party code relies on it; ours uses Generators


# ---- small utilities ---------------------------------------------------------------------------


def as_tensor(a: np.ndarray) -> torch.Tensor:
    # np.array(..., copy) because arrays from Ray's object store are read-only.
    return torch.from_numpy(np.array(a, copy=True))


def make_loader(tensors: tuple[torch.Tensor, ...], batch_size: int, *, shuffle: bool, seed: int,
            rt: Runtime, drop_last: bool = False) -> DataLoader:
    """A loader over in-memory tensors; sharded by a DistributedSampler when data-parallel.

    The shuffle order of epoch ``e`` depends only on ``(seed, e)`` (see :func:`for_epoch`), so a
    trial resumed from a checkpoint sees the same batches as one that never stopped.
    """
    ds = TensorDataset(*tensors)
    # drop_last only when it leaves at least one batch (gesture's 96 training series < 128).
    drop_last = drop_last and len(ds) // max(rt.world_size, 1) >= batch_size
    if rt.world_size > 1:
        sampler: DistributedSampler[Any] = DistributedSampler(
            ds, num_replicas=rt.world_size, rank=rt.rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Optimizer steps per epoch over ``n`` series at the global ``batch_size``, as
    :func:`make_loader` batches them (``drop_last`` keeps the only batch of a small set)."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return max(1, math.ceil(n / batch_size))


def for_epoch(loader: DataLoader, epoch: int, seed: int) -> DataLoader:
    """Set the loader's shuffle order for ``epoch``."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # a different shard order every epoch
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
    return loader


def progress_bar(total: int, desc: str, rt: Runtime, initial: int = 0,
                 unit: str = "epoch") -> Any:
    """A tqdm bar (``rt.progress``), else a :class:`ProgressLog` (``rt.progress_log``), else None;
    ``unit`` names what it counts (epochs, folds).

    Callers set the postfix before ``update`` so that a log line carries the epoch's numbers.
    """
    if not rt.is_chief:
        return None
    if not rt.progress:
        return ProgressLog(total, desc, initial, unit) if rt.progress_log else None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, file=sys.stderr)


class ProgressLog:
    """tqdm's ``update``/``set_postfix``/``close`` as log lines (logger ``cbdtune.progress``):
    one per tenth of ``total`` epochs and at the last, e.g.
    ``pretrain: epoch 20/200 loss=0.4121 (31.0 s)``."""

    log = logging.getLogger("cbdtune.progress")

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "epoch") -> None:
        self.total, self.desc, self.n, self.logged = total, desc, initial, initial
        self.unit = unit
        self.every = max(1, math.ceil(total / 10))
        self.postfix = ""
        self.t0 = time.perf_counter()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n >= self.total:
            self._line()

    def close(self) -> None:
        if self.logged != self.n:  # stopped early between two lines
            self._line()

    def _line(self) -> None:
        self.logged = self.n
        self.log.info("%s: %s %d/%d %s (%.1f s)", self.desc, self.unit, self.n, self.total,
                      self.postfix, time.perf_counter() - self.t0)


@functools.cache  # a property of the hardware, asked once per batch by autocast
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: a CUDA GPU from Ampere on, or a CPU with
    AVX512-BF16 or AMX.

    Elsewhere (V100/T4, AVX2-only CPUs) bf16 is emulated and autocast would only add casts.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = getattr(torch, "cpu", None)
    return device.type == "cpu" and any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def fused(device: torch.device) -> bool:
    """Fused Adam(W): one kernel over all parameters instead of ~10 small ops per tensor, the
    same update. Default model, 2 CPU cores: the AdamW step takes ~5 ms instead of ~19 ms."""
    return device.type in ("cpu", "cuda")


def autocast(rt: Runtime, train: TrainConfig) -> Any:
    # Mixed precision as on a GPU: matmuls and convs in bf16, the FFTs, the CBD spectral unit and
    # the losses in fp32 (they switch autocast off). On this project's 2-core AVX512-BF16 CPU a
    # default-model pretraining step runs 1.4-1.8x faster than in fp32 (results/throughput.md).
    enabled = train.amp and native_bf16(rt.device)
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=enabled)


def check_finite(value: float, where: str, detail: dict[str, float] | None = None) -> None:
    if not math.isfinite(value):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in (detail or {}).items())
        raise TrialDiverged(f"{where}: loss is {value}" + (f" ({terms})" if terms else ""))


def macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over the classes present in ``true`` or ``pred`` (scikit-learn's)."""
    from sklearn.metrics import f1_score

    return float(f1_score(true, pred, average="macro", zero_division=0.0))


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             n_classes: int, *, batch_size: int = 256) -> dict[str, float]:
    """Cross-entropy, accuracy and macro-F1 of ``forward`` (inputs -> logits) on one split."""
    logits = torch.cat([forward(x[i:i + batch_size]).float()
                        for i in range(0, len(x), batch_size)])
    y = y.to(logits.device)
    pred = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, y).item(),
        "accuracy": (pred == y).float().mean().item(),
        "f1": macro_f1(pred.cpu().numpy(), y.cpu().numpy(), n_classes),
    }


@torch.no_grad()
def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rt: Runtime,
               train: TrainConfig, batch_size: int = 256) -> torch.Tensor:
    """``fn`` over a whole split, ``batch_size`` series at a time on ``rt.device``, no
    gradients; the float32 outputs concatenated (on the device).

    Always float32, whatever ``train.amp`` says: ``train.amp`` is for training steps only. The
    predictions and readout features computed here are the ones a saved model reproduces
    (:mod:`cbdtune.serving` runs float32), so the test accuracy a search reports and what
    ``cbdtune.predict`` gives agree bit for bit on one machine. Under bf16 autocast they did not
    (1 of 320 gesture labels differed).
    """
    del train  # kept in the signature: callers pass their TrainConfig; it sets no precision here
    with torch.autocast(rt.device.type, enabled=False):  # also inside a caller's autocast
        return torch.cat([fn(x[i:i + batch_size].to(rt.device)).float()
                          for i in range(0, len(x), batch_size)])


def encode_split(model: CBDModel, x: torch.Tensor, rt: Runtime, train: TrainConfig,
                 batch_size: int = 256) -> torch.Tensor:
    """Frozen-encoder features [N, T, D] of a whole split (eval mode: no dropout, BN stats)."""
    was_training = model.training
    model.eval()
    feats = in_batches(model.encode, x, rt, train, batch_size)
    model.train(was_training)
    return feats
