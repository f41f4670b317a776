"""Per-layer diagnostics of the two phenomena CBD targets, for logging per trial.

(a) Spectrum energy imbalance: the fraction of the encoder features' energy (|rfft along
    tokens|^2, summed over batch and hidden channels) in the low / mid / high third of the
    token-frequency bins (DC counts as low). A growing low fraction with depth is the
    low-frequency bias the SER unit rebalances.
(b) Feature homogenisation (rank collapse): the effective rank of each sample's (T x D) token
    matrix, exp(entropy of its normalised singular values), averaged over the batch; it lies in
    [1, min(T, D)] and falls towards 1 as tokens become alike.

References:
    Han et al., AAAI 2025, https://arxiv.org/abs/2412.13232 (Sec. 1, the two phenomena)
    O. Roy, M. Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbdtune.model.cbd_model import CBDModel

_BANDS = ("low", "mid", "high")


def band_energy(h: Tensor) -> Tensor:
    """(B, T, D) features -> (3,) energy fractions in the low / mid / high token-frequency bins."""
    power = torch.fft.rfft(h.float(), dim=1).abs().square().sum(dim=(0, 2))  # (S,)
    bands = torch.stack([b.sum() for b in torch.tensor_split(power, 3)])  # (3,): 3 slices, not k
    return bands / bands.sum().clamp_min(torch.finfo(bands.dtype).tiny)


def effective_rank(h: Tensor) -> Tensor:
    """(B, T, D) features -> scalar mean effective rank of the per-sample (T, D) matrices."""
    s = torch.linalg.svdvals(h.float())  # (B, min(T, D))
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # 0 log 0 = 0
    return entropy.exp().mean()


@torch.no_grad()
def diagnose(model: CBDModel, x: Tensor) -> dict[str, float]:
    """Energy fractions and effective rank of the tokenizer output and every encoder layer.

    Runs in eval mode on all tokens (no masking, as a classifier sees them) and restores the
    model's train/eval mode.

    Args:
        model: a :class:`CBDModel`.
        x: (B, C, L) raw series.

    Returns:
        Flat MLflow-safe keys: ``diag.energy_{low,mid,high}.{tok,layer0..}`` in [0, 1] summing to
        1 per layer, and ``diag.erank.{tok,layer0..}`` in [1, min(T, D)].
    """
    was_training = model.training
    model.eval()
    try:
        h = model.tokenize(x)[0]  # (B, T, D), with the positional encoding the encoder reads
        feats = {"tok": h}
        for i, layer in enumerate(model.encoder.layers):
            h = layer(h)
            feats[f"layer{i}"] = h
        out: dict[str, float] = {}
        for name, f in feats.items():
            for band, frac in zip(_BANDS, band_energy(f).tolist(), strict=True):
                out[f"diag.energy_{band}.{name}"] = frac
            out[f"diag.erank.{name}"] = effective_rank(f).item()
        return out
    finally:
        model.train(was_training)
