"""Plots of the decision studies (``ensemble``, ``calibrate``, ``selective``) in the one plot style of
:mod:`.plots` (:func:`.plots.pyplot`, :func:`.plots.palette`, :func:`.plots.save`, :data:`.plots.DPI`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from probes.reporting.plots import DPI, palette, pyplot, save


def plot_specialisation(table: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Mean per-class F1 (rows: classes, columns: heads then ensembles); each class's best head boxed."""
    plt = pyplot()
    methods = list(dict.fromkeys(table["method"]))
    classes = list(dict.fromkeys(table["class"]))
    m = table.pivot_table(index="class", columns="method", values="mean", sort=False).reindex(
        index=classes, columns=methods
    )
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(methods) + 2.5), max(3.5, 0.38 * len(classes) + 1.5)), dpi=DPI)
    im = ax.imshow(m.to_numpy(float), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    best = table[table["best_head"]]
    for i, c in enumerate(classes):
        for j in range(len(methods)):
            v = m.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        for meth in best.loc[best["class"] == c, "method"]:
            j = methods.index(meth)
            ax.add_patch(plt.Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor="red", lw=1.8))
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_title(title + "\nper-class F1 (mean over seeds); red box = best head for the class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="F1")
    return save(fig, path)


def _reliability_panel(ax, bins: pd.DataFrame, name: str, ece: float, color) -> None:
    width = (bins["hi"] - bins["lo"]).to_numpy(float)
    ax.bar(
        bins["lo"],
        bins["accuracy"],
        width=width,
        align="edge",
        color=color,
        alpha=0.75,
        edgecolor="black",
        lw=0.5,
        label="accuracy",
    )
    low = np.minimum(bins["accuracy"], bins["confidence"])
    ax.bar(
        bins["lo"],
        (bins["confidence"] - bins["accuracy"]).abs(),
        bottom=low,
        width=width,
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="red",
        lw=0.8,
        label="gap: |accuracy − mean confidence|",
    )
    ax.plot([0, 1], [0, 1], "--", color="0.3", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_title(f"{name}: ECE {ece:.3f}", fontsize=9)
    ax.grid(True, alpha=0.3)


def plot_reliability(
    before: pd.DataFrame,
    after: pd.DataFrame,
    path: Path,
    *,
    ece_before: float,
    ece_after: float,
    temperature: float,
    title: str = "",
) -> Path:
    """Reliability diagrams side by side: before and after temperature scaling (equal-width bins)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.3), dpi=DPI, sharey=True)
    colors = palette()
    _reliability_panel(axes[0], before, "before", ece_before, colors(0))
    _reliability_panel(axes[1], after, f"after (T = {temperature:.3g})", ece_after, colors(2))
    axes[0].set_ylabel("accuracy")
    handles, names = axes[1].get_legend_handles_labels()
    # below both panels, never over a bar
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


def plot_risk_coverage(
    grid: pd.DataFrame,
    path: Path,
    *,
    chosen: pd.DataFrame | None = None,
    target_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """Risk against coverage (mean over seeds, ± std band), one panel per backbone x probe, one line per
    confidence; a marker at the test coverage the validation threshold keeps."""
    plt = pyplot()
    groups = list(dict.fromkeys(zip(grid["backbone"], grid["probe"])))
    fig, axes = plt.subplots(
        1, len(groups), figsize=(max(7.0, 5.4 * len(groups)), 4.6), dpi=DPI, squeeze=False, sharey=True
    )
    colors = palette()
    confs: Sequence[str] = list(dict.fromkeys(grid["confidence"]))
    for ax, (b, p) in zip(axes[0], groups):
        g = grid[(grid["backbone"] == b) & (grid["probe"] == p)]
        for k, conf in enumerate(confs):
            c = g[g["confidence"] == conf].sort_values("coverage")
            if not len(c):
                continue
            x, y, s = c["coverage"].to_numpy(float), c["mean"].to_numpy(float), c["std"].to_numpy(float)
            ax.plot(x, y, "-", color=colors(k % 10), lw=1.6, label=conf)
            ax.fill_between(x, y - s, y + s, color=colors(k % 10), alpha=0.15, lw=0)
            if chosen is not None and len(chosen):
                r = chosen[(chosen["backbone"] == b) & (chosen["probe"] == p) & (chosen["confidence"] == conf)]
                if len(r) and r["test_coverage_mean"].iat[0] > 0:
                    ax.plot(
                        [r["test_coverage_mean"].iat[0]],
                        [1 - r["test_accuracy_mean"].iat[0]],
                        marker="*",
                        ms=12,
                        color=colors(k % 10),
                        markeredgecolor="black",
                        markeredgewidth=0.6,
                        ls="none",
                    )
        if target_accuracy is not None:
            ax.axhline(1 - target_accuracy, color="0.4", ls=":", lw=1, label=f"target risk {1 - target_accuracy:.3g}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("coverage (fraction of test cells kept)")
        ax.set_title(f"{b} · {p}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("risk (error rate of the kept cells)")
    axes[0][-1].legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.suptitle(
        title + ("\n★ = test coverage and risk at the threshold chosen on validation" if chosen is not None else ""),
        fontsize=9,
    )
    return save(fig, path)
