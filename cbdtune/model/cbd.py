"""Content-aware balanced decoder (CBD): CIM, SER, the CBD block and the CBD decoder.

All spectra here are taken along the TOKEN axis, per hidden channel: token features (B, T, D)
-> Z_F = rfft(., dim=1, norm="ortho") of shape (B, S, D), S = T // 2 + 1. The inverse is
irfft(., n=T), so odd token counts come back exactly (no padding, unlike [C] which repeats the
last token to make T even).

Functions come in timm pairs: a pure function testable on plain tensors (``bernstein_basis``,
``cim_modulation``, ``ser_gain``) and a thin Module holding the parameters (``CIM``, ``SER``).

References:
    [P] Y. Han, H. Wang, Y. Hu, Y. Gong, X. Song, W. Guan, "Content-aware Balanced Spectrum
        Encoding in Masked Modeling for Time Series Classification", AAAI 2025,
        https://arxiv.org/abs/2412.13232 -- Eq. (4)-(6) CIM, Eq. (10)-(12) SER, Fig. 2(b).
    [C] github.com/Einstone-rose/CBD, layer/frequency_decoder.py (fre_mlp_dong, frequency_decoder).
    BernNet: He et al., "BernNet: Learning Arbitrary Graph Spectral Filters via Bernstein
        Approximation", NeurIPS 2021, https://arxiv.org/abs/2106.10994 (the Bernstein filter idea).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbdtune.config import ModelConfig
from cbdtune.model.tokenizer import build_detokenizer

SOFTSHRINK = 0.01  # [C] sparsity_threshold of the ReLU + softshrink modulation
INIT_SCALE = 0.02  # [C] CIM weights and biases ~ 0.02 * randn
SER_TEMPERATURE = 2.0  # [I] ser_norm="tempered": A~ = A^(1/2) / sum A^(1/2)
ENERGY_FLOOR = 1e-12  # keeps A / sum A and log A finite for an all-zero spectrum


# ---- pure functions ---------------------------------------------------------------------------


def binomial_coefficients(K: int, num_terms: int | None = None) -> Tensor:
    """C(K, k) for k = 0 .. num_terms - 1 (default K + 1), float32, exact for K <= 60."""
    n = K + 1 if num_terms is None else num_terms
    k = torch.arange(n, dtype=torch.float64)
    log_c = torch.lgamma(torch.tensor(K + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) \
        - torch.lgamma(K - k + 1)
    return log_c.exp().round().float()


def bernstein_basis(
    K: int, x: Tensor, *, num_terms: int | None = None, binom: Tensor | None = None
) -> Tensor:
    """Bernstein basis of order K, b_k(x) = C(K, k) (1 - x)^(K-k) x^k, Eq. (10), Han et al., AAAI
    2025 (arXiv 2412.13232).

    Vectorised over k by broadcasting: no Python loop. For ``num_terms = K + 1`` (k = 0..K, [P])
    the basis is a partition of unity on [0, 1]; ``num_terms = K`` (k = 0..K-1, [C]) drops the
    k = K term, so it sums to 1 - x^K instead.

    Args:
        K: order, >= 1.
        x: (...) values in [0, 1].
        num_terms: K + 1 (default) or K.
        binom: precomputed ``binomial_coefficients(K, num_terms)``, e.g. a module buffer.

    Returns:
        (..., num_terms) basis values.
    """
    n = K + 1 if num_terms is None else num_terms
    if binom is None:
        binom = binomial_coefficients(K, n)
    k = torch.arange(n, device=x.device, dtype=x.dtype)  # (n,)
    x = x.unsqueeze(-1)  # (..., 1) broadcasts against k
    # torch.pow's backward zeroes the exponent-0 terms, so x = 0 or 1 gives finite gradients.
    return binom.to(x) * (1 - x).pow(K - k) * x.pow(k)  # (..., n)


def cim_modulation(
    z_f: Tensor, weight: Tensor, bias: Tensor, *, activation: str = "sigmoid"
) -> Tensor:
    """Content-aware modulation M of a token spectrum, Eq. (4)-(5), Han et al., AAAI 2025
    (arXiv 2412.13232).

    ``sigmoid`` [P]: with W = W_re + jW_im acting on the hidden dimension,
    M_re = sigma(W_re Z_re - W_im Z_im + B_re), M_im = sigma(W_im Z_re + W_re Z_im + B_im),
    i.e. the complex product W Z_F + B with a sigmoid on each part.
    ``relu_softshrink`` [C]: o_re = Z_re W_re + Z_im W_im + b_re, o_im = Z_re W_im - Z_im W_re +
    b_im, i.e. conj(Z_F) W + B, then ReLU and softshrink(0.01) on each part.

    Args:
        z_f: (B, S, D) complex token spectrum.
        weight: (D, D) complex W, rows = output channels.
        bias: (D,) complex B.
        activation: ``"sigmoid"`` or ``"relu_softshrink"``.

    Returns:
        (B, S, D) complex modulation M.
    """
    if activation == "sigmoid":
        h = z_f @ weight.mT + bias  # (B, S, D): W Z per frequency, complex matmul
        return torch.view_as_complex(torch.sigmoid(torch.view_as_real(h)))
    h = z_f.conj() @ weight.mT + bias  # (B, S, D): [C]'s sign pattern
    return torch.view_as_complex(F.softshrink(F.relu(torch.view_as_real(h)), SOFTSHRINK))


def cim(z_f: Tensor, modulation: Tensor) -> Tensor:
    """Z~_F = M (.) Z_F, Eq. (6), Han et al., AAAI 2025 (arXiv 2412.13232).

    By the convolution theorem, irfft(M (.) rfft(z)) is the circular convolution of z along tokens
    with the kernel irfft(M): a content-dependent (dynamic) convolution, different per channel.
    """
    return modulation * z_f


def ser_gain(a_tilde: Tensor, coefficients: Tensor, K: int, *, binom: Tensor | None = None) -> Tensor:
    """Bernstein gain p_K(lambda) = sum_k f(k/K) b_k(A~(lambda)), Eq. (10), Han et al., AAAI 2025
    (arXiv 2412.13232).

    Args:
        a_tilde: (B, S) normalised spectrum energy in [0, 1].
        coefficients: (B, n) the f(k/K), n = K + 1 ([P]) or K ([C]); Eq. (11) makes them.
        K: Bernstein order.
        binom: optional precomputed binomial coefficients (n,).

    Returns:
        (B, S) real gain, one per frequency (shared by all hidden channels, Eq. 12).
    """
    basis = bernstein_basis(K, a_tilde, num_terms=coefficients.shape[-1], binom=binom)  # (B, S, n)
    return torch.einsum("...sn,...n->...s", basis, coefficients)


def ser_normalise(energy: Tensor, norm: str = "softmax") -> Tensor:
    """Normalised spectrum energy A~ over the S frequencies, the input of Eq. (10)-(11), Han et
    al., AAAI 2025 (arXiv 2412.13232).

    * ``softmax`` [P]: A~ = softmax_s(A). Not scale-free: on trained features A is O(sqrt(T D))
      and the DC bin's lead of ~40 (A ~ 45 vs ~5) makes A~ one-hot (1 at DC, < 1e-3 elsewhere).
      The Bernstein polynomial interpolates its end points, p_K(0) = f(0) and p_K(1) = f(1), so
      on a one-hot A~ the order K has no effect.
    * ``fraction`` [C]: A~ = A / sum_s A (= softmax_s(log A)).
    * ``tempered``: A~ = softmax_s(log A / tau) = A^(1/tau) / sum_s A^(1/tau), tau = 2. Scale-free
      like ``fraction`` and flatter: a 9x energy ratio becomes 3x, so A~ stays spread even when
      one bin dominates. [I] our choice; tau = 2 is not tuned.

    Args:
        energy: (..., S) non-negative energies A.
        norm: ``"softmax"``, ``"fraction"`` or ``"tempered"``.

    Returns:
        (..., S) A~ in [0, 1], summing to 1 over S (an all-zero A gives 0 for ``fraction`` and
        the uniform 1/S otherwise).
    """
    if norm == "softmax":
        return energy.softmax(dim=-1)
    if norm == "fraction":
        return energy / energy.sum(dim=-1, keepdim=True).clamp_min(ENERGY_FLOOR)
    if norm == "tempered":
        # log of the clamped energy: finite value and gradient where A = 0 (a constant series)
        return (energy.clamp_min(ENERGY_FLOOR).log() / SER_TEMPERATURE).softmax(dim=-1)
    raise ValueError(f"ser norm must be softmax, fraction or tempered, but got {norm!r}")


def dft_matrices(T: int) -> tuple[Tensor, Tensor]:
    """Real matrices for ``rfft(., n=T, norm="ortho")`` and its inverse along one axis.

    Returns:
        ``forward`` (2S, T): rows ``[cos; -sin](2 pi s t / T) / sqrt(T)``, so ``forward @ x``
        stacks the real parts of the S = T // 2 + 1 bins over their imaginary parts;
        ``inverse`` (T, 2S): ``irfft`` of such a stack, each bin counted twice except DC and (T
        even) Nyquist, whose imaginary parts it ignores as ``irfft`` does.
    """
    S = T // 2 + 1
    t = torch.arange(T, dtype=torch.float64)
    s = torch.arange(S, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(s, t) / T  # (S, T)
    cos, sin = torch.cos(angle) / math.sqrt(T), torch.sin(angle) / math.sqrt(T)
    forward = torch.cat([cos, -sin])  # (2S, T)
    twice = torch.full((S, 1), 2.0, dtype=torch.float64)
    twice[0] = 1.0
    if T % 2 == 0:
        twice[-1] = 1.0
    inverse = torch.cat([twice * cos, -twice * sin]).T  # (T, 2S)
    return forward.float(), inverse.contiguous().float()


# ---- modules ----------------------------------------------------------------------------------


class CIM(nn.Module):
    """Content-aware interaction modulation, Eq. (4)-(6), Han et al., AAAI 2025 (arXiv 2412.13232).

    Parameters named after the paper: W = w_re + j w_im (D x D), B = b_re + j b_im.
    """

    def __init__(self, d_model: int, activation: str = "sigmoid"):
        super().__init__()
        self.activation = activation
        self.w_re = nn.Parameter(INIT_SCALE * torch.randn(d_model, d_model))
        self.w_im = nn.Parameter(INIT_SCALE * torch.randn(d_model, d_model))
        self.b_re = nn.Parameter(INIT_SCALE * torch.randn(d_model))
        self.b_im = nn.Parameter(INIT_SCALE * torch.randn(d_model))

    def forward(self, z_f: Tensor) -> Tensor:  # (B, S, D) complex -> (B, S, D) complex
        weight = torch.complex(self.w_re, self.w_im)
        bias = torch.complex(self.b_re, self.b_im)
        return cim(z_f, cim_modulation(z_f, weight, bias, activation=self.activation))


class SER(nn.Module):
    """Spectrum energy rebalance, Eq. (10)-(12), Han et al., AAAI 2025 (arXiv 2412.13232).

    Energy A(lambda_s) = ||Z(lambda_s)||_2 over hidden channels, per sample: (B, S). ``norm``
    turns it into A~ for the Bernstein basis (:func:`ser_normalise`): ``softmax`` [P], ``fraction``
    [C], ``tempered``. The coefficients f(k/K) of Eq. (10):

    * ``coefficients="linear"`` [P]: f = W_c A~ + b_c (Eq. 11), no squashing.
    * ``coefficients="sigmoid"`` [C]: f = sigmoid(W_c A + b_c) on the raw energy.

    The authors' code is ``coefficients="sigmoid"`` with ``norm="fraction"``; the paper is
    ``"linear"`` with ``"softmax"``, the defaults.

    W_c is (num_terms x S): the coefficients are per sample, computed from its whole energy
    profile, and the gain p_K (B, S) is shared by all channels (Eq. 12). Which spectrum the energy
    comes from (after CIM [P] or before [C]) is the caller's choice (``energy_from``).
    """

    binom: Tensor  # buffer (num_terms,)

    def __init__(self, num_freqs: int, K: int, *, terms: str = "0..K", coefficients: str = "linear",
                 norm: str = "softmax"):
        super().__init__()
        self.K = K
        self.coefficients = coefficients
        self.norm = norm
        num_terms = K + 1 if terms == "0..K" else K
        self.coef = nn.Linear(num_freqs, num_terms)  # W_c, b_c of Eq. 11
        self.register_buffer("binom", binomial_coefficients(K, num_terms), persistent=False)

    def energy(self, energy_from: Tensor) -> Tensor:
        """(B, S, D) complex spectrum -> (B, S) energy A, the L2 norm over hidden channels."""
        # Over (re, im) pairs: the same norm, but the complex kernel is ~100x slower on CPU.
        # vector_norm's backward is 0 (not NaN) where the energy is 0, e.g. a constant series.
        return torch.linalg.vector_norm(torch.view_as_real(energy_from), dim=(-2, -1))

    def forward(self, z_f: Tensor, energy_from: Tensor) -> Tensor:
        energy = self.energy(energy_from)  # (B, S)
        a_tilde = ser_normalise(energy, self.norm)  # (B, S)
        if self.coefficients == "linear":
            f = self.coef(a_tilde)  # (B, n)
        else:
            f = torch.sigmoid(self.coef(energy))
        p = ser_gain(a_tilde, f, self.K, binom=self.binom)  # (B, S)
        return z_f * p.unsqueeze(-1)  # Eq. 12: one gain per frequency, broadcast over channels


class SpectralUnit(nn.Module):
    """rfft along tokens -> CIM -> SER -> irfft: the token mixer of a CBD block, Fig. 2(b).

    Runs in float32 with autocast off: the complex products need the precision. The rfft and
    irfft along the T tokens are matmuls with the DFT matrices (:func:`dft_matrices`), exact
    for any T, odd included: for the few tokens here (8-42) that is 3x faster than the strided
    FFT forward and ~10x in backward on CPU. [C] takes ``.abs()`` of the irfft output; [P] does
    not, and neither do we (no switch for it).
    """

    dft: Tensor  # buffers
    idft: Tensor

    def __init__(self, cfg: ModelConfig, num_tokens: int):
        super().__init__()
        self.energy_after_cim = cfg.ser_energy == "after_cim"
        dft, idft = dft_matrices(num_tokens)
        self.register_buffer("dft", dft, persistent=False)  # (2S, T)
        self.register_buffer("idft", idft, persistent=False)  # (T, 2S)
        self.cim = CIM(cfg.d_model, cfg.cim_activation) if cfg.use_cim else None
        self.ser = SER(num_tokens // 2 + 1, cfg.bernstein_order, terms=cfg.bernstein_terms,
                       coefficients=cfg.ser_coefficients,
                       norm=cfg.ser_norm) if cfg.use_ser else None

    # Inductor has no complex codegen (it warns and falls back) and the CPU build corrupted the
    # heap on this graph (torch 2.13): keep the complex part eager under torch.compile.
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        S = self.dft.shape[0] // 2
        with torch.autocast(x.device.type, enabled=False):
            re_im = self.dft @ x.float()  # (B, 2S, D): rfft(x, dim=1, norm="ortho"), stacked
            z_f = torch.complex(re_im[:, :S], re_im[:, S:])  # (B, S, D)
            z = self.cim(z_f) if self.cim is not None else z_f
            if self.ser is not None:
                z = self.ser(z, z if self.energy_after_cim else z_f)
            return self.idft @ torch.cat([z.real, z.imag], dim=1)  # (B, T, D): irfft(z, n=T)


class FeedForward(nn.Module):
    """[C] Linear(D -> D/2) -> GELU -> Linear(D/2 -> D); [C] builds it with dropout 0, so none."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CBDBlock(nn.Module):
    """[C] wiring ``x = x + CIMSER(LN(x)); x = x + FFN(LN(x))`` ([P] Fig. 2(b) puts the LN after
    the FFT; [C]'s pre-norm in the time domain is what was trained)."""

    def __init__(self, cfg: ModelConfig, num_tokens: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.spectral = SpectralUnit(cfg, num_tokens)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.cbd_ff_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.spectral(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class CBDDecoder(nn.Module):
    """CBD blocks -> LayerNorm -> Linear(D -> D) -> own deconv stack ([C]).

    (B, T, D) -> (B, C, L) in normalised units; the model de-normalises and takes the spectrum.
    """

    def __init__(self, cfg: ModelConfig, num_tokens: int):
        super().__init__()
        self.blocks = nn.ModuleList([CBDBlock(cfg, num_tokens) for _ in range(cfg.cbd_blocks)])
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # [C] embedding_to_patch_freq
        self.detokenizer = build_detokenizer(cfg)

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return self.detokenizer(self.proj(self.norm(h)))  # (B, C, L)
