"""``scale``: macro-F1 (and the rest) against cells per class (FlagLimit curves), per backbone x probe.

Skeleton steps: inputs (cells, probes, seeds, limits) -> splits at every limit and seed (same cells
for every backbone) -> fits (:func:`probes.engine.split_fits.fit_splits`) -> tidy results, curves over seeds
and the smallest limit reaching a fraction of each curve's best -> ``results``, ``curves``,
``summary``, ``exclusions``, ``confusion``, ``fits`` (+ ``domains``) tables, ``scaling.png``, a console table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from embedcache.options import UNSET
from probes.domains import DomainPlan, domain_gaps, domain_panels
from probes.engine.options import StudyOptions, study_options
from probes.engine.runtime import study_runtime
from probes.engine.skeleton import check_probes, finish, study_name
from probes.engine.split_fits import (
    CURVE_KEYS,
    StudyResult,
    common_tables,
    confusion_matrices,
    fit_splits,
    over_seeds,
    study_compare_panel,
)
from probes.features.cells import open_cells
from probes.metrics import MAIN_METRIC
from probes.reporting.console import Bold, Col, Panel, mean_std
from probes.reporting.plots import plot_scaling
from probes.reporting.tables import study_document
from probes.reporting.training import training_plots
from probes.sampling import limits_note, parse_limits, parse_seeds
from probes.tuning.options import TuneOptions, token_need


def scale(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    limits: str | int | Sequence[int] = "256..16384",
    probes: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 5,
    fraction: float = 0.95,
    split: str | None = UNSET,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    quiet: bool = UNSET,
    options: StudyOptions | None = None,
    tune: TuneOptions | None = None,
    **more: Any,
) -> StudyResult:
    """Macro-F1 (and the rest) against cells per class, for each backbone x probe.

    ``limits``: ``"256..16384"`` (powers of two), a comma list or integers. ``seeds``: a count
    N (seeds 42..42+N-1) or explicit seeds. ``split``: ``stratified`` (the protocol),
    ``column`` or ``group`` (see :mod:`probes.sampling`). Writes ``results.csv/.parquet``,
    ``curves.csv``, ``summary.csv`` (smallest limit reaching ``fraction`` of each curve's best
    mean), ``exclusions.csv``, ``confusion.csv/.json``, ``fits.csv``, ``scaling.png`` and ``study.json``
    to ``out`` when it is given (the CLI: ``scale-<models>-<date>`` by default), else nothing until
    ``result.save(out)``. ``show`` prints the summary (the CLI always does); ``quiet`` hides the progress bar.
    Fine-tune probes (``lp``, ``ft-last``, ``lora``, ``scratch-vit``; :mod:`probes.tuning.study_inputs`)
    sit beside the others in every table: ``tail_blocks`` K trains the last K blocks on the tokens cached by
    ``embedcache extract --tail-blocks K``; ``head`` (``linear``, ``linear-cls-mean``, ``mlp``, ``decoder``),
    ``loss`` (``ce``, ``focal``, ``weighted-ce``, ``weighted-focal``, ``hierarchical-focal`` with ``gamma`` and a
    ``hierarchy`` YAML), ``epochs``, ``batch_size``, ``lr`` / ``weight_decay`` (None: the method's), ``val_fraction``
    (hold-out choosing the best epoch), ``patience`` (early stopping), ``lora_rank`` / ``lora_alpha`` /
    ``lora_dropout``. Their per-epoch loss and hold-out macro-F1 go to ``epochs.csv`` and ``training_curves.png``.
    ``scheduler`` (``tcp://host:port`` or ``local:N``) runs each fit as a Dask task, with identical results;
    ``out_of_core`` / ``max_memory`` read features in store chunks when they exceed the budget
    (:mod:`probes.engine.runtime`).
    """
    opts, tune = study_options(
        options,
        more,
        tune=tune,
        tune_class=TuneOptions,
        split=split,
        dataset=dataset,
        pool=pool,
        out=out,
        device=device,
        quiet=quiet,
    )
    split = opts.split_or("stratified")
    val = opts.val
    dataset = opts.dataset
    pool = opts.pool
    out = opts.out
    device = opts.device
    test_size = opts.test_size
    train_domain = opts.train_domain
    test_domain = opts.test_domain
    quiet = opts.quiet

    with study_runtime(**opts.runtime()):
        limit_list = parse_limits(limits)
        seed_list = parse_seeds(seeds)
        cells = open_cells(store, model, dataset=dataset, pool=pool, needs=token_need(probes, tune))
        probe_list = check_probes(probes)
        name = study_name("scale", cells.backbones, out)
        params: dict[str, Any] = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            limits=limit_list,
            probes=probe_list,
            seeds=seed_list,
            split=split,
            val=val,
            pool=cells.pool,
            device=device,
            test_size=test_size,
            fraction=fraction,
        )
        from probes.tuning.study_inputs import study_inputs

        inputs, tune_params = study_inputs(cells, probe_list, device, tune)
        params.update(tune_params)
        plan = DomainPlan.make(cells, train_domain, test_domain)
        if plan is not None:
            params.update(train_domain=plan.train, test_domain=plan.test)
        folder = opts.folder(name)
        fits = fit_splits(
            name,
            cells,
            limit_list,
            seed_list,
            probe_list,
            split=split,
            val=val,
            test_size=test_size,
            device=device,
            quiet=quiet,
            plan=plan,
            inputs=inputs,
        )
        curves = over_seeds(fits.results, fits.replicates)
        res = StudyResult.of_fits(
            "scale",
            name,
            params,
            fits,
            curves,
            limit_reaching(curves, fraction),
            domains=domain_gaps(curves) if plan is not None else None,
            out=folder,
            notes=[n for n in [limits_note(limits, limit_list)] if n],
        )
        title = f"{params['dataset']} · {params['split']} split"
        finish(
            res,
            tables=common_tables(res),
            plots={
                "scaling.png": lambda p: plot_scaling(res.curves, p, res.summary, title=title),
                **training_plots(res.epochs, title),
            },
            documents={
                "confusion.json": confusion_matrices(res.confusion),
                "study.json": lambda names: study_document("scale", name, params, res.notes, names),
            },
            panels=panels(res),
            lines=footnotes(res),
            show=opts.printing(),
        )
        return res


def limit_reaching(curves: pd.DataFrame, fraction: float = 0.95, metric: str = MAIN_METRIC) -> pd.DataFrame:
    """Per curve: its best mean score and the smallest limit whose mean reaches ``fraction`` of it, each with
    its 95% interval over test cells (``best_low`` / ``best_high``, ``low_at_`` / ``high_at_limit_reaching``)."""
    rows = []
    main = curves[(curves["metric"] == metric) & (curves["class"] == "")]
    for key, c in main.groupby(CURVE_KEYS, sort=False):
        c = c.sort_values("limit")
        best = c.loc[c["mean"].idxmax()]
        reach = c[c["mean"] >= fraction * best["mean"]].iloc[0]
        rows.append(
            {
                **dict(zip(CURVE_KEYS, key)),
                "metric": metric,
                "best_limit": int(best["limit"]),
                "best_mean": best["mean"],
                "best_std": best["std"],
                "best_low": best["low"],
                "best_high": best["high"],
                "fraction": fraction,
                "threshold": fraction * best["mean"],
                "limit_reaching": int(reach["limit"]),
                "mean_at_limit_reaching": reach["mean"],
                "std_at_limit_reaching": reach["std"],
                "low_at_limit_reaching": reach["low"],
                "high_at_limit_reaching": reach["high"],
                "n_seeds": int(c["n_seeds"].max()),
            }
        )
    return pd.DataFrame(rows)


def panels(res: StudyResult) -> list[Panel]:
    """The printed summary: mean ± std per limit (best in bold, the fraction's limit last), domain gaps."""
    c = res.curves
    main = c[(c["metric"] == MAIN_METRIC) & (c["class"] == "")]
    limits = sorted(main["limit"].astype(int).unique())
    over = set(main.loc[main["exceeds_data"], "limit"].astype(int))
    p = res.params
    domains = bool((main["test_domain"] != "").any())
    cols = [Col("backbone", "left", no_wrap=True), Col("probe", "left", no_wrap=True)]
    cols += [Col("tested on", "left", no_wrap=True)] if domains else []
    cols += [Col(f"{lim}{'*' if lim in over else ''}") for lim in limits]
    cols += [Col("best [95% CI]"), Col(f"{p.get('fraction', 0.95):.0%} at", style="bold")]
    n_seeds = int(main["n_seeds"].max())
    rows = []
    for (b, pr, dom), g in main.groupby(["backbone", "probe", "test_domain"], sort=False):
        by = {int(r.limit): r for r in g.itertuples()}
        s = res.summary[
            (res.summary["backbone"] == b) & (res.summary["probe"] == pr) & (res.summary["test_domain"] == dom)
        ]
        best = int(s["best_limit"].iat[0]) if len(s) else None
        cells: list[Any] = []
        for lim in limits:
            r = by.get(lim)
            txt = "-" if r is None else mean_std(r.mean, r.std, n_seeds)
            cells.append(Bold(txt) if lim == best else txt)
        where = [f"{dom} ({'in' if g['in_domain'].iat[0] else 'out of'} domain)"] if domains else []
        ci = f"[{s['best_low'].iat[0]:.3f}, {s['best_high'].iat[0]:.3f}]" if len(s) else "-"
        rows.append([b, pr, *where, *cells, ci, str(int(s["limit_reaching"].iat[0])) if len(s) else "-"])
    title = (
        f"{res.name}: macro-F1"
        + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ", one seed")
        + f", {p['split']} split, "
        f"{p['dataset']} ({p['pool']})"
    )
    return [Panel(title, cols, rows), *domain_panels(res.domains), *study_compare_panel(res.compare)]


def footnotes(res: StudyResult) -> list[str]:
    main = res.curves[(res.curves["metric"] == MAIN_METRIC) & (res.curves["class"] == "")]
    if main["exceeds_data"].any():
        return ["* limit ≥ the largest class: the set is the full data (not capped)"]
    return []
