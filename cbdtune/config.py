"""One typed configuration for a cbdtune trial, validated at the boundary.

Every default is the paper's choice unless a comment says otherwise. References:
    [P] Y. Han et al., "Content-aware Balanced Spectrum Encoding in Masked Modeling for Time
        Series Classification", AAAI 2025 (arXiv 2412.13232).
    [C] the authors' code, github.com/Einstone-rose/CBD ("SPANet").

Where [P] and [C] differ the switch defaults to [P] so that the search can decide (spec section 8).

YAML, CLI ``--set key=value`` and Ray Tune dicts all enter through :meth:`ExperimentConfig.from_dict`;
below that line nothing takes a raw dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

# How series of other lengths are fitted to the model's (cbdtune.data._lengths); a model's
# contract.json names it too (cbdtune.serving).
LengthPolicy = Literal["pad", "resample"]
# The metric the search optimises and its direction: defined once, imported by search and tests.
METRIC = "val_accuracy"
MODE = "max"


class CbdtuneError(Exception):
    """Root of every error cbdtune reports to a user as one line (never a bare traceback)."""


class ConfigError(CbdtuneError, ValueError):
    """A configuration value, file or override is invalid."""


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "gesture"  # registry name, UEA/UCR archive name, or a TF-C style folder
    data_dir: str | None = None  # local folder; None -> $CBDTUNE_DATA_DIR, then the cache
    # Model selection. cv_folds > 0: stratified k-fold cross-validation on the whole training
    # split (an archive's own val split joins it), repeated cv_repeats times with fresh shuffles;
    # the classifier is then refit on every training series. cv_folds = 0: one validation split,
    # val_fraction of train (stratified, by seed) or the archive's own; the paper's protocol.
    cv_folds: int = 5
    cv_repeats: int = 1
    val_fraction: float = 0.2  # only with cv_folds = 0
    length_policy: LengthPolicy = "pad"  # variable-length series, see cbdtune.data

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "data.dataset", "must not be empty")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction",
               f"expected a float in (0, 1), but got {self.val_fraction}")
        _check(self.cv_folds == 0 or self.cv_folds >= 2, "data.cv_folds",
               f"must be 0 (one validation split) or >= 2, but got {self.cv_folds}")
        _check(self.cv_repeats >= 1, "data.cv_repeats", f"must be >= 1, but got {self.cv_repeats}")


@dataclass(frozen=True)
class ModelConfig:
    # Set from the dataset by the pipeline (0 = not yet known).
    in_channels: int = 0
    seq_len: int = 0
    num_classes: int = 0

    d_model: int = 128  # [P] hidden size 128 for every dataset
    n_heads: int = 4  # [C] encoder heads
    encoder_layers: int = 8  # [P]
    ff_dim: int = 2048  # [C] nn.TransformerEncoderLayer default
    decoder_layers: int = 2  # [P] temporal decoder depth
    decoder_heads: int = 2  # [C]
    cbd_blocks: int = 2  # [P]
    cbd_ff_dim: int = 64  # [C] CBD block FFN 128 -> 64 -> 128
    dropout: float = 0.1  # [C] PyTorch default
    tokenizer: Literal["conv", "patch"] = "conv"  # [C] conv stack (~L/8 tokens); patch = TimeMAE
    patch_size: int = 8  # patch tokenizer window; 8 matches the conv stack's token rate
    # [I] Token rate by rule: a series of L steps gets at least this many tokens when L allows
    # (the conv stack pools in fewer blocks, the patch window shrinks; tokenizer.py). 1 = [C]'s
    # fixed ~L/8 for every length; values up to 20 leave 144-step and longer series as [C].
    min_tokens: int = 1

    mask_ratio: float = 0.75  # [P]
    mask_sharing: Literal["per_sample", "per_batch"] = "per_sample"  # [P]; [C] per_batch
    bernstein_order: int = 12  # [P] K = 12 (Table 5)
    bernstein_terms: Literal["0..K", "0..K-1"] = "0..K"  # [P] Eq. 10; [C] drops k = K
    cim_activation: Literal["sigmoid", "relu_softshrink"] = "sigmoid"  # [P] Eq. 5; [C] relu+shrink
    ser_energy: Literal["after_cim", "before_cim"] = "after_cim"  # [P]; [C] before
    ser_coefficients: Literal["linear", "sigmoid"] = "linear"  # [P] Eq. 11; [C] sigmoid(linear)
    # SER's normalised energy A~: [P] softmax of the raw energies; on trained features the DC bin
    # takes all of it (A~ = 1 there, < 1e-3 elsewhere) and K stops mattering. fraction = [C]
    # A / sum A; tempered = A^(1/2) / sum A^(1/2), scale-free and flatter (cbd.ser_normalise).
    ser_norm: Literal["softmax", "fraction", "tempered"] = "softmax"  # [P]; [C] fraction
    # Positional encoding on the tokens before masking and on the restored sequence before the
    # decoders (MAE). [C] has none; without it the encoder is permutation-equivariant.
    pos_encoding: Literal["none", "learned", "sinusoidal"] = "none"  # [C]

    # Classifier head (heads.py). [C] flattens all tokens into an MLP (14.5M parameters at HAR).
    head: Literal["flatten", "mean", "attention"] = "flatten"  # [C]; mean/attention pool tokens
    head_dropout: float = 0.0  # [C] none; dropout on the head's token features
    level_features: bool = False  # [C] none; True: the head also reads per-channel mean and
    #                               log-std of the raw series, which the instance norm removes

    # The ridge readout (train.classifier = ridge, heads.RidgeHead) pools every depth over all
    # tokens and, besides, over this many equal runs of tokens (mean, max); 0 = globally only.
    readout_segments: int = 3

    use_cbd: bool = True  # False: the plain masked model (TimeMAE-like), temporal decoder only
    use_cim: bool = True
    use_ser: bool = True

    def __post_init__(self) -> None:
        _check(0.0 < self.mask_ratio < 1.0, "model.mask_ratio",
               f"expected a float in (0, 1), but got {self.mask_ratio}")
        _check(self.bernstein_order >= 1, "model.bernstein_order",
               f"must be >= 1, but got {self.bernstein_order}")
        for name in ("d_model", "n_heads", "encoder_layers", "ff_dim", "decoder_heads",
                     "cbd_ff_dim", "patch_size", "min_tokens"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}", f"must be >= 1, but got {value}")
        for name in ("decoder_layers", "cbd_blocks", "in_channels", "seq_len", "num_classes",
                     "readout_segments"):
            value = getattr(self, name)
            _check(value >= 0, f"model.{name}", f"must be >= 0, but got {value}")
        _check(self.d_model % self.n_heads == 0, "model.d_model",
               f"{self.d_model} is not divisible by model.n_heads={self.n_heads}")
        _check(self.d_model % self.decoder_heads == 0, "model.d_model",
               f"{self.d_model} is not divisible by model.decoder_heads={self.decoder_heads}")
        for name in ("dropout", "head_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"model.{name}",
                   f"expected a float in [0, 1), but got {value}")
        # from_dict checks these too; this catches a ModelConfig built directly in code
        for name, tp in get_type_hints(ModelConfig).items():
            if get_origin(tp) is Literal:
                value = getattr(self, name)
                _check(value in get_args(tp), f"model.{name}",
                       f"expected one of {list(get_args(tp))}, but got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of Eq. 14: L = w_tr*L_T^re + w_fd*L_F^dual + gamma*(w_fr*L_F^re + w_td*L_T^dual)."""

    gamma: float = 0.5  # [P] 0.5 when CBD is added to other models; [C] 0.1 HAR, 0.3 Phoneme
    w_time_rec: float = 1.0
    w_freq_dual: float = 1.0
    w_freq_rec: float = 1.0
    w_time_dual: float = 1.0
    freq_loss: Literal["squared", "focal"] = "squared"  # [P] squared distance; [C] focal (alpha=1)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                _check(math.isfinite(value) and value >= 0.0, f"loss.{f.name}",
                       f"must be a finite number >= 0, but got {value}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 128  # [P]
    pretrain_epochs: int = 100  # [C]
    # A budget in optimizer steps instead: 0 = pretrain_epochs epochs [C]; N > 0 = N steps on any
    # dataset (100 epochs are 100 steps on 120 series but 200 on 316 at batch 128). The pipeline
    # turns it into epochs for the training set it gets (pipeline.steps_to_epochs); the number of
    # probes stays ceil(pretrain_epochs / probe_every), the count ASHA's rungs are set from.
    pretrain_steps: int = 0
    # A ceiling on the pretraining steps either budget gives (0 = none): the epochs are cut to
    # the most whose steps fit (at least 1). The default preset's 1,000 at batch 128 leave 100
    # epochs to any dataset of up to 1,407 series; PenDigits' 7,494 (58 steps an epoch) get 17
    # (results/pendigits.md: a trial in 6 min instead of 17, the same test accuracy at seed 0).
    pretrain_max_steps: int = 0
    # Augmentation of the pretraining batches (0 = none, [P] and [C]): each batch is jittered,
    # scaled per channel and window-cropped at this strength (classify.augmenter), and the masked
    # model reconstructs the augmented series. Issue 23's ablation: results/pretrain_ablation.md.
    pretrain_augment: float = 0.0
    drop_last: bool = True  # [C] pretraining drops the last partial batch (one is always kept);
    #                         False keeps it: 253 series at batch 128 give 2 steps, not 1
    pretrain_lr: float = 1e-4  # [P] AdamW
    weight_decay: float = 3e-4  # [P]
    beta1: float = 0.9  # [P]
    beta2: float = 0.99  # [P]
    # ridge: a closed-form linear readout on every encoder depth's pooled tokens (cbdtune.ridge),
    # selected on its regularisation path; no classifier epochs, lr or head options apply.
    classifier: Literal["linear_probe", "fine_tune", "both", "ridge"] = "fine_tune"
    classifier_epochs: int = 200  # [C]
    classifier_lr: float = 1e-4  # [C] Adam
    plateau_patience: int = 10  # ReduceLROnPlateau on validation loss ([C] uses the default 10)
    plateau_factor: float = 0.1  # PyTorch default, as in [C]
    early_stop_patience: int = 0  # stop a classifier stage after this many epochs without a
    #                               better validation accuracy; 0 = never (the paper's protocol)
    label_smoothing: float = 0.0  # cross-entropy of the classifier stages
    # Fine-tuning input augmentation (0 = off): Gaussian jitter (x its series' std), per-channel
    # scaling (std of the factor around 1), window crop (share of the length cut, then stretched).
    augment_jitter: float = 0.0
    augment_scale: float = 0.0
    augment_crop: float = 0.0
    probe_every: int = 10  # pretraining epochs between fidelity probes (the ASHA signal)
    # What a fidelity probe fits on the frozen encoder: a short linear probe of probe_epochs
    # epochs, or the ridge readout (closed form, no epochs or lr). A search compares the probes
    # of all its trials, so it is one choice per search, whatever each trial's classifier.
    probe: Literal["linear", "ridge"] = "linear"
    probe_epochs: int = 10  # epochs of each short linear fidelity probe
    # The probes rank encoders for ASHA; on a pool of more series than this they fit on a
    # stratified subsample of about this many (drawn with seed; 0 = every series). A ridge probe
    # costs O(n^3) in n: on this project's 2-core CPU its path took 2.7 s at 500 series, 64 s at
    # 2000 and ~4.6 min (idle) at PenDigits' 7,494 (results/readout_scale.md). The classifier
    # stages and the refits use every series.
    probe_max_series: int = 1000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast where bf16 is native (Ampere+ GPUs, CPUs with AVX512-BF16
    #                   or AMX), fp32 elsewhere; False = fp32 everywhere (pipeline.native_bf16)
    compile: bool = False  # torch.compile the model (CUDA; compile time dominates short runs)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default

    def __post_init__(self) -> None:
        for name in ("batch_size", "probe_every"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", f"must be >= 1, but got {value}")
        for name in ("pretrain_epochs", "pretrain_steps", "pretrain_max_steps",
                     "classifier_epochs", "probe_epochs",
                     "plateau_patience", "early_stop_patience", "num_threads",
                     "probe_max_series"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", f"must be >= 0, but got {value}")
        for name in ("pretrain_lr", "classifier_lr"):
            value = getattr(self, name)
            _check(value > 0, f"train.{name}", f"must be > 0, but got {value}")
        _check(self.weight_decay >= 0, "train.weight_decay",
               f"must be >= 0, but got {self.weight_decay}")
        for name in ("label_smoothing", "augment_jitter", "augment_scale", "augment_crop",
                     "pretrain_augment"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"train.{name}", f"expected a float in [0, 1), but got {value}")
        for name in ("beta1", "beta2", "plateau_factor"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"train.{name}", f"expected a float in (0, 1), but got {value}")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "config") -> ExperimentConfig:
        """Build a config from a nested or dotted dict, rejecting unknown keys and bad types.

        Args:
            raw: ``{"model": {"mask_ratio": 0.5}}`` or ``{"model.mask_ratio": 0.5}`` (mixed is fine).
            where: names the source (a file path) in error messages.

        Raises:
            ConfigError: an unknown key (with the closest valid ones), a value of the wrong type,
                or a value out of range.
        """
        nested = _nest(raw, where)
        sections: dict[str, Any] = {}
        for f in fields(cls):
            sub = nested.pop(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}: {f.name}: expected a mapping, but got {sub!r}")
            sections[f.name] = _build(_SECTIONS[f.name], sub, f"{where}: {f.name}")
        if nested:
            key = next(iter(nested))
            raise ConfigError(f"{where}: unknown section {key!r}; valid sections: "
                              f"{', '.join(_SECTIONS)}")
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        return cls.from_dict(load_yaml(path), where=str(path))

    def replace(self, overrides: dict[str, Any], *, where: str = "override") -> ExperimentConfig:
        """A copy with dotted overrides applied (``{"model.mask_ratio": 0.5}``), validated."""
        merged = self.to_dict()
        for key, value in _flatten(_nest(overrides, where)).items():
            merged[key] = value
        return ExperimentConfig.from_dict(merged, where=where)

    # ---- views --------------------------------------------------------------------------------

    def to_nested(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """Flat dotted view, e.g. ``{"model.mask_ratio": 0.75, ...}``: MLflow params, Tune dicts."""
        return _flatten(self.to_nested())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_nested(), sort_keys=False)


_SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig,
}

# Named starting points for ``--preset``. ``paper`` is the defaults; ``smoke`` is a tiny model and
# budget that trains in well under a minute on 2 CPU cores and still learns gesture.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # The paper's model with this project's additions (see the ModelConfig comments): a SER
    # whose A~ stays spread on trained features, token positions, and the ridge readout over
    # every depth with the level features in its path, which probes the pretraining too. (Each
    # change's row: results/README.md. For the trained heads: the [C] flatten head with dropout;
    # on one gesture encoder the pooled heads probed 4-6 points below it.)
    "default": {
        "model.ser_norm": "tempered", "model.pos_encoding": "learned", "model.head": "flatten",
        "model.head_dropout": 0.1, "model.level_features": True,
        "train.classifier": "ridge", "train.probe": "ridge", "train.pretrain_max_steps": 1000,
    },
    "smoke": {
        "model.d_model": 32, "model.n_heads": 2, "model.encoder_layers": 2, "model.ff_dim": 64,
        "model.decoder_layers": 1, "model.cbd_blocks": 1, "model.cbd_ff_dim": 32,
        "model.bernstein_order": 4,
        "train.batch_size": 32, "train.pretrain_epochs": 4, "train.pretrain_lr": 1e-3,
        "train.classifier": "linear_probe", "train.classifier_epochs": 15,
        "train.classifier_lr": 3e-3, "train.probe_every": 2, "train.probe_epochs": 3,
    },
}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ExperimentConfig().replace(PRESETS[name], where=f"preset {name}")


