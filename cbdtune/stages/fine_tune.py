"""Fine-tuning: each fold trains its own copy of the encoder with the head, on raw series."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor, nn

from cbdtune import classify, stages
from cbdtune.config import ExperimentConfig, ModelConfig, TrainConfig
from cbdtune.model import CBDClassifier, CBDModel, ClassifierHead, build_head, series_stats
from cbdtune.runtime import Runtime, as_tensor
from cbdtune.stages.base import EpochStage


class FineTune(EpochStage):
    """Encoder + ``model.head`` trained together; input augmentation (``train.augment_*``)."""

    name = stages.FINE_TUNE
    seed_salt = 2

    def build_head(self, cfg: ModelConfig, num_tokens: int) -> ClassifierHead:
        return build_head(cfg, num_tokens)

    def encoder(self, model: CBDModel) -> CBDModel:
        """A copy (the pretrained model stays intact for later stages), its encoder trainable
        and its decoders frozen (they are not in the classifier)."""
        encoder = copy.deepcopy(model)
        for p in encoder.parameters():
            p.requires_grad_(False)
        for p in encoder.encoder_parameters():
            p.requires_grad_(True)
        return encoder

    def inputs(self, model: CBDModel, x: np.ndarray, cfg: ExperimentConfig,
               rt: Runtime) -> tuple[Any, ...]:
        return (as_tensor(x),)  # raw series (N, C, L)

    def trainable(self, clf: CBDClassifier) -> nn.Module:
        return clf

    def train_stats(self, inputs: tuple[Tensor, ...], idx: np.ndarray) -> Tensor:
        return series_stats(inputs[0][idx])

    def augment(self, tc: TrainConfig) -> Callable[[Tensor], Tensor] | None:
        return classify.augmenter(tc.augment_jitter, tc.augment_scale, tc.augment_crop)
