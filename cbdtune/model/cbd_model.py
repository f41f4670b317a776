"""The CBD masked model: tokenizer, encoder over visible tokens, temporal and CBD decoders.

    x (B, C, L) -> normalise -> tokenizer (B, T, D) [+ position] -> mask: keep T - int(T * ratio)
      -> encoder (B, V, D) -> append mask tokens, restore order (B, T, D) [+ decoder position]
      -> temporal decoder -> de-normalise -> recon (B, C, L)
      -> CBD decoder -> de-normalise -> rfft(ortho) -> spectrum (B, C, L//2 + 1)

References:
    [P] Han et al., "Content-aware Balanced Spectrum Encoding in Masked Modeling for Time Series
        Classification", AAAI 2025, https://arxiv.org/abs/2412.13232 (Fig. 2)
    [C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py (BaseModel.pretrain/finetune)
    MAE: He et al., CVPR 2022, https://arxiv.org/abs/2111.06377 (encoder and decoder position
        embeddings, ``model.pos_encoding``; [C] has none, the default)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cbdtune.config import ConfigError, ModelConfig
from cbdtune.model.cbd import CBDDecoder
from cbdtune.model.encoder import Encoder, random_masking
from cbdtune.model.pos_encoding import build_pos_encoding
from cbdtune.model.temporal_decoder import TemporalDecoder
from cbdtune.model.tokenizer import build_tokenizer, normalize_series, num_tokens


class ModelOutput(NamedTuple):
    recon: Tensor  # (B, C, L) temporal reconstruction, in the units of x
    spectrum: Tensor | None  # (B, C, L//2 + 1) complex CBD output spectrum; None without CBD
    mask: Tensor  # (B, T) bool, True = masked token


class CBDModel(nn.Module):
    """Masked time-series model pretrained with a temporal and a content-aware balanced decoder.

    ``forward`` is the pretraining pass (always masks); ``encode`` is the classifier pass (all
    tokens, no mask). The classifier head is separate (:class:`ClassifierHead`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_tokens = num_tokens(cfg)
        self.num_masked = int(self.num_tokens * cfg.mask_ratio)
        self.tokenizer = build_tokenizer(cfg)
        self.encoder = Encoder(cfg.d_model, cfg.n_heads, cfg.encoder_layers, cfg.ff_dim,
                               cfg.dropout)
        self.mask_token = nn.Parameter(torch.randn(cfg.d_model))  # [C] randn init
        self.temporal_decoder = TemporalDecoder(cfg)
        self.cbd_decoder = CBDDecoder(cfg, self.num_tokens) if cfg.use_cbd else None
        # Built last: with pos_encoding="none" they are None and the modules above get the same
        # random initialisation as without the switch (and as learned/sinusoidal, for a seed).
        self.pos_embed = build_pos_encoding(cfg.pos_encoding, self.num_tokens, cfg.d_model)
        self.decoder_pos_embed = build_pos_encoding(cfg.pos_encoding, self.num_tokens,
                                                    cfg.d_model)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Tokenizer + encoder parameters (and the encoder's learned position embedding): what
        fine-tuning trains besides the head."""
        yield from self.tokenizer.parameters()
        if self.pos_embed is not None:
            yield from self.pos_embed.parameters()
        yield from self.encoder.parameters()

    def tokenize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, L) raw -> tokens (B, T, D) with their positional encoding (if any), plus mean
        and std (B, C, 1) to de-normalise. What the encoder reads, masked or not."""
        x, mean, std = normalize_series(x)
        tokens = self.tokenizer(x)  # (B, T, D)
        if self.pos_embed is not None:
            tokens = self.pos_embed(tokens)  # before masking: visible tokens keep their position
        return tokens, mean, std

    def encode(self, x: Tensor) -> Tensor:
        """Features for classifiers: (B, C, L) -> (B, T, D), every token, no masking.

        Differentiable; a linear probe calls it under ``torch.no_grad()``.
        """
        return self.encoder(self.tokenize(x)[0])

    def encode_layers(self, x: Tensor) -> Tensor:
        """Every depth's features, for readouts that pool them all (:class:`RidgeHead`):
        (B, C, L) -> (B, encoder_layers + 1, T, D), the tokens first, ``encode(x)`` last."""
        h = self.tokenize(x)[0]
        out = [h]
        for layer in self.encoder.layers:
            h = layer(h)
            out.append(h)
        return torch.stack(out, dim=1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> ModelOutput:
        B, C, L = x.shape
        if (C, L) != (self.cfg.in_channels, self.cfg.seq_len):
            raise ValueError(f"model built for {self.cfg.in_channels} x {self.cfg.seq_len} series, "
                             f"got {C} x {L}")
        tokens, mean, std = self.tokenize(x)  # (B, T, D)
        T, D = tokens.shape[1:]
        ids_keep, ids_restore, mask = random_masking(
            B, T, self.num_masked, per_sample=self.cfg.mask_sharing == "per_sample",
            generator=generator, device=x.device)
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, V, D)
        h = self.encoder(visible)  # (B, V, D)
        h = torch.cat([h, self.mask_token.to(h.dtype).expand(B, self.num_masked, D)], dim=1)
        h = h.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # (B, T, D) original order
        if self.decoder_pos_embed is not None:
            h = self.decoder_pos_embed(h)  # MAE: both decoders see where each mask token sits

        recon = self.temporal_decoder(h).float() * std + mean  # (B, C, L) de-normalised [C]
        spectrum = None
        if self.cbd_decoder is not None:
            # [I] de-normalised like recon: the loss compares it with F(x) in the units of x
            # ([C] compares its normalised-scale output with raw x).
            y = self.cbd_decoder(h).float() * std + mean  # (B, C, L)
            spectrum = _spectrum(y)
        return ModelOutput(recon, spectrum, mask)


@torch.compiler.disable  # complex output: keep eager under torch.compile (see SpectralUnit)
def _spectrum(y: Tensor) -> Tensor:
    with torch.autocast(y.device.type, enabled=False):
        return torch.fft.rfft(y.float(), dim=-1, norm="ortho")  # (B, C, L//2 + 1)


def build_model(cfg: ModelConfig) -> CBDModel:
    """The CBD model for ``cfg``.

    Raises:
        ConfigError: ``cfg.in_channels`` or ``cfg.seq_len`` not set (the pipeline sets them from
            the dataset).
    """
    for name in ("in_channels", "seq_len"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name}: must be set from the dataset (> 0) before building "
                              f"the model, but got {getattr(cfg, name)}")
    return CBDModel(cfg)
