"""Random token masking and the transformer encoder over visible tokens (MAE style).

References:
    [P] Han et al., AAAI 2025, https://arxiv.org/abs/2412.13232 (TimeMAE backbone, ratio 0.75)
    [C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py (BaseModel.pretrain)
    MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
        https://arxiv.org/abs/2111.06377 (argsort-of-noise masking, ids_restore)

No positional encoding by default ([C]; ``model.pos_encoding`` adds one, see
:mod:`cbdtune.model.pos_encoding`). Without it the encoder is permutation-equivariant over
tokens, so the order of the visible tokens it receives does not matter; position information
enters only through the conv tokenizer's receptive field, the spectral (FFT along tokens) CBD
blocks and the detokenizers' convolutions. A consequence the authors accept: in the temporal
decoder's transformer layers every mask token sees the same inputs and gets the same output;
they are told apart only by the deconv stack afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_masking(
    batch: int,
    num_tokens: int,
    num_masked: int,
    *,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose exactly ``num_masked`` of ``num_tokens`` tokens to mask, by argsort of uniform noise.

    Args:
        batch: B.
        num_tokens: T.
        num_masked: tokens to mask per sample, 0 <= num_masked < T.
        per_sample: one mask per sample ([P]); False shares one mask across the batch ([C]).
        generator: drives the noise; on its own device, the result is moved to ``device``.
        device: where the returned indices live.

    Returns:
        ``ids_keep`` (B, T - num_masked): token indices the encoder sees, in shuffled order;
        ``ids_restore`` (B, T): position of each token in the shuffled order, used to put
        ``[encoded visible, mask tokens]`` back into the original order;
        ``mask`` (B, T) bool, True = masked.
    """
    assert 0 <= num_masked < num_tokens, f"num_masked={num_masked} for num_tokens={num_tokens}"
    noise_device = generator.device if generator is not None else device
    rows = batch if per_sample else 1
    noise = torch.rand(rows, num_tokens, generator=generator, device=noise_device)
    ids_shuffle = noise.to(device).argsort(dim=1)  # (rows, T): the first T - num_masked are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # (rows, T): inverse permutation
    n_keep = num_tokens - num_masked
    mask = ids_restore >= n_keep  # a token is masked iff its shuffled position is past the kept
    ids_keep = ids_shuffle[:, :n_keep]
    if not per_sample:
        ids_keep, ids_restore, mask = (t.expand(batch, -1) for t in (ids_keep, ids_restore, mask))
    return ids_keep, ids_restore, mask


# int16 bit patterns of 1.0: the 0/1 mask is made in int16 and viewed as the 16-bit float type
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


