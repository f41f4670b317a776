"""Figures logged to MLflow per trial: the learning curve and the spectral energy per layer.

Both read only the trial's reported metrics (a list of dicts), so they can be drawn by the search
driver for any trial, including one ASHA stopped early.
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib

from cbdtune import reports

matplotlib.use("Agg")  # headless: drivers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_LAYER = re.compile(r"^diag\.energy_(low|mid|high)\.(.+)$")


def learning_curve(history: list[dict[str, Any]]) -> Figure | None:
    """Validation accuracy at every evaluation point (by stage) and the pretraining loss."""
    acc, stage_of = reports.VAL_ACCURACY, lambda h: h.get(reports.STAGE, "?")
    points = [(i, h) for i, h in enumerate(history, start=1)
              if isinstance(h.get(acc), (int, float)) and stage_of(h) != reports.FINAL_STAGE]
    if not points:
        return None
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage in dict.fromkeys(stage_of(h) for _, h in points):
        xs = [i for i, h in points if stage_of(h) == stage]
        ys = [h[acc] for i, h in points if stage_of(h) == stage]
        ax_acc.plot(xs, ys, marker="." if len(xs) < 30 else None, label=str(stage))
    ax_acc.set_xlabel("report")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    loss = reports.LOSS_PREFIX
    pre = [h for h in history if f"{loss}total" in h]
    if pre:
        for term in ("total", "time_rec", "freq_dual", "freq_rec", "time_dual"):
            ys = [h.get(loss + term) for h in pre]
            if all(isinstance(y, (int, float)) for y in ys):
                ax_loss.plot([h.get(reports.EPOCH, i) for i, h in enumerate(pre)], ys, label=term)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("pretraining epoch")
        ax_loss.set_ylabel("loss (Eq. 14 terms)")
        ax_loss.legend(fontsize=8)
        ax_loss.grid(alpha=0.3)
    else:
        ax_loss.set_visible(False)
    fig.tight_layout()
    return fig


def spectrum_energy(history: list[dict[str, Any]]) -> Figure | None:
    """Share of feature energy in low/mid/high token frequencies, per encoder layer (last report)."""
    last = next((h for h in reversed(history) if any(_LAYER.match(k) for k in h)), None)
    if last is None:
        return None
    bands: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        m = _LAYER.match(key)
        if m:
            bands.setdefault(m.group(2), {})[m.group(1)] = float(value)
    layers = list(bands)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(layers) + 2), 3.6))
    bottom = [0.0] * len(layers)
    for band in ("low", "mid", "high"):
        ys = [bands[layer].get(band, 0.0) for layer in layers]
        ax.bar(layers, ys, bottom=bottom, label=band)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("share of spectral energy")
    ax.set_xlabel("encoder layer")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("feature spectrum by layer (low-pass bias, Han et al. 2025)")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
