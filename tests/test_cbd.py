"""CIM (Eq. 4-6) and SER (Eq. 10-12) of Han et al., AAAI 2025, tested on plain tensors."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from cbdtune.config import DataConfig, LossConfig, ModelConfig
from cbdtune.data import load_dataset
from cbdtune.losses import dual_constraint_loss
from cbdtune.model import build_model
from cbdtune.model.cbd import (
    CIM,
    SER,
    SpectralUnit,
    bernstein_basis,
    binomial_coefficients,
    cim,
    cim_modulation,
    dft_matrices,
    ser_gain,
    ser_normalise,
)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cfg(**kw: object) -> ModelConfig:
    base = dict(in_channels=2, seq_len=64, d_model=8, n_heads=2, decoder_heads=2, ff_dim=16,
                encoder_layers=1, decoder_layers=1, cbd_blocks=1, cbd_ff_dim=8, bernstein_order=4)
    return ModelConfig(**{**base, **kw})


# ---- Bernstein basis, Eq. 10 -------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 12, 16])
def test_bernstein_basis_sums_to_one(K: int) -> None:
    """k = 0..K ([P]) is a partition of unity on [0, 1], endpoints included."""
    x = torch.cat([_rand(1000, seed=K), torch.tensor([0.0, 1.0], dtype=torch.float64)])
    basis = bernstein_basis(K, x)
    assert basis.shape == (1002, K + 1)
    assert (basis >= 0).all()
    torch.testing.assert_close(basis.sum(-1), torch.ones_like(x))


@pytest.mark.parametrize("K", [1, 4, 12])
def test_bernstein_basis_without_last_term_sums_to_one_minus_x_pow_k(K: int) -> None:
    """k = 0..K-1 ([C]) drops b_K(x) = x^K, so it does NOT sum to 1."""
    x = _rand(500, seed=K)
    basis = bernstein_basis(K, x, num_terms=K)
    assert basis.shape == (500, K)
    torch.testing.assert_close(basis.sum(-1), 1 - x**K)


def test_bernstein_basis_matches_explicit_formula() -> None:
    K, x = 6, _rand(50)
    expected = torch.stack([math.comb(K, k) * (1 - x) ** (K - k) * x**k for k in range(K + 1)], -1)
    torch.testing.assert_close(bernstein_basis(K, x), expected)
    torch.testing.assert_close(binomial_coefficients(12),
                               torch.tensor([float(math.comb(12, k)) for k in range(13)]))


def test_bernstein_basis_gradient_finite_at_endpoints() -> None:
    x = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    bernstein_basis(12, x).square().sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- SER gain, Eq. 10-12 -------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.0, 0.3, 2.5])
def test_ser_gain_equals_constant_coefficient(c: float) -> None:
    a = _rand(3, 9)
    gain = ser_gain(a, torch.full((3, 13), c, dtype=torch.float64), K=12)
    torch.testing.assert_close(gain, torch.full_like(a, c))
    # the [C] convention (k = 0..K-1) loses the x^K term
    gain_c = ser_gain(a, torch.full((3, 12), c, dtype=torch.float64), K=12)
    torch.testing.assert_close(gain_c, c * (1 - a**12))


@pytest.mark.parametrize("K", [1, 2, 4, 12])
def test_ser_gain_depends_on_order_k(K: int) -> None:
    """With f(k/K) = (k/K)^2 the Bernstein polynomial is x^2 + x(1-x)/K: K is not ignored."""
    a = _rand(2, 7)
    f = (torch.arange(K + 1, dtype=torch.float64) / K) ** 2
    gain = ser_gain(a, f.expand(2, K + 1), K=K)
    torch.testing.assert_close(gain, a**2 + a * (1 - a) / K)


@pytest.mark.parametrize(("terms", "n"), [("0..K", 5), ("0..K-1", 4)])
def test_ser_coefficient_matrix_is_terms_by_frequencies(terms: str, n: int) -> None:
    """W_c of Eq. 11 is (K+1) x S ([P]) or K x S ([C]), S = rfft bins of the token axis."""
    for T in (8, 15):
        ser = SER(T // 2 + 1, K=4, terms=terms)
        assert ser.coef.weight.shape == (n, T // 2 + 1)


def test_ser_constant_coefficients_scale_spectrum() -> None:
    """Through the module: zero W_c and b_c = c gives Z_bal = c * Z (Eq. 12)."""
    ser = SER(5, K=4)
    with torch.no_grad():
        ser.coef.weight.zero_()
        ser.coef.bias.fill_(0.7)
    z = torch.randn(2, 5, 3, dtype=torch.complex64)
    torch.testing.assert_close(ser(z, z), 0.7 * z)


# ---- SER normalised energy A~ (ser_norm) ---------------------------------------------------------


NORMS = ["softmax", "fraction", "tempered"]


@pytest.mark.parametrize("norm", NORMS)
def test_ser_normalise_is_a_distribution_over_frequencies(norm: str) -> None:
    energy = 10 * _rand(4, 9)
    a = ser_normalise(energy, norm)
    assert a.shape == (4, 9) and (a >= 0).all() and (a <= 1).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(4, dtype=torch.float64))


def test_ser_normalise_formulas() -> None:
    """softmax [P]; fraction [C] = A / sum A = softmax(log A); tempered = A^(1/2) / sum A^(1/2)."""
    energy = 5 * _rand(3, 7) + 0.1
    torch.testing.assert_close(ser_normalise(energy, "softmax"), energy.softmax(-1))
    fraction = energy / energy.sum(-1, keepdim=True)
    torch.testing.assert_close(ser_normalise(energy, "fraction"), fraction)
    torch.testing.assert_close(fraction, energy.log().softmax(-1))
    root = energy.sqrt()
    torch.testing.assert_close(ser_normalise(energy, "tempered"), root / root.sum(-1, keepdim=True))


@pytest.mark.parametrize("norm", ["fraction", "tempered"])
def test_ser_normalise_is_scale_free_unlike_softmax(norm: str) -> None:
    energy = _rand(2, 9) + 0.1
    torch.testing.assert_close(ser_normalise(100 * energy, norm), ser_normalise(energy, norm))
    assert not torch.allclose(ser_normalise(100 * energy, "softmax"),
                              ser_normalise(energy, "softmax"))


@pytest.mark.parametrize("norm", NORMS)
def test_ser_normalise_zero_energy_is_finite_with_finite_gradient(norm: str) -> None:
    """A constant series has zero energy at every non-DC bin, or everywhere after LayerNorm."""
    energy = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], requires_grad=True)
    a = ser_normalise(energy, norm)
    a.square().sum().backward()
    assert torch.isfinite(a).all() and torch.isfinite(energy.grad).all()


def test_ser_normalise_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="got 'max'"):
        ser_normalise(torch.ones(2, 3), "max")


@pytest.mark.parametrize("coefficients", ["linear", "sigmoid"])
def test_ser_norm_decides_a_tilde_in_both_coefficient_modes(coefficients: str) -> None:
    """Same parameters and input: A~ (and so the output) follows ``norm`` in both modes."""
    torch.manual_seed(0)
    z = torch.randn(2, 5, 3, dtype=torch.complex64)
    outs = []
    for norm in NORMS:
        torch.manual_seed(1)
        outs.append(SER(5, K=4, coefficients=coefficients, norm=norm)(z, z))
    for i in range(3):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j], atol=1e-6), (NORMS[i], NORMS[j])


def test_ser_sigmoid_with_fraction_is_the_authors_code() -> None:
    """[C]: A~ = A / sum A, f = sigmoid(W_c A + b_c) on the raw energy A."""
    torch.manual_seed(0)
    ser = SER(5, K=4, terms="0..K-1", coefficients="sigmoid", norm="fraction")
    z = torch.randn(2, 5, 3, dtype=torch.complex64)
    energy = z.abs().square().sum(-1).sqrt()  # (B, S) ||Z(lambda_s)||_2
    f = torch.sigmoid(energy @ ser.coef.weight.T + ser.coef.bias)
    gain = ser_gain(energy / energy.sum(-1, keepdim=True), f, 4)
    torch.testing.assert_close(ser(z, z), z * gain.unsqueeze(-1))


def _pretrained_ser_input(steps: int = 20) -> torch.Tensor:
    """The spectrum SER sees (after CIM, [P]) in a tiny CBD model pretrained for ``steps``
    steps on gesture with the dual loss, Eq. (14): (64, S, 32) complex, S = 22."""
    cv = {"cv_folds": 0} if "cv_folds" in {f.name for f in fields(DataConfig)} else {}
    x = torch.as_tensor(load_dataset(DataConfig(dataset="gesture", **cv), seed=0,
                                     download=False).train.x)  # (96, 3, 315)
    torch.manual_seed(0)
    model = build_model(ModelConfig(in_channels=3, seq_len=315, d_model=32, n_heads=2,
                                    decoder_heads=2, ff_dim=64, encoder_layers=2,
                                    decoder_layers=1, cbd_blocks=1, cbd_ff_dim=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        batch = x[torch.randint(len(x), (16,), generator=g)]
        loss = dual_constraint_loss(batch, model(batch, generator=g), LossConfig())["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # it trained (5.9 -> ~1.3 at seed 0)
    seen: list[torch.Tensor] = []
    ser = model.cbd_decoder.blocks[0].spectral.ser
    ser.register_forward_hook(lambda m, inp, out: seen.append(inp[1]))  # energy_from
    with torch.no_grad():
        model.eval()(x[:64], generator=g)
    return seen[0]


def test_ser_norm_on_pretrained_features_softmax_is_degenerate_fraction_tempered_not() -> None:
    """On trained features the DC bin leads by ~20 (A ~ 22 vs ~2.6 at D = 32): softmax [P] puts
    all of A~ there and K does nothing; fraction [C] and tempered keep A~ spread, so K matters.

    K is compared with one coefficient function sampled at k/K, f(k/K) = (k/K)^2 (zero W_c,
    b_c = f): p_K(x) = x^2 + x (1 - x) / K, which depends on K except at x = 0 or 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on the shared 2-core machines, 2 threads ran 5x slower under load
    try:
        z = _pretrained_ser_input()
    finally:
        torch.set_num_threads(threads)
    S = z.shape[1]
    stats = {}
    for norm in NORMS:
        gains = []
        for K in (2, 12):
            ser = SER(S, K, norm=norm)
            with torch.no_grad():
                ser.coef.weight.zero_()
                ser.coef.bias.copy_((torch.arange(K + 1.0) / K) ** 2)
                gains.append(ser(torch.ones(1, S, 1, dtype=z.dtype), z)[..., 0].real)  # (B, S)
        a = ser_normalise(ser.energy(z), norm)  # (B, S)
        entropy = -torch.special.xlogy(a, a).sum(-1).mean().item()
        stats[norm] = (a.max().item(), entropy, (gains[0] - gains[1]).abs().max().item())
    a_max, entropy, k_effect = stats["softmax"]
    assert a_max > 0.999 and entropy < 1e-3 and k_effect < 1e-4, stats  # degenerate
    for norm in ("fraction", "tempered"):
        a_max, entropy, k_effect = stats[norm]
        assert a_max < 0.9 and entropy > 0.5 * math.log(S) and k_effect > 1e-2, (norm, stats)
    assert stats["tempered"][1] > stats["fraction"][1], stats  # tempered is the flatter


