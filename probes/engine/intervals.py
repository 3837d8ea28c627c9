"""95% intervals over test cells and paired comparisons for a study's tables.

A study records, per test set, every fit's predictions on those cells (:class:`TestedCells`) and the
result rows it wrote for them; :func:`attach_intervals` bootstraps each test set once
(:func:`probes.stats.bootstrap_group`: 2,000 stratified resamples, percentile intervals, seeded by the
split's seed), writes ``low`` / ``high`` into the rows of the aggregate metrics, and returns the paired
comparisons of the fits on the same cells (``compare.csv``) and each fit's resampled scores, from which
:func:`seed_mean_interval` gives the interval of a mean over seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from probes.reporting.console import Bold, Col, Panel, mean_std

INTERVAL_METRICS = ("macro_f1", "accuracy", "weighted_f1")  # probes.stats.METRIC_NAMES
N_RESAMPLES = 2000
LEVEL = 0.95


@dataclass
class TestedCells:
    """The fits scored on one test set: its true labels and classes, each fit's predictions and result rows."""

    truth: np.ndarray
    classes: Sequence[str]
    fits: dict[tuple, tuple[np.ndarray, range]] = field(default_factory=dict)

    def add(self, fit: tuple, pred: np.ndarray, result_rows: range) -> None:
        """``fit``: the values of the study's fit columns; ``result_rows``: the rows written for it."""
        self.fits[fit] = (np.asarray(pred), result_rows)


@dataclass
class Intervals:
    """What :func:`attach_intervals` returns."""

    compare: pd.DataFrame  # group columns, n_test, <fit column>_a, <fit column>_b, probes.stats.COMPARE_COLUMNS
    replicates: dict[tuple, list[np.ndarray]]  # (fit..., group without seed..., metric) -> (B,) per seed


def attach_intervals(
    rows: list[dict],
    tested: dict[tuple, TestedCells],
    *,
    fit_columns: Sequence[str],
    group_columns: Sequence[str],
    pair: Callable[[tuple, tuple], bool] | None = None,
) -> Intervals:
    """Bootstrap every test set once: ``low`` / ``high`` into ``rows``, the paired comparisons, the replicates.

    ``tested`` maps the values of ``group_columns`` (one of them ``seed``, which seeds the bootstrap) to
    the fits scored on those cells; ``pair(a, b)`` keeps only some pairs of fits (default: every pair),
    Holm's correction then runs over the kept pairs of each test set.
    """
    from probes.stats import COMPARE_COLUMNS, bootstrap_group, holm

    tables: list[pd.DataFrame] = []
    replicates: dict[tuple, list[np.ndarray]] = {}
    seed_at = list(group_columns).index("seed")
    for group_key, group in tested.items():
        keys = list(group.fits)
        names = [" · ".join(map(str, k)) for k in keys]
        boot = bootstrap_group(
            group.truth,
            {name: group.fits[k][0] for name, k in zip(names, keys)},
            group.classes,
            n_resamples=N_RESAMPLES,
            seed=int(group_key[seed_at]),
            level=LEVEL,
            others="wrong",
        )
        rest = tuple(v for i, v in enumerate(group_key) if i != seed_at)
        for name, key in zip(names, keys):
            for row in (rows[j] for j in group.fits[key][1]):
                if row["metric"] in INTERVAL_METRICS and row.get("class", "") == "":
                    interval = boot.intervals[name][row["metric"]]
                    row["low"], row["high"] = interval.low, interval.high
            for metric in INTERVAL_METRICS:
                replicates.setdefault((*key, *rest, metric), []).append(boot.replicates[name][metric])
        if boot.comparisons is None:
            continue
        table = boot.comparisons
        index = dict(zip(names, keys))
        pairs = [(index[a], index[b]) for a, b in zip(table["a"], table["b"])]
        kept = np.array([pair is None or pair(a, b) for a, b in pairs], dtype=bool)
        if not kept.any():
            continue
        table = table[kept].reset_index(drop=True)
        pairs = [p for p, k in zip(pairs, kept) if k]
        table["p_bootstrap_holm"] = holm(table["p_bootstrap"].to_numpy())
        table["p_mcnemar_holm"] = holm(table["p_mcnemar"].to_numpy())
        front = {c: [v] * len(table) for c, v in zip(group_columns, group_key)}
        front["n_test"] = [len(group.truth)] * len(table)
        for side, at in (("a", 0), ("b", 1)):
            for i, c in enumerate(fit_columns):
                front[f"{c}_{side}"] = [p[at][i] for p in pairs]
        tables.append(pd.concat([pd.DataFrame(front), table.drop(columns=["a", "b"])], axis=1))
    columns = [*group_columns, "n_test", *(f"{c}_{s}" for s in "ab" for c in fit_columns)]
    columns += [c for c in COMPARE_COLUMNS if c not in ("a", "b")]
    compare = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    return Intervals(compare[columns], replicates)


def seed_mean_interval(replicates: dict[tuple, list[np.ndarray]], key: tuple) -> tuple[float, float]:
    """The interval of the mean over seeds of the fit ``key`` ((fit..., group without seed..., metric));
    NaN when it has no replicates (a per-class row, a metric without intervals)."""
    from probes.stats import interval_of_mean

    reps = replicates.get(key)
    return interval_of_mean(reps, LEVEL) if reps else (np.nan, np.nan)


def interval_text(mean: float, std: float, low: float, high: float, n_seeds: int) -> str:
    """``0.812 [0.790, 0.833]`` (with ``±std`` over seeds when there are several; no interval when NaN)."""
    text = mean_std(mean, std, n_seeds)
    return text if np.isnan(low) or np.isnan(mean) else f"{text} [{low:.3f}, {high:.3f}]"


def compare_panel(
    compare: pd.DataFrame | None, fit_columns: Sequence[str], where: str = "", top: int = 15
) -> list[Panel]:
    """The printed paired comparisons of ``compare`` (already chosen: one test set or a few)."""
    if compare is None or compare.empty:
        return []
    title = (
        f"paired comparisons on the same test cells{f' ({where})' if where else ''}: macro-F1 of b - a with its "
        "95% paired-bootstrap interval; McNemar on accuracy; p Holm-corrected"
    )
    cols = [Col("a", "left", no_wrap=True), Col("b", "left", no_wrap=True)]
    cols += [Col("b - a"), Col("95% CI"), Col("p boot"), Col("a only / b only right"), Col("p McNemar")]
    rows: list[list[Any]] = []
    for r in compare.head(top).to_dict("records"):
        text = f"{r['diff']:+.3f}"
        rows.append(
            [
                " · ".join(str(r[f"{c}_a"]) for c in fit_columns),
                " · ".join(str(r[f"{c}_b"]) for c in fit_columns),
                Bold(text) if r["p_bootstrap_holm"] < 0.05 else text,
                f"[{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]",
                f"{r['p_bootstrap_holm']:.3g}",
                f"{r['mcnemar_b']} / {r['mcnemar_c']}",
                f"{r['p_mcnemar_holm']:.3g}",
            ]
        )
    footer = [f"... {len(compare) - top} more pairs in compare.csv"] if len(compare) > top else []
    return [Panel(title, cols, rows, footer)]
