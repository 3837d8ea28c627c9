"""``evaluate``: one fit per backbone x probe x seed on the full training split (no cap, no FlagMin).

Skeleton steps: inputs -> the uncapped split per seed -> fits (:func:`probes.engine.split_fits.fit_splits`)
-> tidy results and the mean ± std of every metric -> the same tables as ``scale`` (``limit`` empty),
a confusion-matrix PNG per backbone x probe (x test domain), a console table with per-class F1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from embedcache.options import UNSET
from probes.domains import DomainPlan, domain_gaps, domain_panels
from probes.engine.intervals import interval_text
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
from probes.metrics import CLASS_METRIC
from probes.reporting.console import Col, Panel
from probes.reporting.plots import plot_confusion
from probes.reporting.tables import study_document
from probes.reporting.training import training_plots
from probes.sampling import parse_seeds
from probes.tuning.options import TuneOptions, token_need

PRINTED = [("accuracy", "acc"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")]  # the rest: summary.csv


def evaluate(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    probes: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 1,
    save_adapter: str | os.PathLike | None = None,
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
    """One fit per backbone x probe x seed on the full training split (no cap, no FlagMin).

    ``probes``: one probe or a comma list (default ``logistic``).
    Same splits and outputs as :func:`probes.scale` (``limit`` is empty), plus a confusion-matrix
    PNG per backbone x probe; default ``out`` is ``eval-<models>-<probe>-<date>``.
    ``train_domain`` / ``test_domain``: as in :func:`probes.scale`. ``save_adapter`` DIR: write each fitted
    ``lp`` / ``ft-last`` / ``lora`` (adapter or unfrozen blocks and head, safetensors, with provenance: base
    backbone, weights sha256, method, data digest) to DIR, or to DIR/<backbone>-<probe>-seed<seed> when
    there are several fits; ``embedcache extract --adapter DIR`` embeds with it.
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
        seed_list = parse_seeds(seeds)
        cells = open_cells(store, model, dataset=dataset, pool=pool, needs=token_need(probes, tune))
        probe_list = check_probes(probes)
        name = study_name("eval", cells.backbones + probe_list, out)
        params: dict[str, Any] = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            probe=probe_list,
            seeds=seed_list,
            split=split,
            val=val,
            pool=cells.pool,
            device=device,
            test_size=test_size,
        )
        from probes.tuning.study_inputs import study_inputs

        inputs, tune_params = study_inputs(cells, probe_list, device, tune)
        params.update(tune_params)
        plan = DomainPlan.make(cells, train_domain, test_domain)
        if plan is not None:
            params.update(train_domain=plan.train, test_domain=plan.test)
        folder = opts.folder(name)
        from probes.tuning.saving import AdapterKeeper  # torch: imported when fitting

        keeper = AdapterKeeper(save_adapter, probe_list) if save_adapter is not None else None
        fits = fit_splits(
            name,
            cells,
            [None],
            seed_list,
            probe_list,
            split=split,
            val=val,
            test_size=test_size,
            device=device,
            quiet=quiet,
            plan=plan,
            inputs=inputs,
            make_probe=keeper,
        )
        curves = over_seeds(fits.results, fits.replicates)
        res = StudyResult.of_fits(
            "evaluate",
            name,
            params,
            fits,
            curves,
            eval_summary(curves),
            domains=domain_gaps(curves) if plan is not None else None,
            out=folder,
        )
        if keeper is not None:
            res.notes.extend(keeper.save())
        plots = {**confusion_plots(res.confusion), **training_plots(res.epochs)}
        finish(
            res,
            tables=common_tables(res),
            plots=plots,
            documents={
                "confusion.json": confusion_matrices(res.confusion),
                "study.json": lambda names: study_document("evaluate", name, params, res.notes, names),
            },
            panels=panels(res),
            show=opts.printing(),
        )
        return res


def eval_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per backbone x probe: mean, std over seeds and 95% interval over test cells of every aggregate
    metric (``<metric>_low`` / ``_high``: macro-F1, accuracy and weighted F1)."""
    main = curves[curves["class"] == ""]
    wide = main.pivot_table(
        index=CURVE_KEYS, columns="metric", values=["mean", "std", "low", "high"], sort=False, dropna=False
    )
    wide.columns = [f"{m}_{stat}" for stat, m in wide.columns]
    wide = wide[[c for c in wide.columns if not (c.endswith(("_low", "_high")) and wide[c].isna().all())]]
    extra = main.groupby(CURVE_KEYS, sort=False)[["n_seeds", "n_train", "n_test", "n_classes", "seconds"]].first()
    return wide.join(extra).reset_index()


def confusion_plots(confusion: pd.DataFrame) -> dict[str, Callable[[Any], Any]]:
    """``confusion-<backbone>-<probe>[-<domain>].png`` per fit group (summed over seeds)."""
    plots: dict[str, Callable[[Any], Any]] = {}
    for (backbone, probe, dom), conf in confusion.groupby(["backbone", "probe", "test_domain"], sort=False):
        name = f"confusion-{_slug(backbone)}-{_slug(probe)}{'-' + _slug(dom) if dom else ''}.png"
        title = f"{backbone} · {probe}" + (f" · tested on {dom}" if dom else "")
        plots[name] = partial(plot_confusion, conf, title=title)
    return plots


def panels(res: StudyResult) -> list[Panel]:
    """Every aggregate metric per backbone x probe, the domain gaps, per-class F1."""
    s = res.summary
    n_seeds = int(s["n_seeds"].max())
    domains = bool((s["test_domain"] != "").any())
    title = (
        f"{res.name}: one fit on the full training split, {res.params['split']} split, "
        f"{res.params['dataset']} ({res.params['pool']})"
        + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else "")
        + ", [95% interval over test cells]"
    )
    cols = [Col("backbone", "left", no_wrap=True), Col("probe", "left", no_wrap=True)]
    cols += [Col(c) for c in (*(["tested on"] if domains else []), "train", "test", "classes")]
    cols += [Col(label) for _, label in PRINTED] + [Col("s/fit")]
    rows = []
    for r in s.to_dict("records"):
        vals = [
            interval_text(r[f"{m}_mean"], r[f"{m}_std"], r.get(f"{m}_low", np.nan), r.get(f"{m}_high", np.nan), n_seeds)
            for m, _ in PRINTED
        ]
        where = [f"{r['test_domain']} ({'in' if r['in_domain'] else 'out of'} domain)"] if domains else []
        rows.append(
            [
                r["backbone"],
                r["probe"],
                *where,
                f"{r['n_train']:.0f}",
                f"{r['n_test']:.0f}",
                f"{r['n_classes']:.0f}",
                *vals,
                f"{r['seconds']:.2f}",
            ]
        )
    footer = ["balanced accuracy, macro / weighted precision and recall: summary.csv"]
    out = [Panel(title, cols, rows, footer), *domain_panels(res.domains), *study_compare_panel(res.compare)]
    pc = res.curves[(res.curves["metric"] == CLASS_METRIC) & res.curves["in_domain"]]
    if len(pc):
        wide = pc.pivot_table(index="class", columns=["backbone", "probe"], values="mean", sort=False)
        out.append(
            Panel(
                "per-class F1",
                [Col("class", "left")] + [Col(f"{b} · {pr}") for b, pr in wide.columns],
                [[str(cls), *[f"{v:.3f}" for v in row]] for cls, row in wide.iterrows()],
            )
        )
    return out


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in s)
