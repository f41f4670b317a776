"""One trial: pretrain the CBD model, then linear-probe and/or fine-tune a classifier. Plain PyTorch.

Protocol (spec section 4) with one correction: the authors select the best *test* accuracy over
all (checkpoint, epoch) pairs; here every choice is made on a validation split carved from the
training set, and the test split is read exactly once, at the validation-selected point.

The functions know nothing of Ray. The Ray Train worker (``cbdtune.worker``) passes a
:class:`Runtime` (device, rank, world size, a DDP wrapper) and a ``report`` callable; tests pass
``Runtime()`` and ``list.append``-like callables.

    pretrain ──(every probe_every epochs: short linear probe -> val_accuracy, the ASHA signal)──┐
    linear_probe (frozen encoder, cached features) and/or fine_tune (all weights) ─ per epoch ──┤
    select the best validation point -> evaluate(test) once -> final report ────────────────────┘
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cbdtune.config import CbdtuneError, ExperimentConfig, TrainConfig
from cbdtune.data import Dataset
from cbdtune.losses import dual_constraint_loss
from cbdtune.model import CBDModel, ClassifierHead, build_model
from cbdtune.model.diagnostics import diagnose

# report(metrics, state): metrics is a flat dict of numbers (plus "stage"); state is None or a
# checkpoint payload (tensors and plain Python only, loadable with weights_only=True).
Report = Callable[[dict[str, Any], "dict[str, Any] | None"], None]

STAGES = ("linear_probe", "fine_tune")


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

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


@dataclass
class TrialResult:
    status: str  # "completed" | "diverged"
    metrics: dict[str, Any]  # the final report
    reason: str = ""


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


def _tensor(a: np.ndarray) -> torch.Tensor:
    # np.array(..., copy) because arrays from Ray's object store are read-only.
    return torch.from_numpy(np.array(a, copy=True))


def _loader(tensors: tuple[torch.Tensor, ...], batch_size: int, *, shuffle: bool, seed: int,
            rt: Runtime, drop_last: bool = False) -> DataLoader:
    """A loader over in-memory tensors; sharded by a DistributedSampler when data-parallel.

    The shuffle order of epoch ``e`` depends only on ``(seed, e)`` (see :func:`_epochs`), so a
    trial resumed from a checkpoint sees the same batches as one that never stopped.
    """
    ds = TensorDataset(*tensors)
    # drop_last only when it leaves at least one batch (gesture's 96 training series < 128).
    drop_last = drop_last and len(ds) // max(rt.world_size, 1) >= batch_size
    if rt.world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=rt.world_size, rank=rt.rank,
                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), drop_last=drop_last)


def _epochs(loader: DataLoader, epoch: int, seed: int) -> DataLoader:
    """Set the loader's shuffle order for ``epoch``."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # a different shard order every epoch
    elif loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
    return loader


def _progress(total: int, desc: str, rt: Runtime, initial: int = 0) -> Any:
    if not rt.progress or not rt.is_chief:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr)


@functools.cache  # a property of the hardware, asked once per batch by _autocast
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


def _fused(device: torch.device) -> bool:
    """Fused Adam(W): one kernel over all parameters instead of ~10 small ops per tensor, the
    same update. Default model, 2 CPU cores: the AdamW step takes ~5 ms instead of ~19 ms."""
    return device.type in ("cpu", "cuda")


def _autocast(rt: Runtime, train: TrainConfig) -> Any:
    # Mixed precision as on a GPU: matmuls and convs in bf16, the FFTs, the CBD spectral unit and
    # the losses in fp32 (they switch autocast off). On this project's 2-core AVX512-BF16 CPU a
    # default-model pretraining step runs 1.4-1.8x faster than in fp32 (results/throughput.md).
    enabled = train.amp and native_bf16(rt.device)
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=enabled)


def _check_finite(value: float, where: str, detail: dict[str, float] | None = None) -> None:
    if not math.isfinite(value):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in (detail or {}).items())
        raise TrialDiverged(f"{where}: loss is {value}" + (f" ({terms})" if terms else ""))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over the classes present in ``true`` or ``pred``."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


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
def encode_split(model: CBDModel, x: torch.Tensor, rt: Runtime, train: TrainConfig,
                 batch_size: int = 256) -> torch.Tensor:
    """Frozen-encoder features [N, T, D] of a whole split (eval mode: no dropout, BN stats)."""
    was_training = model.training
    model.eval()
    feats = []
    with _autocast(rt, train):
        for i in range(0, len(x), batch_size):
            feats.append(model.encode(x[i:i + batch_size].to(rt.device)).float())
    model.train(was_training)
    return torch.cat(feats)


