"""Classifier head for linear probe and fine-tune ([C] BaseModel.logits).

[C] github.com/Einstone-rose/CBD, models/base_model_mae_full.py: flatten all tokens,
Linear(T*D -> T*D/2) -> ReLU -> Linear(-> classes). It is not part of :class:`CBDModel`: the
authors build this 14.5M-parameter head during pretraining without using it; we build it only
for the classifier stages.
"""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """(B, T, D) token features -> (B, num_classes) logits."""

    def __init__(self, num_tokens: int, d_model: int, num_classes: int):
        super().__init__()
        assert num_tokens >= 1 and d_model >= 1 and num_classes >= 1, (
            f"num_tokens={num_tokens}, d_model={d_model}, num_classes={num_classes} must be >= 1")
        self.num_tokens, self.d_model = num_tokens, d_model
        width = num_tokens * d_model
        self.fc1 = nn.Linear(width, width // 2)
        self.fc2 = nn.Linear(width // 2, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        B, T, D = features.shape
        assert (T, D) == (self.num_tokens, self.d_model), (
            f"head built for {self.num_tokens} tokens x {self.d_model}, got {T} x {D}")
        return self.fc2(self.fc1(features.reshape(B, T * D)).relu())  # (B, T*D) -> (B, K)
