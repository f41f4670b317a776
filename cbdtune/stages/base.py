"""The interface of a classifier stage (:class:`Stage`), and of the stages trained by epochs
(:class:`EpochStage`: k fold classifiers in lockstep, :func:`cbdtune.classify.fit_lockstep`).

A stage says what it reads from the frozen or trainable encoder (:meth:`Stage.inputs`), how it
fits on the folds of a pool and selects its point (:meth:`Stage.fit`), how it refits at that
point on every series (:meth:`Stage.refit`), and which head it builds (:meth:`Stage.build_head`):
the same head serving rebuilds from a saved config and loads the weights into.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from cbdtune import classify, stages
from cbdtune.config import ExperimentConfig, ModelConfig, TrainConfig
from cbdtune.model import CBDClassifier, CBDModel, ClassifierHead, RidgeHead
from cbdtune.runtime import Report, Runtime


class Stage(ABC):
    """One classifier stage; :mod:`cbdtune.stages` registers it under :attr:`name`."""

    name: ClassVar[str]
    # Seeds the stage's heads: seed * 1009 + seed_salt + 10 * fold. Fixed per stage, so that a
    # stage's numbers for a seed do not depend on which other stages exist.
    seed_salt: ClassVar[int]

    @property
    def spec(self) -> stages.StageSpec:
        """Its registration (what the search knows of it before torch is imported)."""
        return stages.spec(self.name)

    @abstractmethod
    def build_head(self, cfg: ModelConfig, num_tokens: int) -> ClassifierHead | RidgeHead:
        """A new head: what a saved classifier of this stage holds next to the encoder."""

    def encoder(self, model: CBDModel) -> CBDModel:
        """The encoder its classifier reads: the pretrained one, shared and frozen."""
        return model

    def classifier(self, model: CBDModel, cfg: ExperimentConfig, rt: Runtime,
                   salt: int = 0) -> CBDClassifier:
        """Its encoder and a new head seeded by ``train.seed`` and fold ``salt``."""
        gen = torch.Generator().manual_seed(cfg.train.seed * 1009 + self.seed_salt + 10 * salt)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            head = self.build_head(cfg.model, model.num_tokens).to(rt.device)
        return CBDClassifier(self.encoder(model), head)

    @abstractmethod
    def inputs(self, model: CBDModel, x: np.ndarray, cfg: ExperimentConfig,
               rt: Runtime) -> tuple[Any, ...]:
        """What it reads of raw series ``x`` (N, C, L), computed once per pool and indexed like
        it: raw series, cached frozen features, or pooled depth features."""

    @abstractmethod
    def fit(self, model: CBDModel, pool: classify.Pool, cfg: ExperimentConfig, rt: Runtime,
            n_classes: int, report: Report | None = None) -> classify.StageResult:
        """Fit on every fold of ``pool``, select its point on the folds' mean, calibrate.

        ``report(metrics, None)`` receives its evaluation points (:mod:`cbdtune.reports`).
        """

    @abstractmethod
    def refit(self, model: CBDModel, x: np.ndarray, y: np.ndarray, cfg: ExperimentConfig,
              rt: Runtime, epochs: int) -> CBDClassifier:
        """One classifier on every series given, at the selected point ``epochs`` (from 1)."""


class EpochStage(Stage):
    """A stage trained by gradient epochs, k fold classifiers in lockstep."""

    def trainable(self, clf: CBDClassifier) -> nn.Module:
        """The part that learns and reads :meth:`inputs`: the head (frozen encoder)."""
        return clf.head

    def head_inputs(self, inputs: tuple[Tensor, ...], head: nn.Module) -> tuple[Tensor, ...]:
        """The inputs the trainable part reads."""
        return inputs

    @abstractmethod
    def train_stats(self, inputs: tuple[Tensor, ...], idx: np.ndarray) -> Tensor:
        """Level statistics (n, 2C) of the series ``idx``, for a head that reads them."""

    def augment(self, tc: TrainConfig) -> Callable[[Tensor], Tensor] | None:
        """Input augmentation of a training batch, or None."""
        return None

    def fit(self, model: CBDModel, pool: classify.Pool, cfg: ExperimentConfig, rt: Runtime,
            n_classes: int, report: Report | None = None) -> classify.StageResult:
        return classify.fit_lockstep(self, model, pool, cfg, rt, n_classes, report)

    def refit(self, model: CBDModel, x: np.ndarray, y: np.ndarray, cfg: ExperimentConfig,
              rt: Runtime, epochs: int) -> CBDClassifier:
        return classify.train_for(self, model, x, y, cfg, rt, epochs)
