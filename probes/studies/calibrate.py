"""``calibrate``: how well a probe's probabilities match its accuracy, before and after temperature scaling.

Skeleton steps: inputs (cells, probes with probabilities, seeds) -> per seed the uncapped split, its
training cells cut into a fit part and a validation part (:func:`probes.engine.proba_fits.held_out_splits`)
-> fits on the fit part (:func:`probes.engine.proba_fits.fit_probas`) -> per fit a temperature ``T`` fitted on
the validation part (minimum NLL, :func:`probes.calibration.fit_temperature`) and applied to the test
cells; ECE (equal-width and equal-mass bins), MCE, Brier and NLL on the test cells before and after, and
the labels' accuracy, macro and weighted P/R/F1 (a temperature changes no label) -> ``results``,
``summary``, ``reliability``, ``fits``, ``exclusions`` tables, a reliability diagram PNG (before |
after) per backbone x probe, a console table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.options import UNSET
from probes.calibration import N_BINS, calibration_metrics, ece, fit_temperature, nll, reliability, scale_temperature
from probes.engine.options import StudyOptions, study_options
from probes.engine.proba_fits import (
    VAL_FRACTION,
    base_row,
    class_codes,
    fit_probas,
    held_out_splits,
    pm,
    require_probabilities,
    score_rows,
    seed_summary,
    slug,
)
from probes.engine.runtime import study_runtime
from probes.engine.skeleton import Saves, check_probes, finish, fit_table, study_name
from probes.errors import ProbeError
from probes.features.cells import open_cells
from probes.reporting.console import Col, Panel
from probes.reporting.decision_plots import plot_reliability
from probes.reporting.tables import study_document
from probes.sampling import parse_seeds

CALIBRATION_METRICS = ("ece_width", "ece_mass", "mce_width", "mce_mass", "brier", "nll")
KEYS = ["backbone", "feature_key", "pool", "probe"]


@dataclass
class CalibrationResult(Saves):
    """Tidy results (one row per fit x stage x metric), their mean ± std, the reliability bins."""

    name: str
    params: dict[str, Any]
    results: pd.DataFrame  # stage: before / after (temperature) / labels (metrics no temperature changes)
    summary: pd.DataFrame  # mean / std over seeds per backbone x probe x stage x metric (x class)
    reliability: pd.DataFrame  # per fit x stage x binning x bin: n, confidence, accuracy, gap
    fits: pd.DataFrame
    exclusions: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def calibrate(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    probes: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 1,
    n_bins: int = N_BINS,
    val_fraction: float = VAL_FRACTION,
    make_probe: Callable[..., Any] | None = None,
    split: str | None = UNSET,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    quiet: bool = UNSET,
    options: StudyOptions | None = None,
    **more: Any,
) -> CalibrationResult:
    """ECE (equal-width and equal-mass, ``n_bins`` bins), MCE, Brier, NLL of each probe's test
    probabilities, before and after a temperature fitted on the validation part of the training cells.

    ``probes``: one probe or a comma list (default ``logistic``),
    each with ``predict_proba``. The probe is fitted on the training cells minus a stratified
    ``val_fraction`` validation part; the temperature sees only that part. Writes
    ``results.csv/.parquet``, ``summary.csv``, ``reliability.csv``, ``fits.csv``, ``exclusions.csv``,
    ``reliability-<backbone>-<probe>.png`` (test cells of every seed pooled) and ``study.json``.
    ``scheduler`` (``tcp://host:port`` or ``local:N``) runs each fit as a Dask task, with identical results;
    ``out_of_core`` / ``max_memory`` read features in store chunks when they exceed the budget
    (:mod:`probes.engine.runtime`).
    """
    opts, _ = study_options(options, more, split=split, dataset=dataset, pool=pool, out=out, device=device, quiet=quiet)
    opts.refuse(("train_domain", "test_domain"), "calibrate")
    split = opts.split_or("stratified")
    val = opts.val
    dataset = opts.dataset
    pool = opts.pool
    out = opts.out
    device = opts.device
    test_size = opts.test_size
    quiet = opts.quiet

    with study_runtime(**opts.runtime()):
        seed_list = parse_seeds(seeds)
        if int(n_bins) < 1:
            raise ProbeError(f"n_bins must be at least 1, got {n_bins}")
        cells = open_cells(store, model, dataset=dataset, pool=pool)
        probe_list = check_probes(probes)
        require_probabilities(probe_list, make_probe, what="calibration")
        name = study_name("calibrate", cells.backbones + probe_list, out)
        params: dict[str, Any] = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            probes=probe_list,
            seeds=seed_list,
            n_bins=int(n_bins),
            val_fraction=val_fraction,
            split=split,
            val=val,
            pool=cells.pool,
            device=device,
            test_size=test_size,
        )
        folder = opts.folder(name)
        held, notes, exclusions = held_out_splits(
            cells, seed_list, split=split, val=val, test_size=test_size, val_fraction=val_fraction
        )
        rows: list[dict] = []
        bins: list[pd.DataFrame] = []
        fit_rows: list[dict] = []
        pooled: dict[tuple[str, str], list] = {}
        for done in fit_probas(cells, held, probe_list, device=device, quiet=quiet, make_probe=make_probe):
            h = done.job.tag
            fit_rows.append(done.fit_row())
            base = base_row(name, cells, done, split)
            y_val, y_test = class_codes(cells.labels[h.val], h.classes), class_codes(cells.labels[h.test], h.classes)
            p_val, p_test = done.probas
            t = fit_temperature(p_val, y_val)
            stages = {"before": p_test, "after": scale_temperature(p_test, t)}
            for stage, p in stages.items():
                rows += [
                    {**base, "stage": stage, "metric": m, "class": "", "value": v}
                    for m, v in calibration_metrics(p, y_test, int(n_bins)).items()
                ]
                for binning in ("width", "mass"):
                    b = reliability(p, y_test, int(n_bins), binning)
                    bins.append(
                        b.assign(**{k: base[k] for k in ("backbone", "probe", "seed")}, stage=stage, binning=binning)
                    )
            rows.append({**base, "stage": "after", "metric": "temperature", "class": "", "value": t})
            rows.append(
                {
                    **base,
                    "stage": "after",
                    "metric": "val_nll",
                    "class": "",
                    "value": nll(scale_temperature(p_val, t), y_val),
                }
            )
            rows.append({**base, "stage": "before", "metric": "val_nll", "class": "", "value": nll(p_val, y_val)})
            rows += score_rows(base, cells.labels[h.test], done.predictions[1], h.classes, stage="labels")
            pooled.setdefault((done.job.backbone, done.job.probe), []).append((p_test, stages["after"], y_test, t))
        results = pd.DataFrame(rows)
        fits, fit_notes = fit_table(fit_rows)
        summary = seed_summary(results, [*KEYS, "stage"])
        rel = pd.concat(bins, ignore_index=True)[
            ["backbone", "probe", "seed", "stage", "binning", "bin", "lo", "hi", "n", "confidence", "accuracy", "gap"]
        ]
        res = CalibrationResult(name, params, results, summary, rel, fits, exclusions, notes + fit_notes, out=folder)
        finish(
            res,
            tables={
                "results.csv": results,
                "results.parquet": results,
                "summary.csv": summary,
                "reliability.csv": rel,
                "fits.csv": fits,
                "exclusions.csv": exclusions,
            },
            plots=reliability_plots(pooled, int(n_bins), cells.dataset),
            documents={"study.json": lambda names: study_document("calibrate", name, params, res.notes, names)},
            panels=panels(res),
            show=opts.printing(),
        )
        return res


def reliability_plots(pooled: dict, n_bins: int, dataset: str) -> dict[str, Callable[[Path], Any]]:
    """``reliability-<backbone>-<probe>.png``: test cells of every seed pooled, equal-width bins."""
    plots: dict[str, Callable[[Path], Any]] = {}
    for (backbone, probe), parts in pooled.items():
        before = np.concatenate([p[0] for p in parts])
        after = np.concatenate([p[1] for p in parts])
        y = np.concatenate([p[2] for p in parts])
        t = float(np.mean([p[3] for p in parts]))
        title = f"{dataset} · {backbone} · {probe} · test cells of {len(parts)} seed(s)"

        def draw(path: Path, before=before, after=after, y=y, t=t, title=title) -> Any:
            return plot_reliability(
                reliability(before, y, n_bins),
                reliability(after, y, n_bins),
                path,
                ece_before=ece(before, y, n_bins),
                ece_after=ece(after, y, n_bins),
                temperature=t,
                title=title,
            )

        plots[f"reliability-{slug(backbone)}-{slug(probe)}.png"] = draw
    return plots


def panels(res: CalibrationResult) -> list[Panel]:
    """Per backbone x probe, a row before and a row after temperature scaling: T, ECE, Brier, NLL, and the
    labels' accuracy, macro and weighted F1 (the same in both rows); MCE is in the tables."""
    s = res.summary[res.summary["class"] == ""]
    n_seeds = int(s["n_seeds"].max())
    shown = [
        ("ece_width", "ECE (width)"),
        ("ece_mass", "ECE (mass)"),
        ("brier", "Brier"),
        ("nll", "NLL"),
        ("accuracy", "acc"),
        ("macro_f1", "macro F1"),
        ("weighted_f1", "weighted F1"),
    ]
    cols = [Col("backbone", "left", no_wrap=True), Col("probe", "left", no_wrap=True), Col("", "left"), Col("T")]
    cols += [Col(lab) for _, lab in shown]
    rows = []
    for (b, p), g in s.groupby(["backbone", "probe"], sort=False):
        v = {(r.stage, r.metric): (r.mean, r.std) for r in g.itertuples()}
        for stage in ("before", "after"):
            t = pm(*v[("after", "temperature")], n_seeds, 2) if stage == "after" else "1"
            vals = [pm(*v.get((stage, m), v.get(("labels", m), (float("nan"), 0.0))), n_seeds) for m, _ in shown]
            rows.append([b, p, stage, t, *vals])
    title = (
        f"{res.name}: test cells, temperature fitted on the validation part "
        f"({res.params['val_fraction']:.0%} of the training cells), {res.params['n_bins']} bins"
        + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else "")
    )
    return [Panel(title, cols, rows, footer=["a temperature changes no label: accuracy and F1 hold before and after"])]
