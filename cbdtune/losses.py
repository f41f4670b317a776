"""The dual-constraint loss, Eq. (14), Han et al., AAAI 2025 (arXiv 2412.13232).

    L = L_T^re(x^_T, x) + L_F^dual(F(x^_T), F(x)) + gamma [ L_F^re(X^_F, F(x)) + L_T^dual(F^-1(X^_F), x) ]

x^_T is the temporal decoder's reconstruction, X^_F the CBD decoder's output spectrum and
F = rfft along time (ortho). Time terms are MSE; frequency terms the squared distance over real
and imaginary parts ([P]) or the focal frequency loss with alpha = 1 ([C]). Every term covers the
whole series (visible and masked steps) and all channels.

References:
    [C] github.com/Einstone-rose/CBD, utils/my_loss.py (MyFocalFrequencyLoss),
        train_step/single_pretrain_mae.py (how the four terms are combined).
    Focal frequency loss: Jiang et al., ICCV 2021, https://arxiv.org/abs/2012.12821
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cbdtune.config import LossConfig
from cbdtune.model.cbd_model import ModelOutput


def frequency_distance(pred: Tensor, target: Tensor, *, focal: bool = False) -> Tensor:
    """Mean squared distance between two complex spectra, optionally focal-weighted.

    Args:
        pred: (B, C, S) complex.
        target: (B, C, S) complex.
        focal: [C] focal frequency loss (alpha = 1): each bin weighted by |dF| / max |dF| over
            the batch, clamped to [0, 1] and detached, so the hardest frequencies count most.

    Returns:
        Scalar: mean over B, C, S of w * (d_re^2 + d_im^2).
    """
    dist = torch.view_as_real(pred - target).square().sum(dim=-1)  # (B, C, S) |dF|^2
    if not focal:
        return dist.mean()
    with torch.no_grad():
        mag = dist.sqrt()
        w = (mag / mag.max().clamp_min(torch.finfo(mag.dtype).tiny)).clamp(0.0, 1.0)
    return (w * dist).mean()


def dual_constraint_loss(x: Tensor, out: ModelOutput, cfg: LossConfig) -> dict[str, Tensor]:
    """The four terms of Eq. (14) and their weighted total.

    Args:
        x: (B, C, L) raw series (the reconstruction target).
        out: the model's :class:`ModelOutput` for ``x``.
        cfg: term weights, gamma and the frequency-loss form.

    Returns:
        Scalar tensors ``time_rec``, ``freq_dual``, ``freq_rec``, ``time_dual`` and ``total`` =
        w_tr time_rec + w_fd freq_dual + gamma (w_fr freq_rec + w_td time_dual). Without a CBD
        decoder (``out.spectrum is None``) the CBD terms are exact zeros.
    """
    focal = cfg.freq_loss == "focal"
    L = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):  # FFTs and squared errors in float32
        x = x.float()
        recon = out.recon.float()
        x_f = torch.fft.rfft(x, dim=-1, norm="ortho")  # (B, C, L//2 + 1)
        terms = {
            "time_rec": F.mse_loss(recon, x),
            "freq_dual": frequency_distance(torch.fft.rfft(recon, dim=-1, norm="ortho"), x_f,
                                            focal=focal),
        }
        if out.spectrum is None:
            zero = x.new_zeros(())
            terms["freq_rec"], terms["time_dual"] = zero, zero.clone()
        else:
            # n=L: without it irfft returns L - 1 steps for odd L (the [C] crash). [C] also takes
            # .abs() of this inverse; [P]'s F^-1 does not, and neither do we.
            x_t = torch.fft.irfft(out.spectrum, n=L, dim=-1, norm="ortho")  # (B, C, L)
            terms["freq_rec"] = frequency_distance(out.spectrum, x_f, focal=focal)
            terms["time_dual"] = F.mse_loss(x_t, x)
        terms["total"] = (cfg.w_time_rec * terms["time_rec"] + cfg.w_freq_dual * terms["freq_dual"]
                          + cfg.gamma * (cfg.w_freq_rec * terms["freq_rec"]
                                         + cfg.w_time_dual * terms["time_dual"]))
    return terms
