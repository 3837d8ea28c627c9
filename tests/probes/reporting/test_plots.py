"""The study plots say what they show and keep their legends off the data (issue 28: the scaling legend covered
the fine-tunes' points, the calibration legend its bars, the confusion PNGs summed counts over seeds unsaid)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from probes.reporting import decision_plots, plots


@pytest.fixture
def drawn(monkeypatch):
    """Each plot's figure, drawn, before it is written and freed."""
    figures: list = []
    real_save = plots.save

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        fig.kept_renderer = fig.canvas.get_renderer()  # the Agg canvas goes when the figure is freed
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    monkeypatch.setattr(decision_plots, "save", keep)
    return figures


def _box(artist, fig):
    return artist.get_window_extent(fig.kept_renderer)


def test_scaling_legend_sits_beside_the_axes_not_over_any_point(drawn, tmp_path):
    rows = []
    for probe, values in {"logistic": [0.3, 0.5, 0.7], "lp": [0.2, 0.45, 0.66], "ft-last": [0.25, 0.5, 0.72]}.items():
        for limit, v in zip([4, 8, 16], values):
            rows.append(dict(metric="macro_f1", limit=limit, backbone="lite0", probe=probe, test_domain="", mean=v,
                             std=0.02, exceeds_data=False, n_seeds=3))  # fmt: skip
    curves = pd.DataFrame(rows).assign(**{"class": ""})
    assert plots.plot_scaling(curves, tmp_path / "s.png", title="t").stat().st_size > 0
    (fig,) = drawn
    ax = fig.axes[0]
    assert _box(ax.get_legend(), fig).x0 >= _box(ax, fig).x1  # entirely right of the plotting area
    assert len(ax.get_legend().get_texts()) == 3


def test_reliability_legend_sits_below_both_panels(drawn, tmp_path):
    lo = np.linspace(0, 0.9, 10)
    bins = pd.DataFrame({"lo": lo, "hi": lo + 0.1, "accuracy": lo + 0.05, "confidence": lo + 0.09})
    decision_plots.plot_reliability(bins, bins, tmp_path / "r.png", ece_before=0.1, ece_after=0.02, temperature=1.3)
    (fig,) = drawn
    (legend,) = fig.legends
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert _box(legend, fig).y1 <= min(_box(ax, fig).y0 for ax in fig.axes)  # under the bars, not over them


def test_confusion_is_row_normalised_and_says_n_and_how_many_fits(drawn, tmp_path):
    conf = pd.DataFrame(
        [
            (seed, t, p, c)
            for seed in (42, 43)
            for t, p, c in [("a", "a", 8), ("a", "b", 2), ("b", "b", 5), ("b", "c", 0)]
        ],
        columns=["seed", "true", "pred", "count"],
    )
    plots.plot_confusion(conf, tmp_path / "c.png", title="lite0 · knn")
    (fig,) = drawn
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (n=10)", "b (n=5)"]  # per fit, not 20 and 10
    assert sorted(t.get_text() for t in ax.texts) == [".20", ".80", "1"]  # fractions of the true class
    assert "2 seeds' fits pooled" in fig.get_suptitle() and [t.get_text() for t in ax.get_xticklabels()] == list("abc")
