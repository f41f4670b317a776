"""The linear probe: a head trained on the frozen encoder's tokens, cached once per pool."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from cbdtune import stages
from cbdtune.config import ExperimentConfig, ModelConfig
from cbdtune.model import CBDModel, ClassifierHead, build_head, series_stats
from cbdtune.runtime import Runtime, as_tensor, encode_split
from cbdtune.stages.base import EpochStage


class LinearProbe(EpochStage):
    """``model.head`` on frozen features; every fold shares one pass of the encoder."""

    name = stages.LINEAR_PROBE
    seed_salt = 1

    def build_head(self, cfg: ModelConfig, num_tokens: int) -> ClassifierHead:
        return build_head(cfg, num_tokens)

    def inputs(self, model: CBDModel, x: np.ndarray, cfg: ExperimentConfig,
               rt: Runtime) -> tuple[Any, ...]:
        """Frozen tokens (N, T, D) (eval mode) and the series' level statistics (N, 2C)."""
        raw = as_tensor(x)
        return encode_split(model, raw, rt, cfg.train), series_stats(raw).to(rt.device)

    def head_inputs(self, inputs: tuple[Tensor, ...], head: nn.Module) -> tuple[Tensor, ...]:
        return inputs if head.n_stats else inputs[:1]  # a head without levels reads tokens

    def train_stats(self, inputs: tuple[Tensor, ...], idx: np.ndarray) -> Tensor:
        return inputs[1][idx]
