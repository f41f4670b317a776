"""cbdtune: distributed hyperparameter search for CBD masked time-series models.

Han et al., "Content-aware Balanced Spectrum Encoding in Masked Modeling for Time Series
Classification", AAAI 2025 (arXiv 2412.13232).
"""

__version__ = "0.1.0"
