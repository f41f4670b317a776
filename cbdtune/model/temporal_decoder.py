"""Temporal decoder (TD): reconstructs the whole series from the unmasked token sequence.

[C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py: 2 transformer layers (2 heads)
-> Linear(D -> D) -> deconv stack -> crop to L; the model de-normalises the result.
"""

from __future__ import annotations

from torch import Tensor, nn

from cbdtune.config import ModelConfig
from cbdtune.model.encoder import TransformerLayer
from cbdtune.model.tokenizer import build_detokenizer


class TemporalDecoder(nn.Module):
    """(B, T, D) tokens, mask tokens in place -> (B, C, L) series in normalised units."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList([
            TransformerLayer(cfg.d_model, cfg.decoder_heads, cfg.ff_dim, cfg.dropout)
            for _ in range(cfg.decoder_layers)
        ])
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # [C] embedding_to_patch_spa
        self.detokenizer = build_detokenizer(cfg)

    def forward(self, h: Tensor) -> Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.detokenizer(self.proj(h))  # (B, C, L)
