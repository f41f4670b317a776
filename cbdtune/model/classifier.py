"""The classifier a trial trains and a user takes away: encoder + head, raw series -> logits.

Linear probe and fine-tune train the same module (the probe keeps the encoder frozen), so a saved
classifier is one ``state_dict`` whatever the stage, and :mod:`cbdtune.serving` rebuilds it from
its config alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from cbdtune.model.cbd_model import CBDModel
from cbdtune.model.heads import ClassifierHead, RidgeHead, series_stats


class CBDClassifier(nn.Module):
    """Encoder + head. Decoders are part of ``model`` but unused here (and frozen)."""

    def __init__(self, model: CBDModel, head: ClassifierHead | RidgeHead) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def features(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the head reads: tokens (B, T, D), or every depth's (B, layers + 1, T, D) for the
        ridge readout, and, when the head wants them, the per-channel level statistics of the raw
        series (B, 2C)."""
        stats = series_stats(x) if self.head.n_stats else None
        if isinstance(self.head, RidgeHead):
            return self.model.encode_layers(x), stats
        return self.model.encode(x), stats

    def forward(self, x: Tensor) -> Tensor:
        return self.head(*self.features(x))
