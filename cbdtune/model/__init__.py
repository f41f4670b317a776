"""The CBD masked model (Han et al., AAAI 2025, arXiv 2412.13232) and its parts."""

from cbdtune.model.cbd import (
    CIM,
    SER,
    CBDBlock,
    CBDDecoder,
    SpectralUnit,
    bernstein_basis,
    binomial_coefficients,
    cim,
    cim_modulation,
    ser_gain,
    ser_normalise,
)
from cbdtune.model.cbd_model import CBDModel, ModelOutput, build_model
from cbdtune.model.classifier import CBDClassifier
from cbdtune.model.encoder import Encoder, TransformerLayer, random_masking
from cbdtune.model.heads import (
    ClassifierHead,
    RidgeHead,
    build_head,
    build_ridge_head,
    series_stats,
)
from cbdtune.model.pos_encoding import PositionalEncoding, build_pos_encoding, sinusoidal_encoding
from cbdtune.model.temporal_decoder import TemporalDecoder
from cbdtune.model.tokenizer import (
    ConvDetokenizer,
    ConvTokenizer,
    PatchDetokenizer,
    PatchTokenizer,
    normalize_series,
    num_tokens,
)

__all__ = [
    "CBDBlock",
    "CBDClassifier",
    "CBDDecoder",
    "CBDModel",
    "CIM",
    "ClassifierHead",
    "ConvDetokenizer",
    "ConvTokenizer",
    "Encoder",
    "ModelOutput",
    "PatchDetokenizer",
    "PatchTokenizer",
    "PositionalEncoding",
    "RidgeHead",
    "SER",
    "SpectralUnit",
    "TemporalDecoder",
    "TransformerLayer",
    "bernstein_basis",
    "binomial_coefficients",
    "build_head",
    "build_ridge_head",
    "build_model",
    "build_pos_encoding",
    "cim",
    "cim_modulation",
    "normalize_series",
    "num_tokens",
    "random_masking",
    "ser_gain",
    "ser_normalise",
    "series_stats",
    "sinusoidal_encoding",
]