def fast_dropout_supported(dtype: torch.dtype, p: float) -> bool:
    """Whether :func:`dropout_keep_mask` handles ``dtype`` and ``p`` (p at least one 2**-16)."""
    return (dtype in _ONE_BITS or dtype == torch.float32) and 0 < round(p * 2**16) < 2**16


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """CPU tensor of 0.0 (drop, probability p) and 1.0 (keep) in ``dtype`` (bf16, fp16, fp32).

    Why not ``bernoulli_``: on CPU it draws one MT19937 number per element, serially (~7 ns per
    element here; its vectorised MKL path is taken on Intel CPUs only), and applying a bool mask
    (``masked_fill_``, ``where``) is another slow pass. Here numpy's SFC64 fills 16 random bits
    per element (~0.5 ns per element), and two in-place int16 ops turn each field into 0 or 1,
    so applying the mask is a plain ``mul_``. p is quantised to 2**-16 (0.1 -> 0.100006). The
    SFC64 seed comes from torch's default generator, so ``torch.manual_seed`` makes it
    reproducible, like ``F.dropout``.
    """
    numel = math.prod(shape)
    seed = int(torch.randint(2**62, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((numel + 3) // 4)  # uint64, all bits uniform
    fields = torch.from_numpy(words.view(np.int16))[:numel]  # uniform over [-2**15, 2**15)
    t = -(2**15) + round(p * 2**16)  # drop iff field < t
    keep = fields.clamp_(t - 1, t).sub_(t - 1)  # t - 1 or t -> 0 or 1
    if dtype == torch.float32:
        return keep.to(dtype).view(shape)
    return keep.mul_(_ONE_BITS[dtype]).view(dtype).view(shape)  # bit patterns of 0.0 and 1.0


class _InplaceDropout(torch.autograd.Function):
    """Dropout (optionally after ReLU) applied in place to a freshly computed activation.

    Why: on 2 CPU cores every out-of-place pass over a (B, T, 2048) FFN activation costs as much
    as a small matmul (a fresh 44 MB buffer for gesture in fp32). ``F.dropout(F.relu(h))``
    makes three such buffers (ReLU output, float Bernoulli mask, product) and saves two for
    backward; this makes one (the keep mask, in the activation's dtype) and saves only the
    output, which the next linear layer saves anyway.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float, relu: bool) -> Tensor:
        ctx.mark_dirty(x)
        ctx.scale, ctx.relu = 1.0 / (1.0 - p), relu
        keep = dropout_keep_mask(x.shape, p, x.dtype)
        if relu:
            x.relu_()
        x.mul_(keep).mul_(ctx.scale)
        # with ReLU, out == 0 exactly where the gradient is 0 (dropped or negative input)
        ctx.save_for_backward(x if relu else keep)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (saved,) = ctx.saved_tensors
        if ctx.relu:
            g = torch.ops.aten.threshold_backward(grad, saved, 0.0)
        else:
            g = grad * saved
        return g.mul_(ctx.scale), None, None


def dropout_(x: Tensor, p: float, training: bool, *, relu: bool = False) -> Tensor:
    """``F.dropout(F.relu(x) if relu else x, p, training)``, overwriting ``x`` on CPU.

    ``x`` must be a fresh activation nothing else needs (e.g. a linear layer's output). CUDA
    and torch.compile keep PyTorch's fused dropout.
    """
    if (not training or p == 0.0 or x.device.type != "cpu" or not x.is_contiguous()
            or not fast_dropout_supported(x.dtype, p)
            or torch.compiler.is_compiling()):  # inductor fuses F.dropout itself
        return F.dropout(F.relu(x) if relu else x, p, training)
    return _InplaceDropout.apply(x, p, relu)


class TransformerLayer(nn.Module):
    """Post-norm transformer layer with the defaults of ``nn.TransformerEncoderLayer`` ([C]).

    Same computation as ``nn.TransformerEncoderLayer(d, h, ff, dropout, batch_first=True)``
    (ReLU, dropout on attention weights, after attention and in the FFN, post-norm), written
    with one fused qkv projection and ``F.scaled_dot_product_attention`` so training takes the
    fused attention kernels rather than the generic multi-head-attention path, and with the
    in-place CPU dropout of :func:`dropout_`.
    """

    def __init__(self, d_model: int, n_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model={d_model} not divisible by n_heads={n_heads}"
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, ff_dim)
        self.ff2 = nn.Linear(ff_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs)
        # Rows (B*T, D) from here: a 2D linear returns a fresh tensor (3D returns a view), which
        # the in-place dropout can overwrite without autograd's view replay.
        a = a.transpose(1, 2).reshape(B * T, D)
        x = self.norm1(x.reshape(B * T, D) + dropout_(self.out_proj(a), p, self.training))
        h = dropout_(self.ff1(x), p, self.training, relu=True)  # (B*T, ff)
        x = self.norm2(x + dropout_(self.ff2(h), p, self.training))
        return x.view(B, T, D)


class Encoder(nn.Module):
    """[C] a stack of post-norm transformer layers, no final norm: (B, N, D) -> (B, N, D)."""

    def __init__(self, d_model: int, n_heads: int, num_layers: int, ff_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [TransformerLayer(d_model, n_heads, ff_dim, dropout) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
