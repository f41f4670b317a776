"""Series normalisation, tokenizers (series -> tokens) and detokenizers (tokens -> series).

Two tokenizer families, each paired with the detokenizer that inverts its length arithmetic so the
decoders can reconstruct a series of ANY length (the authors' code crashes on odd lengths):

* ``conv``  [C] three blocks Conv1d(k=8, pad 4) -> BatchNorm -> ReLU -> MaxPool1d(2, 2, pad 1),
  channels C -> 32 -> 64 -> d_model, then Linear(d_model -> d_model). About L/8 tokens
  (HAR 128 -> 18). Inverse: three ConvTranspose1d(k=8, pad 4) -> BN -> ReLU -> Upsample(x2)
  blocks d_model -> 64 -> 32 -> C, cropped to L.
* ``patch`` TimeMAE-style non-overlapping windows of ``patch_size`` steps (tail padded),
  Linear(C*p -> d_model). Inverse: Linear(d_model -> C*p), unfold, crop.

Token rate by rule [I] (``model.min_tokens`` = M): a short series gets at least M tokens when its
length allows. The conv stack pools in as many of its first blocks (3, as [C], down to 0) as keep
``conv_num_tokens(L) >= M``, and its inverse upsamples in the mirrored blocks; the patch tokenizer
uses the largest window <= ``patch_size`` with ``ceil(L / p) >= M``. Pooling and upsampling carry
no parameters, so the weights' shapes do not depend on the rule; M <= the [C] count changes nothing
(gesture, 315 steps: 42 tokens; 144 steps: 20; 50 steps: 8).

References:
    [P] Han et al., "Content-aware Balanced Spectrum Encoding in Masked Modeling for Time Series
        Classification", AAAI 2025, https://arxiv.org/abs/2412.13232
    [C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py (conv_block*, deconv_block*)
    TimeMAE: Cheng et al., https://arxiv.org/abs/2303.00320 (patch tokens)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbdtune.config import ModelConfig

NORM_EPS = 1e-5  # [C]'s eps, now RELATIVE: times the series' mean channel variance (see below)


def series_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and the normaliser's std of raw series: (B, C, L) -> two (B, C, 1).

    ``std = sqrt(var + eps)`` with ``eps = NORM_EPS * mean_c(var_c) + tiny``: [C] adds an
    absolute 1e-5 to the variance, which is right only for series of unit scale (the
    z-normalised archives, where the two agree); on the same series in other units (x 1e-3,
    variance 1e-6) it flattens every channel and the labels change. Relative to the series' own
    scale, the eps scales with the input and the normalised series does not depend on the units.
    ``tiny`` (the dtype's smallest normal number) keeps an all-zero series finite.

    The mean is taken in float64 and rounded once, so a constant channel is centred to exactly
    0 (a float32 sum of n copies of 0.1 is not n * 0.1) and normalises to 0 even when every
    channel is constant, where the relative eps alone would not damp the rounding residue.
    """
    mean = x.double().mean(dim=-1, keepdim=True).to(x.dtype).detach()  # [C] detaches the mean
    # the biased variance of the centred x; x.var() recomputes the mean in a ~20x slower kernel
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    eps = NORM_EPS * var.mean(dim=1, keepdim=True) + torch.finfo(var.dtype).tiny  # (B, 1, 1)
    return mean, torch.sqrt(var + eps)


