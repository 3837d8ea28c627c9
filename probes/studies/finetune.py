"""``finetune``: the papers' fine-tunes from the images (LoRA on every block, FT_last, scratch-vit).

Skeleton steps: inputs (cells, method, options; images, depth and hierarchy checked up front) -> the
uncapped split per seed (or one ``limit``) -> fits (:func:`probes.engine.split_fits.fit_splits` with the
fine-tune's image readers: the images re-read from the store's paths, augmented when asked) -> the
same results / fits / confusion tables as ``scale`` and ``evaluate``, ``epochs.csv``,
``training_curves.png``, optionally the adapter -> a console table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from embedcache.options import UNSET
from probes.domains import DomainPlan, domain_gaps, domain_panels
from probes.engine.intervals import interval_text
from probes.engine.options import StudyOptions, study_options
from probes.engine.skeleton import finish, study_name
from probes.engine.split_fits import (
    StudyResult,
    common_tables,
    confusion_matrices,
    fit_splits,
    over_seeds,
    study_compare_panel,
)
from probes.errors import ProbeError
from probes.features.cells import open_cells
from probes.metrics import MAIN_METRIC
from probes.reporting.console import Col, Panel
from probes.reporting.tables import no_empty_outputs_on_failure, study_document
from probes.reporting.training import training_plots
from probes.sampling import parse_seeds
from probes.tuning.options import TuneOptions

METHODS = ("lora", "ft-last", "lp", "scratch-vit")
SHOWN = [("accuracy", "acc"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")]


def finetune(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    method: str = "lora",
    blocks: int | str = "all",
    augment: str | Sequence[str] | None = None,
    limit: int | None = None,
    seeds: int | str | Sequence[int] = 1,
    save_adapter: str | os.PathLike | None = None,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    options: StudyOptions | None = None,
    tune: TuneOptions | None = None,
    **more: Any,
) -> StudyResult:
    """Fine-tune ``model`` from the images recorded in the store, one fit per backbone x seed.

    ``method``: ``lora`` (peft LoRA on the attention of the last ``blocks`` blocks; ``"all"``: every
    block, the papers' protocol), ``ft-last`` (those blocks unfrozen), ``lp`` (frozen backbone) or
    ``scratch-vit`` (the small-patch paper's 1.9 M-parameter ViT from scratch at the working size, 40 px
    unless the store has one). ``augment``: ``flip,rot90,color,blur`` on the uint8 cells before
    preprocessing, training batches only, seeded. Heads, losses and training options as in
    :func:`probes.scale`. ``limit``: cap each class (FlagLimit) instead of the full training split.
    Writes the tables of :func:`probes.evaluate` plus ``epochs.csv`` and ``training_curves.png`` to
    ``out`` (default ``finetune-<models>-<method>-<date>``); ``save_adapter`` DIR as in :func:`probes.evaluate`.
    """
    opts, tune = study_options(
        options,
        more,
        tune=tune,
        tune_class=TuneOptions,
        dataset=dataset,
        pool=pool,
        out=out,
        device=device,
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

    from probes.tuning.saving import AdapterKeeper
    from probes.tuning.study_inputs import TuneInputs

    if method not in METHODS:
        raise ProbeError(f"unknown fine-tune method {method!r}; choose from {', '.join(METHODS)}")
    seed_list = parse_seeds(seeds)
    cells = open_cells(store, model, dataset=dataset, pool=pool)
    tune = tune.replace(blocks=None if method == "scratch-vit" else blocks, augment=augment)
    inputs = TuneInputs(cells, tune, device)
    name = study_name("finetune", cells.backbones + [method], out)
    params: dict[str, Any] = dict(
        store=str(cells.store_url),
        dataset=cells.dataset,
        model=cells.backbones,
        method=method,
        limit=limit,
        seeds=seed_list,
        split=split,
        val=val,
        pool=cells.pool,
        device=device,
        test_size=test_size,
        finetune=tune.as_dict(),
    )
    plan = DomainPlan.make(cells, train_domain, test_domain)
    if plan is not None:
        params.update(train_domain=plan.train, test_domain=plan.test)
    keeper = AdapterKeeper(save_adapter, [method]) if save_adapter is not None else None
    inputs.check([method])  # images gone, depth, heads: before the output folder is made
    with no_empty_outputs_on_failure():
        folder = opts.folder(name)
        fits = fit_splits(
            name,
            cells,
            [limit],
            seed_list,
            [method],
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
        main = curves[(curves["metric"] == MAIN_METRIC) & (curves["class"] == "")]
        res = StudyResult.of_fits(
            "finetune",
            name,
            params,
            fits,
            curves,
            main.reset_index(drop=True),
            domains=domain_gaps(curves) if plan is not None else None,
            out=folder,
        )
        if keeper is not None:
            res.notes.extend(keeper.save())
        finish(
            res,
            tables=common_tables(res),
            plots=training_plots(res.epochs, f"{params['dataset']} · {method}"),
            documents={
                "confusion.json": confusion_matrices(res.confusion),
                "study.json": lambda names: study_document("finetune", name, params, res.notes, names),
            },
            panels=panels(res),
            show=opts.printing(),
        )
    return res


def panels(res: StudyResult) -> list[Panel]:
    """Accuracy and macro / weighted F1 (mean ± std over seeds, [95% interval over test cells]) per backbone x
    method x test domain."""
    c = res.curves[res.curves["class"] == ""]
    cols = [
        Col("backbone", "left", no_wrap=True),
        Col("method", "left", no_wrap=True),
        Col("tested on", "left", no_wrap=True),
        Col("train"),
        Col("test"),
    ] + [Col(lbl) for _, lbl in SHOWN]
    rows = []
    for (b, p, dom), g in c.groupby(["backbone", "probe", "test_domain"], sort=False):
        by = {r.metric: r for r in g.itertuples()}
        first = next(iter(by.values()))
        vals = [
            interval_text(by[m].mean, by[m].std, by[m].low, by[m].high, int(by[m].n_seeds)) if m in by else "-"
            for m, _ in SHOWN
        ]
        rows.append([b, p, dom or "in domain", f"{first.n_train:.0f}", f"{first.n_test:.0f}", *vals])
    title = f"{res.name}: {res.params['method']} from the images, {res.params['dataset']}"
    return [Panel(title, cols, rows), *domain_panels(res.domains), *study_compare_panel(res.compare)]
