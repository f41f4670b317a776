"""The classifier a trial trains and a user takes away: encoder + head, raw series -> logits.

Linear probe and fine-tune train the same module (the probe keeps the encoder frozen), so a saved
classifier is one ``state_dict`` whatever the stage, and :mod:`cbdtune.serving` rebuilds it from
its config alone. The state_dict carries the ``temperature`` its logits are divided by (fitted on
the out-of-fold predictions by :mod:`cbdtune.classify`), so probabilities are calibrated
wherever the module's softmax is taken.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cbdtune.model.cbd_model import CBDModel
from cbdtune.model.heads import ClassifierHead, RidgeHead, series_stats


class CBDClassifier(nn.Module):
    """Encoder + head. Decoders are part of ``model`` but unused here (and frozen).

    ``forward`` returns the head's logits (the ridge readout's scores) divided by the
    ``temperature`` buffer (float32 scalar, 1.0 until :func:`cbdtune.classify.fit_temperature`
    sets it): temperature scaling (Guo et al., ICML 2017, https://arxiv.org/abs/1706.04599),
    which leaves every argmax unchanged.
    """

    temperature: Tensor

    def __init__(self, model: CBDModel, head: ClassifierHead | RidgeHead) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.register_buffer("temperature", torch.ones((), dtype=torch.float32))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # A state_dict saved before the buffer existed holds no temperature: it means 1.0.
        state_dict.setdefault(prefix + "temperature", torch.ones((), dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the head reads: tokens (B, T, D), or every depth's (B, layers + 1, T, D) for the
        ridge readout, and, when the head wants them, the per-channel level statistics of the raw
        series (B, 2C)."""
        stats = series_stats(x) if self.head.n_stats else None
        if isinstance(self.head, RidgeHead):
            return self.model.encode_layers(x), stats
        return self.model.encode(x), stats

    def forward(self, x: Tensor) -> Tensor:
        return self.head(*self.features(x)) / self.temperature