def normalize_series(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample, per-channel z-normalisation over time, no affine ([C]; RevIN-style).

    The eps inside the std is relative to the series' own scale (:func:`series_moments`), so
    ``x * k + b`` for a global k > 0 normalises to the same series as ``x`` (up to float
    rounding); a constant channel gives 0.

    Args:
        x: (B, C, L) raw series.

    Returns:
        ``(x_norm, mean, std)`` with mean and std of shape (B, C, 1), kept to de-normalise.
    """
    mean, std = series_moments(x)
    return (x - mean) / std, mean, std


# ---- conv tokenizer [C] ----------------------------------------------------------------------

_CONV_K, _CONV_PAD = 8, 4


CONV_BLOCKS = 3  # [C]


def conv_num_tokens(seq_len: int, pools: int = CONV_BLOCKS) -> int:
    """Tokens the conv stack makes from ``seq_len`` steps when its first ``pools`` blocks pool
    (exact, any length)."""
    n = seq_len
    for i in range(CONV_BLOCKS):
        n = n + 1  # Conv1d(k=8, pad=4): L + 2*4 - 8 + 1
        if i < pools:
            n = n // 2 + 1  # MaxPool1d(2, 2, pad=1): floor((L + 2 - 2) / 2) + 1
    return n


def conv_pools(seq_len: int, min_tokens: int) -> int:
    """How many of the conv stack's blocks pool: the most (at most 3, [C]) that leave
    ``seq_len`` steps at least ``min_tokens`` tokens; 0 when even no pooling falls short."""
    return next((p for p in range(CONV_BLOCKS, 0, -1)
                 if conv_num_tokens(seq_len, p) >= min_tokens), 0)


def conv_detokenized_len(num_tokens: int, pools: int = CONV_BLOCKS) -> int:
    """Length the deconv stack makes from ``num_tokens``: T -> 2(T-1) per upsampling block
    (8T - 14 for three), T -> T - 1 per block without.

    A pooling block maps n -> (n + 1) // 2 + 1 and its mirror maps that back to
    2 * ((n + 1) // 2) >= n; a plain block maps n -> n + 1 -> n. So the stack always makes at
    least L steps and a crop suffices (asserted at construction anyway).
    """
    n = num_tokens
    for i in reversed(range(CONV_BLOCKS)):  # mirrored: the last tokenizer block first
        n = n - 1  # ConvTranspose1d(k=8, pad=4): (L-1) - 8 + 8 = L - 1
        if i < pools:
            n = 2 * n  # Upsample x2
    return n


class _PairMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        L = x.shape[-1]
        n = L // 2 + 1
        padded = F.pad(x, (1, 2 * n - L - 1), value=float("-inf"))  # (..., 2n)
        even, odd = padded[..., 0::2], padded[..., 1::2]
        if ctx.needs_input_grad[0]:  # not under no_grad or with a frozen tokenizer
            # ties go to the first step, as in max_pool1d
            ctx.save_for_backward((odd > even).to(x.dtype))
            ctx.length = L
        return torch.maximum(even, odd)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (take_odd,) = ctx.saved_tensors
        to_odd = grad * take_odd
        padded = torch.stack((grad - to_odd, to_odd), dim=-1).flatten(-2)  # (..., 2n)
        return padded[..., 1 : ctx.length + 1]


class MaxPool2(nn.Module):
    """``nn.MaxPool1d(kernel_size=2, stride=2, padding=1)``: same outputs, same gradients.

    Why: with autograd on, CPU ``max_pool1d`` takes the generic ``max_pool2d_with_indices``
    kernel, ~5 ms forward + backward for a (128, 64, 160) bf16 batch. The windows do not
    overlap, so the pool is the max of the even and odd steps of the padded series: ~2 ms.
    """

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L) -> (B, C, L // 2 + 1)
        return _PairMax.apply(x)


class ConvTokenizer(nn.Module):
    """[C] conv stack: (B, C, L) -> (B, T, D), T = conv_num_tokens(L, pools); the first
    ``pools`` blocks pool (3 in [C])."""

    def __init__(self, in_channels: int, d_model: int, pools: int = CONV_BLOCKS):
        super().__init__()
        chans = (in_channels, 32, 64, d_model)
        self.pools = pools
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                nn.Conv1d(c_in, c_out, _CONV_K, padding=_CONV_PAD, bias=False),  # bias: BN follows
                nn.BatchNorm1d(c_out),
                nn.ReLU(),
                # MaxPool1d(kernel_size=2, stride=2, padding=1); no parameters either way
                MaxPool2() if i < pools else nn.Identity(),
            )
            for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True))
        ])
        self.proj = nn.Linear(d_model, d_model)  # [C] patch_to_embedding

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)  # (B, D, T)
        return self.proj(x.transpose(1, 2))  # (B, T, D)


class ConvDetokenizer(nn.Module):
    """[C] deconv stack: (B, T, D) -> (B, C, L), cropped to ``seq_len``.

    Deviation [I]: the last block drops the ReLU. In [C] the final BN -> ReLU makes every
    normalised output >= 0, i.e. the reconstruction can never go below the per-channel mean,
    which puts a floor under both reconstruction losses. BN is kept so the output scale matches
    the normalised target as in [C].
    """

    def __init__(self, d_model: int, out_channels: int, seq_len: int, num_tokens: int,
                 pools: int = CONV_BLOCKS):
        super().__init__()
        made = conv_detokenized_len(num_tokens, pools)
        assert made >= seq_len, (f"deconv stack makes {made} steps from {num_tokens} tokens, "
                                 f"fewer than seq_len={seq_len}")
        self.seq_len = seq_len
        chans = (d_model, 64, 32, out_channels)
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            last = i == len(chans) - 2
            upsample = CONV_BLOCKS - 1 - i < pools  # mirrors tokenizer block 2 - i
            blocks.append(nn.Sequential(
                nn.ConvTranspose1d(c_in, c_out, _CONV_K, padding=_CONV_PAD, bias=False),
                nn.BatchNorm1d(c_out),
                *([] if last else [nn.ReLU()]),
                # nearest; after the conv so the conv runs at T/2
                *([nn.Upsample(scale_factor=2)] if upsample else []),
            ))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, h: Tensor) -> Tensor:
        y = self.blocks(h.transpose(1, 2))  # (B, D, T) -> (B, C, conv_detokenized_len(T))
        return y[..., : self.seq_len]  # (B, C, L)


# ---- patch tokenizer (TimeMAE style) ---------------------------------------------------------


def patch_num_tokens(seq_len: int, patch_size: int) -> int:
    return -(-seq_len // patch_size)  # ceil: the tail window is padded


def patch_window(seq_len: int, patch_size: int, min_tokens: int) -> int:
    """The window the patch tokenizer uses: the largest ``p <= patch_size`` with
    ``ceil(seq_len / p) >= min_tokens``; 1 (one token per step) when none does."""
    return next((p for p in range(patch_size, 1, -1)
                 if patch_num_tokens(seq_len, p) >= min_tokens), 1)


class PatchTokenizer(nn.Module):
    """Non-overlapping windows: (B, C, L) -> (B, T, D), T = ceil(L / p)."""

    def __init__(self, in_channels: int, d_model: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, C, L = x.shape
        p = self.patch_size
        T = patch_num_tokens(L, p)
        x = F.pad(x, (0, T * p - L))  # zeros = the channel mean after normalisation
        x = x.view(B, C, T, p).permute(0, 2, 1, 3).reshape(B, T, C * p)  # (B, T, C*p)
        return self.proj(x)  # (B, T, D)


class PatchDetokenizer(nn.Module):
    """Inverse of :class:`PatchTokenizer`: (B, T, D) -> (B, C, L)."""

    def __init__(self, d_model: int, out_channels: int, seq_len: int, patch_size: int):
        super().__init__()
        self.out_channels, self.seq_len, self.patch_size = out_channels, seq_len, patch_size
        self.proj = nn.Linear(d_model, out_channels * patch_size)

    def forward(self, h: Tensor) -> Tensor:
        B, T, _ = h.shape
        y = self.proj(h).view(B, T, self.out_channels, self.patch_size)  # (B, T, C, p)
        y = y.permute(0, 2, 1, 3).reshape(B, self.out_channels, T * self.patch_size)  # (B, C, T*p)
        return y[..., : self.seq_len]  # (B, C, L)


# ---- factories -------------------------------------------------------------------------------


def num_tokens(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Token count T for ``seq_len`` (default ``cfg.seq_len``) under ``cfg.tokenizer`` and the
    token-rate rule (``cfg.min_tokens``)."""
    seq_len = cfg.seq_len if seq_len is None else seq_len
    if cfg.tokenizer == "conv":
        return conv_num_tokens(seq_len, conv_pools(seq_len, cfg.min_tokens))
    return patch_num_tokens(seq_len, patch_window(seq_len, cfg.patch_size, cfg.min_tokens))


def build_tokenizer(cfg: ModelConfig) -> nn.Module:
    if cfg.tokenizer == "conv":
        return ConvTokenizer(cfg.in_channels, cfg.d_model,
                             conv_pools(cfg.seq_len, cfg.min_tokens))
    return PatchTokenizer(cfg.in_channels, cfg.d_model,
                          patch_window(cfg.seq_len, cfg.patch_size, cfg.min_tokens))


def build_detokenizer(cfg: ModelConfig) -> nn.Module:
    """A fresh detokenizer matching ``cfg.tokenizer``; each decoder owns its own ([C])."""
    if cfg.tokenizer == "conv":
        return ConvDetokenizer(cfg.d_model, cfg.in_channels, cfg.seq_len, num_tokens(cfg),
                               conv_pools(cfg.seq_len, cfg.min_tokens))
    return PatchDetokenizer(cfg.d_model, cfg.in_channels, cfg.seq_len,
                            patch_window(cfg.seq_len, cfg.patch_size, cfg.min_tokens))
