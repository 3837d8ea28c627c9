"""The one plot style of the studies: matplotlib (Agg), tab10 colours, light grid, 120 dpi PNG.

Every study figure is drawn by a function here through :func:`pyplot`, :func:`palette` and
:func:`save`, so a new study's plots look like the others'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probes.metrics import MAIN_METRIC

DPI = 120
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def palette() -> Any:
    """The colour map of every study plot: colour ``k`` is ``palette()(k % 10)``."""
    return pyplot().get_cmap("tab10")


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write the PNG (a legend placed outside the axes included) and free the figure."""
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


def plot_scaling(
    curves: pd.DataFrame, path: Path, summary: pd.DataFrame | None = None, *, metric: str = MAIN_METRIC, title: str = ""
) -> Path:
    """Mean ``metric`` against cells per class (log2 x), one line per backbone x probe, ± std band."""
    plt = pyplot()

    main = curves[(curves["metric"] == metric) & (curves["class"] == "")].sort_values("limit")
    probes = list(dict.fromkeys(main["probe"]))
    colors = palette()
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=DPI)
    for k, ((b, p, dom), c) in enumerate(main.groupby(["backbone", "probe", "test_domain"], sort=False)):
        j = probes.index(p)  # colour per curve, line style and marker per probe
        x, y, s = c["limit"].to_numpy(float), c["mean"].to_numpy(float), c["std"].to_numpy(float)
        color = colors(k % 10)
        label = f"{b} · {p}" + (f" · on {dom}" if dom else "")
        ax.plot(x, y, styles[j % 4], marker=markers[j % 7], color=color, lw=1.8, ms=5, label=label)
        ax.fill_between(x, y - s, y + s, color=color, alpha=0.15, lw=0)
        if summary is not None and len(summary):
            r = summary[(summary["backbone"] == b) & (summary["probe"] == p) & (summary["test_domain"] == dom)]
            if len(r):
                lim = r["limit_reaching"].iat[0]
                ax.plot(
                    [lim],
                    [r["mean_at_limit_reaching"].iat[0]],
                    marker="*",
                    ms=13,
                    color=color,
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    ls="none",
                    zorder=5,
                )
    limits = sorted(main["limit"].dropna().astype(int).unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(limits)
    ax.set_xticklabels([str(v) for v in limits])
    ax.minorticks_off()
    over = main.loc[main["exceeds_data"], "limit"]
    if len(over):
        ax.axvspan(
            float(over.min()) / 2**0.25,
            max(limits) * 2**0.25,
            color="0.85",
            alpha=0.5,
            lw=0,
            label="limit ≥ largest class (full data)",
        )
    n_seeds = int(main["n_seeds"].max()) if len(main) else 0
    ax.set_xlabel("cells per class (FlagLimit)")
    ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)}  (mean ± std, {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    ax.set_title(
        title + ("   ★ = smallest limit reaching 95% of the curve's best" if summary is not None else ""), fontsize=9
    )
    ax.grid(True, alpha=0.3)
    # beside the axes, never over a curve or a fine-tune's point (the PNG grows to hold it)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, framealpha=0.9)
    return save(fig, path)


def plot_confusion(conf: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Confusion matrix normalised per true class: each cell the fraction of that class's test cells, pooled
    over the seeds' fits; each row's label says n (its test cells per fit) and the title how many fits."""
    plt = pyplot()

    labels = list(dict.fromkeys(conf["true"]))
    predicted = list(dict.fromkeys(conf["pred"]))  # every training class: a test domain may lack some
    m = conf.groupby(["true", "pred"])["count"].sum().unstack().reindex(index=labels, columns=predicted).fillna(0)
    counts = m.to_numpy()
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n_fits = int(conf["seed"].nunique()) if "seed" in conf.columns else 1
    per_fit = counts.sum(axis=1) / n_fits
    k, kc = len(labels), len(predicted)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * kc + 2.8), max(3.5, 0.45 * k + 1.5)), dpi=DPI)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if max(k, kc) <= 25:
        for i in range(k):
            for j in range(kc):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}".lstrip("0") if norm[i, j] < 1 else "1",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xticks(range(kc), predicted, rotation=90, fontsize=8)
    ax.set_yticks(range(k), [f"{lab} (n={v:.0f})" if v == int(v) else f"{lab} (n={v:.1f})" for lab, v in
                             zip(labels, per_fit)], fontsize=8)  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (n: test cells per fit)")
    pooled = f"{n_fits} seeds' fits pooled" if n_fits > 1 else "one fit"
    what = f"fraction of each true class ({pooled})"
    fig.suptitle(f"{title}\n{what}" if title else what, fontsize=9)  # over the colour bar too, never under it
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return save(fig, path)


def plot_robustness(summary: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Macro-F1 against σ (x at log2(1 + σ)), one panel per perturbation side by side, ± std band."""
    plt = pyplot()

    fams = list(dict.fromkeys(summary["perturbation"]))
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), dpi=DPI, sharey=True, squeeze=False)
    colors = palette()
    curves = list(dict.fromkeys(zip(summary["backbone"], summary["probe"])))
    for ax, fam in zip(axes[0], fams):
        d = summary[summary["perturbation"] == fam]
        for k, (b, p) in enumerate(curves):
            c = d[(d["backbone"] == b) & (d["probe"] == p)].sort_values("sigma")
            x = np.log2(1 + c["sigma"].to_numpy(float))
            y, s = c["macro_f1"].to_numpy(float), c["macro_f1_std"].to_numpy(float)
            ax.plot(x, y, "-o", color=colors(k % 10), ms=4, lw=1.6, label=f"{b} · {p}")
            ax.fill_between(x, y - s, y + s, color=colors(k % 10), alpha=0.15, lw=0)
        sig = sorted(d["sigma"].unique())
        ax.set_xticks(np.log2(1 + np.asarray(sig)), [f"{v:g}" for v in sig])
        ax.set_xlabel("σ (axis: log2(1 + σ))")
        ax.set_title(fam, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("macro-F1 (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
