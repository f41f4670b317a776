"""Positional encodings of the token sequence (``model.pos_encoding``).

[C] has none: its encoder is permutation-equivariant over tokens, and in the temporal decoder
every mask token sees the same inputs (see :mod:`cbdtune.model.encoder`). Here, as in MAE, one
encoding is added to the tokens before masking, so each visible token carries its position into
the encoder, and another to the restored sequence (visible + mask tokens, original order) before
the decoders, so mask tokens are told apart by where they are.

References:
    Vaswani et al., "Attention Is All You Need", NeurIPS 2017, https://arxiv.org/abs/1706.03762
        (Sec. 3.5, the sinusoidal encoding).
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
        https://arxiv.org/abs/2111.06377 (separate encoder and decoder position embeddings).
    Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021,
        https://arxiv.org/abs/2010.11929 (learned position embeddings, std 0.02 in timm).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LEARNED_INIT_STD = 0.02  # timm's ViT pos_embed init (trunc_normal_, std 0.02)


def sinusoidal_encoding(num_tokens: int, d_model: int) -> Tensor:
    """PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(t / 10000^(2i/D)), Vaswani et al.
    (2017) Sec. 3.5.

    Returns:
        (num_tokens, d_model) float32; an odd ``d_model`` drops the last cosine column.
    """
    t = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64)
                     / d_model)  # (ceil(D/2),)
    pe = torch.stack([torch.sin(t * freq), torch.cos(t * freq)], dim=-1)  # (T, ceil(D/2), 2)
    return pe.flatten(1)[:, :d_model].float()  # (T, D): sin, cos interleaved


class PositionalEncoding(nn.Module):
    """Adds a (T, D) encoding to (B, T, D) tokens: ``learned`` (a parameter) or ``sinusoidal``
    (a fixed, non-persistent buffer, so it is not in the ``state_dict``)."""

    def __init__(self, kind: str, num_tokens: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.weight = nn.Parameter(
                nn.init.trunc_normal_(torch.empty(num_tokens, d_model), std=LEARNED_INIT_STD))
        elif kind == "sinusoidal":
            self.register_buffer("weight", sinusoidal_encoding(num_tokens, d_model),
                                 persistent=False)
        else:
            raise ValueError(f"pos_encoding must be learned or sinusoidal, but got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        assert T == self.weight.shape[0], (
            f"positional encoding built for {self.weight.shape[0]} tokens, got {T}")
        return x + self.weight.to(x.dtype)  # (B, T, D) + (T, D)


def build_pos_encoding(kind: str, num_tokens: int, d_model: int) -> PositionalEncoding | None:
    """The encoding ``model.pos_encoding`` names, or None for ``"none"`` ([C]): no module, so the
    model's parameters, ``state_dict`` and random initialisation stay those of [C]."""
    return None if kind == "none" else PositionalEncoding(kind, num_tokens, d_model)
