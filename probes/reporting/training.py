"""Training curves of the fine-tunes: per-epoch training loss and hold-out macro-F1 (``training_curves.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from probes.reporting.plots import DPI, palette, pyplot, save


def plot_training_curves(epochs: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Two panels against epoch: training loss and hold-out macro-F1, one line per fit (colour per
    backbone x probe, one line per limit x seed), the chosen (best) epoch marked."""
    plt = pyplot()
    colors = palette()
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=DPI)
    groups = list(dict.fromkeys(zip(epochs["backbone"], epochs["probe"])))
    labelled: set = set()
    for (b, p, _lim, _seed), e in epochs.groupby(["backbone", "probe", "limit", "seed"], sort=False, dropna=False):
        e = e.sort_values("epoch")
        color = colors(groups.index((b, p)) % 10)
        label = f"{b} · {p}" if (b, p) not in labelled else None
        labelled.add((b, p))
        x = e["epoch"].to_numpy(float)
        ax_loss.plot(x, e["train_loss"].to_numpy(float), "-", color=color, lw=1.2, alpha=0.8, label=label)
        f1 = pd.to_numeric(e["val_macro_f1"], errors="coerce").to_numpy(float)
        if np.isfinite(f1).any():
            ax_f1.plot(x, f1, "-", color=color, lw=1.2, alpha=0.8, label=label)
            best = e["best"].to_numpy(bool)
            if best.any():
                last = np.flatnonzero(best)[-1]  # the epoch whose state was kept
                ax_f1.plot(x[last], f1[last], "o", color=color, ms=5)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_f1.set(xlabel="epoch", ylabel="hold-out macro-F1", title="hold-out macro-F1 (dot: kept epoch)")
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
    if labelled:
        ax_loss.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def training_plots(epochs: pd.DataFrame | None, title: str = "") -> dict:
    """``{"training_curves.png": writer}`` for a study's plots when it trained by epochs, else ``{}``."""
    if epochs is None or not len(epochs):
        return {}
    return {"training_curves.png": lambda p: plot_training_curves(epochs, p, title=title)}


__all__ = ["plot_training_curves", "training_plots"]