# ---- CIM, Eq. 4-6 -------------------------------------------------------------------------------


def test_cim_modulation_sigmoid_matches_eq_4_5() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 4, dtype=torch.complex64, generator=g)
    w_re, w_im, b_re, b_im = (torch.randn(*s, generator=g) for s in ((4, 4), (4, 4), (4,), (4,)))
    m = cim_modulation(z, torch.complex(w_re, w_im), torch.complex(b_re, b_im))
    zr, zi = z.real, z.imag
    torch.testing.assert_close(m.real, torch.sigmoid(zr @ w_re.T - zi @ w_im.T + b_re))
    torch.testing.assert_close(m.imag, torch.sigmoid(zr @ w_im.T + zi @ w_re.T + b_im))


def test_cim_modulation_relu_softshrink_matches_authors_code() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 4, dtype=torch.complex64, generator=g)
    r, i, br, bi = (torch.randn(*s, generator=g) for s in ((4, 4), (4, 4), (4,), (4,)))
    # [C] o_re = X_re R + X_im I + b_r, o_im = X_re I - X_im R + b_i, with R = W_re^T, I = W_im^T
    m = cim_modulation(z, torch.complex(r.T, i.T), torch.complex(br, bi),
                       activation="relu_softshrink")
    shrink = torch.nn.functional.softshrink
    zr, zi = z.real, z.imag
    torch.testing.assert_close(m.real, shrink(torch.relu(zr @ r + zi @ i + br), 0.01))
    torch.testing.assert_close(m.imag, shrink(torch.relu(zr @ i - zi @ r + bi), 0.01))


