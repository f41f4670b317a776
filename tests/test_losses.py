"""The dual-constraint loss, Eq. 14 of Han et al., AAAI 2025."""

from __future__ import annotations

import pytest
import torch

from cbdtune.config import LossConfig
from cbdtune.losses import dual_constraint_loss, frequency_distance
from cbdtune.model import ModelOutput

TERMS = ("time_rec", "freq_dual", "freq_rec", "time_dual")


def _x(L: int = 51, seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, L, generator=torch.Generator().manual_seed(seed)) * 5 + 2


def _perfect(x: torch.Tensor) -> ModelOutput:
    mask = torch.zeros(x.shape[0], 4, dtype=torch.bool)
    return ModelOutput(x.clone(), torch.fft.rfft(x, dim=-1, norm="ortho"), mask)


@pytest.mark.parametrize("freq_loss", ["squared", "focal"])
@pytest.mark.parametrize("L", [50, 51])
def test_dual_loss_zero_for_perfect_reconstruction(freq_loss: str, L: int) -> None:
    x = _x(L)
    terms = dual_constraint_loss(x, _perfect(x), LossConfig(freq_loss=freq_loss))
    for name in ("time_rec", "freq_dual", "freq_rec"):
        assert terms[name].item() == 0.0, name
    assert terms["time_dual"].item() < 1e-10  # irfft(rfft(x)) round trip, float32
    assert terms["total"].item() < 1e-10


@pytest.mark.parametrize("freq_loss", ["squared", "focal"])
def test_dual_loss_each_term_positive_for_imperfect_reconstruction(freq_loss: str) -> None:
    x = _x()
    noise = _x(seed=1) * 0.1
    out = ModelOutput(x + noise, torch.fft.rfft(x - noise, dim=-1, norm="ortho"),
                      torch.zeros(4, 4, dtype=torch.bool))
    terms = dual_constraint_loss(x, out, LossConfig(freq_loss=freq_loss))
    for name in TERMS:
        assert terms[name].item() > 0.0, name


def test_dual_loss_total_is_eq_14_weighted_sum() -> None:
    x = _x()
    out = ModelOutput(x * 0.5, torch.fft.rfft(x * 1.5, dim=-1, norm="ortho"),
                      torch.zeros(4, 4, dtype=torch.bool))
    cfg = LossConfig(gamma=0.3, w_time_rec=2.0, w_freq_dual=0.5, w_freq_rec=3.0, w_time_dual=0.25)
    t = dual_constraint_loss(x, out, cfg)
    expected = 2.0 * t["time_rec"] + 0.5 * t["freq_dual"] + 0.3 * (3.0 * t["freq_rec"]
                                                                   + 0.25 * t["time_dual"])
    torch.testing.assert_close(t["total"], expected)


def test_dual_loss_cbd_terms_exact_zero_without_spectrum() -> None:
    x = _x()
    out = ModelOutput(x * 0.5, None, torch.zeros(4, 4, dtype=torch.bool))
    t = dual_constraint_loss(x, out, LossConfig())
    assert t["freq_rec"].item() == 0.0 and t["time_dual"].item() == 0.0
    assert set(t) == {*TERMS, "total"} and all(v.dim() == 0 for v in t.values())


def test_dual_loss_terms_are_plain_means() -> None:
    """time_rec is the MSE; freq_dual the mean of |dF|^2 over (B, C, S) bins, ortho rfft."""
    x = _x(L=64)
    recon = x + 0.1 * _x(L=64, seed=2)
    t = dual_constraint_loss(x, ModelOutput(recon, None, torch.zeros(4, 4, dtype=torch.bool)),
                             LossConfig())
    torch.testing.assert_close(t["time_rec"], ((recon - x) ** 2).mean())
    d = torch.fft.rfft(recon - x, norm="ortho")
    torch.testing.assert_close(t["freq_dual"], (d.real**2 + d.imag**2).mean())


def test_focal_frequency_distance_weights_bins_by_relative_error() -> None:
    """[C] focal form: weight |dF| / max|dF| (detached), so focal <= squared, equal if flat."""
    target = torch.zeros(2, 1, 5, dtype=torch.complex64)
    flat = torch.full((2, 1, 5), 1 + 1j, dtype=torch.complex64)
    torch.testing.assert_close(frequency_distance(flat, target, focal=True),
                               frequency_distance(flat, target))
    pred = torch.randn(2, 1, 5, dtype=torch.complex64, requires_grad=True)
    focal = frequency_distance(pred, target, focal=True)
    assert focal < frequency_distance(pred, target)
    focal.backward()
    w = pred.detach().abs() / pred.detach().abs().max()  # d/dpred of w * |pred|^2, w detached
    torch.testing.assert_close(pred.grad, 2 * w * pred.detach() / pred.numel())


def test_dual_loss_gradients_reach_both_outputs() -> None:
    x = _x(L=51)
    recon = (x * 0.9).requires_grad_()
    spectrum = torch.fft.rfft(x * 1.1, norm="ortho").requires_grad_()
    t = dual_constraint_loss(x, ModelOutput(recon, spectrum, torch.zeros(4, 4, dtype=torch.bool)),
                             LossConfig())
    t["total"].backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert spectrum.grad is not None and spectrum.grad.abs().sum() > 0