def valid_keys() -> list[str]:
    return sorted(ExperimentConfig().to_dict())


def field_type(key: str) -> Any:
    """The declared type of a dotted key such as ``model.mask_ratio``."""
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise ConfigError(f"unknown key {key!r}{_suggest(key, valid_keys())}")
    hints = get_type_hints(_SECTIONS[section])
    if name not in hints:
        raise ConfigError(f"unknown key {key!r}{_suggest(key, valid_keys())}")
    return hints[name]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; one clear error for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line}: invalid YAML ({problem}); fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.mask_ratio=0.5", "train.classifier=both"]`` -> dict; values are read as YAML.

    Raises:
        ConfigError: an item without ``=`` or a key, or a value that is not valid YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.mask_ratio=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ConfigError(f"--set {item}: the value of {key.strip()} is not valid YAML "
                              f"({problem}); quote a string that holds YAML syntax") from None
    return out


# ---- helpers ----------------------------------------------------------------------------------


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else "; see `valid_keys()`"


def _nest(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Turn dotted keys into nested dicts (one level: section.field)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, but got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        section, dot, name = key.partition(".")
        if dot:
            target = out.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{where}: {section}: expected a mapping")
            target[name] = value
        elif isinstance(value, dict):
            out.setdefault(section, {}).update(value)
        else:
            out[key] = value
    return out


def _flatten(nested: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, values in nested.items():
        if isinstance(values, dict):
            for name, value in values.items():
                out[f"{section}.{name}"] = value
        else:
            out[section] = values
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a field annotation, allowing int -> float and ``None`` for optionals."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, but got {value!r}")
        return value
    args = get_args(tp)
    if args and type(None) in args:  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, but got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, but got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, but got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, but got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in hints:
            prefix = where.rsplit(": ", 1)[-1]
            known = [f"{prefix}.{n}" for n in hints]
            raise ConfigError(f"{where}.{key}: unknown key{_suggest(f'{prefix}.{key}', known)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # range checks in __post_init__ name the field; add the source
        source = where.rsplit(": ", 1)[0]
        raise ConfigError(f"{source}: {exc}") from None