@pytest.mark.parametrize("T", [8, 9])
def test_cim_with_unit_modulation_is_identity(T: int) -> None:
    z = torch.randn(2, T, 6)
    z_f = torch.fft.rfft(z, dim=1, norm="ortho")
    out = torch.fft.irfft(cim(z_f, torch.ones_like(z_f)), n=T, dim=1, norm="ortho")
    torch.testing.assert_close(out, z)


@pytest.mark.parametrize("T", [8, 11])
def test_cim_product_is_circular_convolution_along_tokens(T: int) -> None:
    """Eq. 6 by the convolution theorem: irfft(M * rfft(z)) = z (*) irfft(M), per channel."""
    g = torch.Generator().manual_seed(T)
    B, D = 2, 3
    z = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    m = torch.randn(T // 2 + 1, D, dtype=torch.complex128, generator=g)  # any M, DC imag included
    y = torch.fft.irfft(cim(torch.fft.rfft(z, dim=1, norm="ortho"), m), n=T, dim=1, norm="ortho")
    h = torch.fft.irfft(m, n=T, dim=0)  # (T, D) kernel; "backward" norm pairs with two ortho
    t = torch.arange(T)
    idx = (t[:, None] - t[None, :]) % T  # idx[t, s] = (t - s) mod T
    direct = (z[:, idx, :] * h[None, None]).sum(dim=2)  # y[t] = sum_s h[s] z[t - s]
    torch.testing.assert_close(y, direct)


def test_cim_module_preserves_shape_and_dtype() -> None:
    z = torch.randn(3, 6, 8, dtype=torch.complex64)
    out = CIM(8)(z)
    assert out.shape == z.shape and out.dtype == z.dtype


@pytest.mark.parametrize("T", [8, 9])
def test_spectral_unit_is_identity_without_cim_and_ser(T: int) -> None:
    unit = SpectralUnit(_cfg(use_cim=False, use_ser=False), T)
    x = torch.randn(2, T, 8)
    torch.testing.assert_close(unit(x), x)


@pytest.mark.parametrize("switch", [
    {"cim_activation": "relu_softshrink"}, {"ser_energy": "before_cim"},
    {"ser_coefficients": "sigmoid"}, {"ser_norm": "fraction"}, {"ser_norm": "tempered"},
    {"ser_coefficients": "sigmoid", "ser_norm": "fraction"},
])
def test_spectral_unit_switches_change_output(switch: dict[str, str]) -> None:
    """Same parameters, different switch: the output must change."""
    torch.manual_seed(0)
    base = SpectralUnit(_cfg(), 9)
    other = SpectralUnit(_cfg(**switch), 9)
    other.load_state_dict(base.state_dict())
    x = torch.randn(2, 9, 8)
    assert not torch.allclose(base(x), other(x), atol=1e-6)


def test_spectral_unit_odd_tokens_backward_finite() -> None:
    unit = SpectralUnit(_cfg(), 7)
    x = torch.randn(2, 7, 8, requires_grad=True)
    unit(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in unit.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"


@pytest.mark.parametrize("T", [1, 2, 7, 8, 20, 41, 42])
def test_dft_matrices_are_rfft_and_irfft(T: int) -> None:
    torch.manual_seed(0)
    forward, inverse = dft_matrices(T)
    S = T // 2 + 1
    x = torch.randn(3, T, 5)
    ref = torch.fft.rfft(x, dim=1, norm="ortho")
    re_im = forward @ x
    torch.testing.assert_close(torch.complex(re_im[:, :S], re_im[:, S:]), ref, atol=1e-5, rtol=0)
    z = torch.randn(3, S, 5, dtype=torch.complex64)  # DC/Nyquist imaginary parts are ignored
    torch.testing.assert_close(inverse @ torch.cat([z.real, z.imag], dim=1),
                               torch.fft.irfft(z, n=T, dim=1, norm="ortho"), atol=1e-5, rtol=0)