# ---- pretraining (Eq. 14) ----------------------------------------------------------------------


def pretrain_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer,
                   cfg: ExperimentConfig, rt: Runtime, gen: torch.Generator,
                   epoch: int) -> dict[str, float]:
    """One epoch of masked pretraining; returns the mean of every loss term."""
    model.train()
    sums: dict[str, float] = {}
    n = 0
    for (xb,) in _epochs(loader, epoch, cfg.train.seed):
        xb = xb.to(rt.device, non_blocking=True)
        with _autocast(rt, cfg.train):
            out = model(xb, generator=gen)
            terms = dual_constraint_loss(xb, out, cfg.loss)
        total = terms["total"]
        _check_finite(total.item(), f"pretrain epoch {epoch}",
                      {k: v.item() for k, v in terms.items() if k != "total"})
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(xb)
        n += len(xb)
    return {f"loss.{k}": v / max(n, 1) for k, v in sums.items()}


def pretrain(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
             report: Report, *, state: dict[str, Any] | None = None) -> CBDModel:
    """Masked pretraining on the training split (labels unused) with fidelity probes.

    Every ``train.probe_every`` epochs (and after the last) a short linear probe on frozen
    features gives a validation accuracy: the signal ASHA stops trials on. Each such evaluation
    point is reported with a checkpoint payload so that a retried trial resumes from it.

    Args:
        model: the freshly built (or checkpoint-restored) model, on ``rt.device``.
        data: train/val splits are used; test is never touched here.
        cfg: the experiment; ``train.pretrain_*`` and ``loss`` are read.
        rt: device and data-parallel layout.
        report: called at each evaluation point with (metrics, checkpoint payload).
        state: a payload from an earlier report of this stage to resume from.

    Raises:
        TrialDiverged: a loss term became NaN or infinite.
    """
    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.pretrain_lr, weight_decay=tc.weight_decay,
                            betas=(tc.beta1, tc.beta2), fused=_fused(rt.device))
    # Masks differ between data-parallel ranks; the draw sequence is part of the checkpoint.
    gen = torch.Generator(device=rt.device).manual_seed(tc.seed * 1000 + rt.rank)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["mask_rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws continue where they stopped
        start = int(state["epoch"])
    if tc.pretrain_epochs == 0:
        return model
    wrapped = rt.wrap_model(model)
    per_rank = max(1, tc.batch_size // rt.world_size)  # same global batch for any worker count
    loader = _loader((_tensor(data.train.x),), per_rank, shuffle=True, seed=tc.seed, rt=rt,
                     drop_last=True)  # [C] drop_last
    bar = _progress(tc.pretrain_epochs, "pretrain", rt, initial=start)
    for epoch in range(start + 1, tc.pretrain_epochs + 1):
        losses = pretrain_epoch(wrapped, loader, opt, cfg, rt, gen, epoch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss.total']:.4f}")
        if epoch % tc.probe_every == 0 or epoch == tc.pretrain_epochs:
            probe = _fidelity_probe(model, data, cfg, rt)
            metrics = {"stage": "pretrain", "epoch": epoch, **losses,
                       **{f"val_{k}": v for k, v in probe.items()},
                       **diagnose(model, _tensor(data.val.x[:64]).to(rt.device))}
            # A snapshot: state_dict() tensors alias the live weights, which keep training.
            payload = copy.deepcopy({"stage": "pretrain", "epoch": epoch,
                                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "mask_rng": gen.get_state(),
                                     "torch_rng": torch.get_rng_state()})
            report(metrics, payload)
    if bar is not None:
        bar.close()
    return model


def _fidelity_probe(model: CBDModel, data: Dataset, cfg: ExperimentConfig,
                    rt: Runtime) -> dict[str, float]:
    """A short linear probe (``train.probe_epochs``) on the current encoder; val metrics only."""
    short = replace(cfg.train, classifier_epochs=cfg.train.probe_epochs, early_stop_patience=0)
    result = _train_classifier(model, data, replace(cfg, train=short), rt, "linear_probe",
                               report=None)
    return result["val"]


# ---- classifier stages -----------------------------------------------------------------------


class _Classifier(nn.Module):
    """Encoder + head for fine-tuning. Decoders are not part of it (DDP sees only used params)."""

    def __init__(self, model: CBDModel, head: ClassifierHead) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode(x))


def _train_classifier(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
                      stage: str, report: Report | None) -> dict[str, Any]:
    """Train a fresh head (and, for fine_tune, the encoder); keep the best validation point.

    Linear probe runs on features cached once from the frozen encoder in eval mode: identical
    to re-running the frozen encoder every epoch, and ~100x cheaper (the authors re-encode).

    Returns:
        ``{"val": metrics at the selected epoch, "epoch": it, "state": weights to restore it}``.
    """
    tc = cfg.train
    n_classes = data.n_classes
    gen = torch.Generator().manual_seed(tc.seed + (1 if stage == "linear_probe" else 2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        head = ClassifierHead(model.num_tokens, cfg.model.d_model, n_classes).to(rt.device)

    y_train, y_val = _tensor(data.train.y), _tensor(data.val.y)
    if stage == "linear_probe":
        inputs_train = encode_split(model, _tensor(data.train.x), rt, tc)
        inputs_val = encode_split(model, _tensor(data.val.x), rt, tc)
        trainable: nn.Module = head
        forward = head
    else:
        model_ft = copy.deepcopy(model)  # the pretrained encoder stays intact for later stages
        for p in model_ft.parameters():  # decoders stay frozen: they are not in the classifier
            p.requires_grad_(False)
        for p in model_ft.encoder_parameters():
            p.requires_grad_(True)
        trainable = _Classifier(model_ft, head)
        forward = trainable
        inputs_train, inputs_val = _tensor(data.train.x), _tensor(data.val.x)

    wrapped = rt.wrap_model(trainable)
    opt = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad],
                           lr=tc.classifier_lr, fused=_fused(rt.device))  # [C] Adam
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience)
    per_rank = max(1, tc.batch_size // rt.world_size)
    loader = _loader((inputs_train, y_train), per_rank, shuffle=True, seed=tc.seed, rt=rt)
    val_x = inputs_val.to(rt.device)

    best: dict[str, Any] = {"val": {"accuracy": -1.0, "loss": math.inf}, "epoch": 0, "state": None}
    bar = _progress(tc.classifier_epochs, stage, rt) if report is not None else None
    since_best = 0
    for epoch in range(1, tc.classifier_epochs + 1):
        trainable.train()
        total, n = 0.0, 0
        for xb, yb in _epochs(loader, epoch, tc.seed):
            xb, yb = xb.to(rt.device, non_blocking=True), yb.to(rt.device, non_blocking=True)
            with _autocast(rt, tc):
                loss = F.cross_entropy(wrapped(xb).float(), yb)
            _check_finite(loss.item(), f"{stage} epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
            n += len(xb)
        trainable.eval()
        with _autocast(rt, tc):
            val = evaluate(forward, val_x, y_val, n_classes)
        sched.step(val["loss"])
        # Select on validation accuracy; ties go to the lower validation loss.
        if (val["accuracy"], -val["loss"]) > (best["val"]["accuracy"], -best["val"]["loss"]):
            best = {"val": val, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in trainable.state_dict().items()}}
            since_best = 0
        else:
            since_best += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")
        if report is not None:
            report({"stage": stage, "epoch": epoch, "train_loss": total / max(n, 1),
                    **{f"val_{k}": v for k, v in val.items()},
                    "lr": opt.param_groups[0]["lr"]}, None)
        if tc.early_stop_patience and since_best >= tc.early_stop_patience:
            break
    if bar is not None:
        bar.close()
    return best


def _test_forward(model: CBDModel, trainable: nn.Module, stage: str, rt: Runtime,
                  tc: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inputs -> logits for raw series, whatever the stage trained."""
    if stage == "linear_probe":
        return lambda x: trainable(encode_split(model, x, rt, tc))
    return lambda x: trainable(x.to(rt.device))


def linear_probe(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
                 report: Report | None = None) -> dict[str, Any]:
    """Frozen encoder, MLP head trained ([C] head); selection on validation accuracy."""
    return _train_classifier(model, data, cfg, rt, "linear_probe", report)


def fine_tune(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
              report: Report | None = None) -> dict[str, Any]:
    """Encoder and head trained together from the pretrained weights."""
    return _train_classifier(model, data, cfg, rt, "fine_tune", report)


# ---- the trial ---------------------------------------------------------------------------------


def build_for(data: Dataset, cfg: ExperimentConfig) -> tuple[ExperimentConfig, CBDModel]:
    """Fill the dataset's shape into the model config and build the model (seeded)."""
    mc = replace(cfg.model, in_channels=data.n_channels, seq_len=data.seq_len,
                 num_classes=data.n_classes)
    cfg = replace(cfg, model=mc)
    seed_everything(cfg.train.seed)
    return cfg, build_model(mc)


def _stages(tc: TrainConfig) -> Iterator[str]:
    if tc.classifier in ("linear_probe", "both"):
        yield "linear_probe"
    if tc.classifier in ("fine_tune", "both"):
        yield "fine_tune"


def run_trial(cfg: ExperimentConfig, data: Dataset, report: Report, *,
              rt: Runtime | None = None, state: dict[str, Any] | None = None) -> TrialResult:
    """Pretrain -> classifier stage(s) -> test once at the validation-selected point.

    Args:
        cfg: the whole experiment (validated).
        data: train/val/test splits; test is read once, at the end.
        report: ``report(metrics, payload)`` at every evaluation point; the last call carries the
            final metrics (``final=1``, ``test_accuracy``, ``test_f1``, the selected stage).
        rt: device and data-parallel layout; ``Runtime(resolve_device(cfg.train))`` if None.
        state: a checkpoint payload from an earlier ``report`` of this trial to resume from.

    Returns:
        A :class:`TrialResult`; ``status="diverged"`` with the reason when a loss became NaN/inf
        (that reason is also in the final report).
    """
    rt = rt or Runtime(device=resolve_device(cfg.train))
    t0 = time.perf_counter()
    if cfg.train.num_threads and rt.device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads)
    cfg, model = build_for(data, cfg)
    model.to(rt.device)
    done_stages: dict[str, dict[str, Any]] = {}
    pre_state = None
    if state is not None:
        model.load_state_dict(state["model"])
        done_stages = {s: dict(v) for s, v in state.get("stages", {}).items()}
        pre_state = state if state["stage"] == "pretrain" else None
    if cfg.train.compile:
        model.compile()

    def report_with_stages(metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        if payload is not None:
            payload = {**payload, "stages": dict(done_stages)}
        report(metrics, payload)

    try:
        if state is None or state["stage"] == "pretrain":
            pretrain(model, data, cfg, rt, report_with_stages, state=pre_state)
        candidates: dict[str, dict[str, Any]] = {}
        for stage in _stages(cfg.train):
            if stage in done_stages:  # finished before a restart: re-use its selection
                candidates[stage] = done_stages[stage]
                continue
            result = _train_classifier(model, data, cfg, rt, stage, report_with_stages)
            candidates[stage] = {"val": result["val"], "epoch": result["epoch"],
                                 "weights": result["state"]}
            done_stages[stage] = candidates[stage]
            report_with_stages({"stage": stage, "epoch": result["epoch"], "stage_done": 1,
                                **{f"val_{k}": v for k, v in result["val"].items()}},
                               {"stage": stage, "epoch": result["epoch"],
                                "model": copy.deepcopy(model.state_dict())})
    except TrialDiverged as exc:
        # val_accuracy 0: a diverged configuration ranks below every trial that trained.
        final = {"stage": "final", "final": 1, "diverged": 1, "reason": str(exc),
                 "val_accuracy": 0.0,
                 "wall_s": time.perf_counter() - t0}
        report(final, None)
        return TrialResult(status="diverged", metrics=final, reason=str(exc))

    final = _select_and_test(model, data, cfg, rt, candidates)
    final.update({"stage": "final", "final": 1, "diverged": 0,
                  "wall_s": time.perf_counter() - t0,
                  "n_params": sum(p.numel() for p in model.parameters())})
    if len(data.val) > 0:
        final.update(diagnose(model, _tensor(data.val.x[:64]).to(rt.device)))
    report(final, None)
    return TrialResult(status="completed", metrics=final)


def _select_and_test(model: CBDModel, data: Dataset, cfg: ExperimentConfig, rt: Runtime,
                     candidates: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pick the stage with the best validation accuracy; read the test split once, there."""
    order = sorted(candidates, key=lambda s: (candidates[s]["val"]["accuracy"],
                                              -candidates[s]["val"]["loss"]), reverse=True)
    chosen = order[0]
    pick = candidates[chosen]
    final: dict[str, Any] = {
        "selected_stage": chosen, "selected_epoch": pick["epoch"],
        **{f"val_{k}": v for k, v in pick["val"].items()},
    }
    for stage, c in candidates.items():
        final[f"{stage}.val_accuracy"] = c["val"]["accuracy"]
    if data.test is None:
        return final
    tc = cfg.train
    head = ClassifierHead(model.num_tokens, cfg.model.d_model, data.n_classes).to(rt.device)
    if chosen == "linear_probe":
        head.load_state_dict(pick["weights"])
        head.eval()
        forward = _test_forward(model, head, chosen, rt, tc)
    else:
        clf = _Classifier(copy.deepcopy(model), head)
        clf.load_state_dict(pick["weights"])
        clf.eval()
        forward = _test_forward(model, clf, chosen, rt, tc)
    model.eval()
    with _autocast(rt, tc):
        test = evaluate(forward, _tensor(data.test.x).to(rt.device), _tensor(data.test.y),
                        data.n_classes)
    final.update({f"test_{k}": v for k, v in test.items()})
    return final
