"""Classifier heads for linear probe and fine-tune (``model.head``), and the ridge readout's
(:class:`RidgeHead`, ``train.classifier = "ridge"``: applied here, fit by :mod:`cbdtune.ridge`).

* ``flatten`` [C] (BaseModel.logits in github.com/Einstone-rose/CBD,
  models/base_model_mae_full.py): flatten all tokens, Linear(T*D -> T*D/2) -> ReLU ->
  Linear(-> classes). The authors build this 14.5M-parameter head (HAR, D = 128) during
  pretraining without using it; we build it only for the classifier stages.
* ``mean``: mean over tokens -> LayerNorm -> Linear(D -> D) -> GELU -> Linear(-> classes).
* ``attention``: as ``mean``, but the pooling weights are softmax_t(q . h_t / sqrt(D)) with one
  learned query q, the one-query, one-head case of PMA (Lee et al., "Set Transformer", ICML
  2019, https://arxiv.org/abs/1810.00825). q starts at 0, i.e. at mean pooling.

``model.head_dropout`` drops the head's token features (after pooling and LayerNorm) before its
first Linear. With ``model.level_features`` the head also reads the per-channel mean and log-std
of the raw series relative to its own scale (:func:`series_stats`), standardised with the training
split's statistics (:meth:`ClassifierHead.fit_stats`) and concatenated after the dropout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbdtune.config import ConfigError, ModelConfig
from cbdtune.model.tokenizer import series_moments

# A column whose spread over the training split is at most COLUMN_REL_FLOOR of its own rms plus
# COLUMN_ABS_FLOOR counts as constant and gets weight 0 (here and in cbdtune.ridge). Absolute is
# relative: every column a head reads is in units of the series' own scale (the tokens come from
# the normalised series, the levels are divided by the scale), so COLUMN_ABS_FLOOR is 1e-4 of
# the scale. On z-normalised archives the levels spread by ~3e-6 from the archive's rounding;
# weighed 1/std they turned a 1e-3 shift of the input into hundreds of standard deviations.
COLUMN_REL_FLOOR = 1e-5  # float32 keeps ~7 digits; a sum over L steps loses a few more
COLUMN_ABS_FLOOR = 1e-4


def constant_columns(std: Tensor, rms: Tensor) -> Tensor:
    """Which columns count as constant from their spread ``std`` and ``rms`` over the training
    split (bool, same shape); works on numpy arrays too."""
    return std <= COLUMN_REL_FLOOR * rms + COLUMN_ABS_FLOOR


def series_stats(x: Tensor) -> Tensor:
    """Per-channel level of raw series, in units of the series' own scale: (B, C, L) -> (B, 2C).

    The instance normalisation before the tokenizer removes the level (RevIN-style); a head that
    reads these gets it back. With ``mean_c`` and ``std_c`` the normaliser's
    (:func:`cbdtune.model.tokenizer.series_moments`) and ``S = sqrt(mean_c(std_c^2))`` the
    series' scale, the columns are ``mean_c / S`` then ``log(std_c / S)``.

    Why relative to S: a user's units must not decide the label. Under ``x * k`` (k > 0) both
    are unchanged; under ``x + b`` the log-stds are unchanged and the means move by ``b / S``,
    which a model weighs only where the training means spread by more than
    ``COLUMN_ABS_FLOOR`` (1e-4 of the scale; :func:`constant_columns`). The raw mean and
    log-std read before did neither: x 1e-3 moved every log-std by -6.9. What is lost is the
    series' overall scale ``log S``, by design.
    """
    mean, std = series_moments(x.float())
    scale = std.square().mean(dim=1, keepdim=True).sqrt()  # (B, 1, 1), > 0: std > 0
    return torch.cat([mean / scale, torch.log(std / scale)], dim=1).squeeze(-1)  # (B, 2C)


class ClassifierHead(nn.Module):
    """(B, T, D) token features [+ (B, n_stats) series statistics] -> (B, num_classes) logits.

    Args:
        num_tokens: T.
        d_model: D.
        num_classes: >= 1.
        n_stats: width of the statistics it reads, 0 (none) or 2C (:func:`series_stats`).
        kind: ``"flatten"`` [C], ``"mean"`` or ``"attention"`` (see the module docstring).
        dropout: on the token features, in [0, 1).
    """

    stats_mean: Tensor  # buffers, when n_stats > 0
    stats_std: Tensor

    def __init__(self, num_tokens: int, d_model: int, num_classes: int, *, n_stats: int = 0,
                 kind: Literal["flatten", "mean", "attention"] = "flatten",
                 dropout: float = 0.0):
        super().__init__()
        assert num_tokens >= 1 and d_model >= 1 and num_classes >= 1 and n_stats >= 0, (
            f"num_tokens={num_tokens}, d_model={d_model}, num_classes={num_classes} must be >= 1"
            f" and n_stats={n_stats} >= 0")
        assert kind in ("flatten", "mean", "attention"), f"unknown head kind {kind!r}"
        self.num_tokens, self.d_model, self.n_stats = num_tokens, d_model, n_stats
        self.kind, self.dropout = kind, dropout
        if kind == "flatten":  # [C]; no other module, so the paper head's init is unchanged
            width = num_tokens * d_model
            self.fc1 = nn.Linear(width + n_stats, width // 2)
        else:
            if kind == "attention":
                self.query = nn.Parameter(torch.zeros(d_model))  # 0: starts as mean pooling
            self.norm = nn.LayerNorm(d_model)
            self.fc1 = nn.Linear(d_model + n_stats, d_model)
        self.fc2 = nn.Linear(self.fc1.out_features, num_classes)
        if n_stats:  # buffers: saved with the head, so serving standardises as training did
            self.register_buffer("stats_mean", torch.zeros(n_stats))
            self.register_buffer("stats_std", torch.ones(n_stats))

    @torch.no_grad()
    def fit_stats(self, stats: Tensor) -> None:
        """Set the standardisation of the statistics from the training split's (N, n_stats).

        A column constant over the split (:func:`constant_columns`) gets ``stats_std`` 0 and
        the head reads 0 there: it carries no level, and 1/std would blow its rounding up.
        """
        if self.n_stats == 0:
            raise ValueError("this head reads no series statistics (n_stats = 0)")
        if stats.ndim != 2 or stats.shape[1] != self.n_stats or stats.shape[0] < 1:
            raise ValueError(f"expected (N >= 1, {self.n_stats}) statistics, "
                             f"got {tuple(stats.shape)}")
        stats = stats.float()
        if not torch.isfinite(stats).all():
            raise ValueError("series statistics contain NaN or inf; clean the training series")
        std = stats.std(dim=0, correction=0)
        constant = constant_columns(std, stats.square().mean(dim=0).sqrt())
        self.stats_mean.copy_(stats.mean(dim=0))
        self.stats_std.copy_(torch.where(constant, 0.0, std))  # 0: the column is dropped

    def pool(self, features: Tensor) -> Tensor:
        """(B, T, D) -> (B, T*D) for ``flatten``, else the LayerNormed pooled (B, D)."""
        B, T, D = features.shape
        if self.kind == "flatten":
            return features.reshape(B, T * D)
        if self.kind == "mean":
            return self.norm(features.mean(dim=1))
        scores = features @ self.query.to(features.dtype) / math.sqrt(D)  # (B, T)
        return self.norm(torch.einsum("bt,btd->bd", scores.softmax(dim=1), features))  # (B, D)

    def forward(self, features: Tensor, stats: Tensor | None = None) -> Tensor:
        B, T, D = features.shape
        assert (T, D) == (self.num_tokens, self.d_model), (
            f"head built for {self.num_tokens} tokens x {self.d_model}, got {T} x {D}")
        assert (stats is not None) == bool(self.n_stats), (
            f"head reads {self.n_stats} series statistics, got "
            f"{None if stats is None else tuple(stats.shape)}")
        z = self.pool(features)
        if self.dropout > 0:  # skipped at 0, so the paper head's forward is unchanged
            z = F.dropout(z, self.dropout, self.training)
        if stats is not None:
            kept = self.stats_std > 0  # fit_stats sets 0 for a column constant over training
            inv_std = torch.where(kept, 1.0 / self.stats_std.clamp_min(1e-30), 0.0)
            stats = (stats.float() - self.stats_mean) * inv_std  # (B, n_stats)
            z = torch.cat([z, stats.to(z.dtype)], dim=-1)
        h = self.fc1(z)
        h = h.relu() if self.kind == "flatten" else F.gelu(h)
        return self.fc2(h)  # (B, num_classes)


class RidgeHead(nn.Module):
    """A linear readout over every depth of the frozen encoder, fit in closed form
    (``train.classifier = "ridge"``; :mod:`cbdtune.ridge` fits it, this module only applies it).

    Features: for each of the ``depths`` = encoder_layers + 1 feature maps (the tokens, then every
    layer's output), the mean, max and standard deviation of each channel over all tokens, the
    pooling ROCKET's ridge readout uses on convolution maps (max; Dempster et al., "ROCKET",
    DMKD 2020, https://arxiv.org/abs/1910.13051) with the mean and spread; then the mean and max
    over each of ``segments`` equal runs of tokens (``model.readout_segments``), which keep
    *when* a pattern occurs (a one-level temporal pyramid, as spatial pyramid pooling: He et
    al., ECCV 2014, https://arxiv.org/abs/1406.4729); then the series statistics when
    ``n_stats`` > 0. Logits = ((features - center) * column_weight) @ weight.T + bias:
    ``column_weight`` is 1/std of the training features times its block's weight.
    """

    center: Tensor  # buffers
    column_weight: Tensor
    weight: Tensor
    bias: Tensor

    def __init__(self, depths: int, d_model: int, num_classes: int, *, num_tokens: int,
                 segments: int = 0, n_stats: int = 0):
        super().__init__()
        assert min(depths, d_model, num_classes, num_tokens) >= 1 and min(segments, n_stats) >= 0, (
            f"depths={depths}, d_model={d_model}, num_classes={num_classes}, "
            f"num_tokens={num_tokens}, segments={segments}, n_stats={n_stats}")
        self.n_stats = n_stats
        self.segments = min(segments, num_tokens)  # a segment holds at least one token
        self.n_pooled = depths * d_model * (3 + 2 * self.segments)
        n = self.n_pooled + n_stats
        for name, shape in (("center", (n,)), ("column_weight", (n,)),
                            ("weight", (num_classes, n)), ("bias", (num_classes,))):
            self.register_buffer(name, torch.zeros(shape))  # set by cbdtune.ridge, then saved

    def pool(self, layers: Tensor) -> Tensor:
        """(B, depths, T, D) -> (B, n_pooled): mean, max and std over all tokens, then mean and
        max over each segment."""
        layers = layers.float()
        parts = [layers.mean(dim=2), layers.amax(dim=2), layers.std(dim=2, correction=0)]
        for seg in torch.tensor_split(layers, self.segments, dim=2) if self.segments else ():
            parts += [seg.mean(dim=2), seg.amax(dim=2)]
        return torch.cat(parts, dim=-1).flatten(1)  # (B, depths * (3 + 2 * segments) * D)

    def features(self, layers: Tensor, stats: Tensor | None = None) -> Tensor:
        """What the readout's columns are, before standardisation: (B, n_pooled [+ n_stats])."""
        assert (stats is not None) == bool(self.n_stats), (
            f"head reads {self.n_stats} series statistics, got "
            f"{None if stats is None else tuple(stats.shape)}")
        z = self.pool(layers)
        return z if stats is None else torch.cat([z, stats.float()], dim=-1)

    def forward(self, layers: Tensor, stats: Tensor | None = None) -> Tensor:
        z = (self.features(layers, stats) - self.center) * self.column_weight
        return z @ self.weight.T + self.bias  # (B, num_classes)


def build_head(cfg: ModelConfig, num_tokens: int) -> ClassifierHead:
    """The head of the trained stages ``cfg`` asks for (``model.head``, ``head_dropout``,
    ``level_features``).

    Raises:
        ConfigError: ``cfg.num_classes`` not set, or ``cfg.in_channels`` not set while
            ``cfg.level_features`` is on (the pipeline sets both from the dataset).
    """
    return ClassifierHead(num_tokens, cfg.d_model, cfg.num_classes, n_stats=_n_stats(cfg),
                          kind=cfg.head, dropout=cfg.head_dropout)


def build_ridge_head(cfg: ModelConfig, num_tokens: int) -> RidgeHead:
    """The ridge readout's head (cbdtune.stages.ridge), which reads ``level_features`` and
    ``readout_segments`` alone of the head options.

    Raises:
        ConfigError: as :func:`build_head`.
    """
    return RidgeHead(cfg.encoder_layers + 1, cfg.d_model, cfg.num_classes,
                     num_tokens=num_tokens, segments=cfg.readout_segments, n_stats=_n_stats(cfg))


def _n_stats(cfg: ModelConfig) -> int:
    """The level statistics a head reads (2 per channel, or none); checks the dataset's shape."""
    if cfg.num_classes <= 0 or (cfg.level_features and cfg.in_channels <= 0):
        name = "num_classes" if cfg.num_classes <= 0 else "in_channels"
        raise ConfigError(f"model.{name}: must be set from the dataset (> 0) before building "
                          f"the head, but got {getattr(cfg, name)}")
    return 2 * cfg.in_channels if cfg.level_features else 0
