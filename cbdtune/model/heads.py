"""Classifier head for linear probe and fine-tune ([C] BaseModel.logits).

[C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py: flatten all tokens,
Linear(T*D -> T*D/2) -> ReLU -> Linear(-> classes). It is not part of :class:`CBDModel`: the
authors build this 14.5M-parameter head during pretraining without using it; we build it only
for the classifier stages.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cbdtune.config import ModelConfig


def series_stats(x: Tensor) -> Tensor:
    """Per-channel level of raw series: mean and log-std, (B, C, L) -> (B, 2C).

    The instance normalisation before the tokenizer removes exactly these (RevIN-style); a head
    that reads them gets the level back.
    """
    x = x.float()
    mean = x.mean(dim=-1)
    log_std = torch.log(x.std(dim=-1, correction=0) + 1e-5)
    return torch.cat([mean, log_std], dim=-1)


class ClassifierHead(nn.Module):
    """(B, T, D) token features [+ (B, n_stats) series statistics] -> (B, num_classes) logits."""

    def __init__(self, num_tokens: int, d_model: int, num_classes: int, *, n_stats: int = 0):
        super().__init__()
        assert num_tokens >= 1 and d_model >= 1 and num_classes >= 1, (
            f"num_tokens={num_tokens}, d_model={d_model}, num_classes={num_classes} must be >= 1")
        self.num_tokens, self.d_model, self.n_stats = num_tokens, d_model, n_stats
        width = num_tokens * d_model
        self.fc1 = nn.Linear(width, width // 2)
        self.fc2 = nn.Linear(width // 2, num_classes)

    def forward(self, features: Tensor, stats: Tensor | None = None) -> Tensor:
        B, T, D = features.shape
        assert (T, D) == (self.num_tokens, self.d_model), (
            f"head built for {self.num_tokens} tokens x {self.d_model}, got {T} x {D}")
        return self.fc2(self.fc1(features.reshape(B, T * D)).relu())  # (B, T*D) -> (B, K)


def build_head(cfg: ModelConfig, num_tokens: int) -> ClassifierHead:
    """The head ``cfg`` asks for (``cfg.num_classes`` and ``cfg.in_channels`` must be set)."""
    return ClassifierHead(num_tokens, cfg.d_model, cfg.num_classes)
