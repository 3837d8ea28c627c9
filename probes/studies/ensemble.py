"""``ensemble``: which head wins on which class, and the seed paper's head-diverse ensemble.

Skeleton steps: inputs (cells, three or more heads with probabilities, the primary head, the confusion
pairs, seeds) -> per seed the uncapped split, its training cells cut into a fit part and a validation
part (:func:`probes.engine.proba_fits.held_out_splits`) -> every head fitted on the fit part
(:func:`probes.engine.proba_fits.fit_probas`) -> per backbone x seed: the pairs (given, or the primary head's
top confusions on the **validation part**, never on test), the override ensemble
(:func:`probes.heads.ensemble_rules.combine`: the primary's prediction inside a pair is replaced only when
every other head agrees on the pair's other class), majority and probability-averaging ensembles; every
head and ensemble scored on the same test cells -> ``results``, ``specialisation`` (per-class F1 of
every head, mean ± std over seeds, the best head per class marked), ``summary``, ``pairs``, ``fits``,
``exclusions`` tables, ``specialisation-<backbone>.png``, console tables.
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
from probes.engine.intervals import TestedCells, attach_intervals, compare_panel, interval_text, seed_mean_interval
from probes.engine.options import StudyOptions, study_options
from probes.engine.proba_fits import (
    VAL_FRACTION,
    FittedProba,
    base_row,
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
from probes.heads.ensemble_rules import MIN_OVERRIDE_HEADS, auto_pairs, combine, parse_pairs
from probes.metrics import CLASS_METRIC
from probes.reporting.console import Bold, Col, Panel
from probes.reporting.decision_plots import plot_specialisation
from probes.reporting.tables import study_document
from probes.sampling import parse_seeds, sort_labels

RULE_NAMES = {"override": "ensemble", "majority": "ensemble-vote", "mean": "ensemble-mean"}  # -> registry prefix
KEYS = ["backbone", "feature_key", "pool", "kind", "method", "probe"]
PRINTED = [("accuracy", "acc"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")]  # the rest: summary.csv


@dataclass
class EnsembleResult(Saves):
    """Tidy results of every head and ensemble, and the tables derived from them."""

    name: str
    params: dict[str, Any]
    results: pd.DataFrame  # one row per backbone x seed x method x metric (x class)
    specialisation: pd.DataFrame  # per backbone x class x method: F1 mean / std over seeds, best_head
    summary: pd.DataFrame  # mean / std over seeds per backbone x method x metric
    pairs: pd.DataFrame  # per backbone x seed x pair: where it came from and what the override did on test
    fits: pd.DataFrame
    exclusions: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    compare: pd.DataFrame | None = None  # every two heads / rules on the same test cells (compare.csv)
    files: dict[str, Path] = field(default_factory=dict)


def check_heads(heads: str | Sequence[str], primary: str | None) -> tuple[list[str], str]:
    """The heads (at least three plain probes) and the primary one (default: the first)."""
    head_list = check_probes(heads)
    nested = [h for h in head_list if ":" in h]
    if nested:
        raise ProbeError(f"heads are plain probes, not ensembles: {', '.join(nested)}")
    if len(head_list) < MIN_OVERRIDE_HEADS:
        raise ProbeError(
            f"the ensemble rule needs at least {MIN_OVERRIDE_HEADS} heads (the primary and two that must "
            f"agree), got {len(head_list)}: {', '.join(head_list)}; e.g. --heads mlp,logistic,cosine"
        )
    primary = head_list[0] if primary is None else primary
    if primary not in head_list:
        raise ProbeError(f"primary head '{primary}' is not one of the heads {', '.join(head_list)}")
    return head_list, primary


def ensemble(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    heads: str | Sequence[str] = "mlp,logistic,cosine",
    primary: str | None = None,
    pairs: str | Sequence[Sequence[str]] = "auto",
    n_pairs: int = 4,
    seeds: int | str | Sequence[int] = 5,
    val_fraction: float = VAL_FRACTION,
    make_probe: Callable[..., Any] | None = None,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    options: StudyOptions | None = None,
    **more: Any,
) -> EnsembleResult:
    """Per-class F1 of every head and the override / majority / mean ensembles on the same test cells.

    ``heads``: three or more probes (comma list); ``primary``: the head whose predictions the override
    rule keeps unless overridden (default the first). ``pairs``: ``"A:B,C:D"`` (unordered; every class
    one of the dataset's) or ``"auto"``: per seed, the ``n_pairs`` class pairs the primary head confuses
    most on the validation part (a stratified ``val_fraction`` of the training cells; the heads are
    fitted on the rest). Writes ``results.csv/.parquet``, ``specialisation.csv``, ``summary.csv``,
    ``pairs.csv``, ``fits.csv``, ``exclusions.csv``, ``specialisation-<backbone>.png`` and ``study.json``.
    ``scheduler`` (``tcp://host:port`` or ``local:N``) runs each fit as a Dask task, with identical results;
    ``out_of_core`` / ``max_memory`` read features in store chunks when they exceed the budget
    (:mod:`probes.engine.runtime`).
    """
    opts, _ = study_options(options, more, dataset=dataset, pool=pool, out=out, device=device)
    opts.refuse(("train_domain", "test_domain"), "ensemble")
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
        head_list, primary = check_heads(heads, primary)
        auto = isinstance(pairs, str) and pairs.strip().lower() == "auto"
        if auto and int(n_pairs) < 1:
            raise ProbeError(f"n_pairs must be at least 1 with pairs='auto', got {n_pairs}")
        cells = open_cells(store, model, dataset=dataset, pool=pool)
        try:
            given = None if auto else parse_pairs(pairs, sort_labels(cells.labels))
        except ValueError as e:
            raise ProbeError(str(e)) from None
        require_probabilities(head_list, make_probe, what="the ensemble")
        name = study_name("ensemble", cells.backbones + head_list, out)
        params: dict[str, Any] = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            heads=head_list,
            primary=primary,
            pairs="auto" if auto else [f"{a}:{b}" for a, b in given or []],
            n_pairs=int(n_pairs),
            seeds=seed_list,
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
        fitted: dict[tuple[str, int], dict[str, FittedProba]] = {}
        fit_rows = []
        for done in fit_probas(cells, held, head_list, device=device, quiet=quiet, make_probe=make_probe):
            fitted.setdefault((done.job.backbone, done.job.seed), {})[done.job.probe] = done
            fit_rows.append(done.fit_row())
        rows: list[dict] = []
        pair_rows: list[dict] = []
        tested: dict[tuple, TestedCells] = {}  # (backbone, seed) -> every head and rule on its test cells
        order = [primary, *[h for h in head_list if h != primary]]
        members = "+".join(order)
        for (backbone, seed), by_head in fitted.items():
            h = by_head[primary].job.tag
            y_test = cells.labels[h.test]
            base = base_row(name, cells, by_head[primary], split)
            group = tested.setdefault((backbone, seed), TestedCells(y_test, h.classes))
            for head in head_list:
                _scored(rows, group, {**base, "probe": head}, by_head[head].predictions[1], kind="head", method=head)
            if auto:
                ranked = auto_pairs(cells.labels[h.val], by_head[primary].predictions[0], int(n_pairs))
                chosen, counts, source = [p for p, _ in ranked], dict(ranked), "validation"
            else:
                chosen = [p for p in given or [] if p[0] in h.classes and p[1] in h.classes]
                counts, source = {}, "given"
                dropped = [f"{a}:{b}" for a, b in given or [] if (a, b) not in chosen]
                if dropped:
                    notes.append(f"seed {seed}: pair(s) {', '.join(dropped)} name a class left out of the split")
            probas = [by_head[m].probas[1] for m in order]
            labels = {}
            for rule, prefix in RULE_NAMES.items():
                labels[rule], _ = combine(rule, probas, h.classes, primary=0, pairs=chosen)
                _scored(
                    rows, group, {**base, "probe": f"{prefix}:{members}"}, labels[rule], kind="ensemble", method=rule
                )
            prim = np.asarray(by_head[primary].predictions[1]).astype(str)
            for a, b in chosen:
                moved = (labels["override"] != prim) & np.isin(prim, [a, b]) & np.isin(labels["override"], [a, b])
                pair_rows.append(
                    dict(
                        backbone=backbone,
                        seed=seed,
                        pair=f"{a}:{b}",
                        source=source,
                        val_confusions=counts.get((a, b)),
                        n_replaced=int(moved.sum()),
                        n_fixed=int((moved & (labels["override"] == y_test)).sum()),
                        n_broken=int((moved & (prim == y_test)).sum()),
                    )
                )
            if not chosen:
                notes.append(
                    f"{backbone}, seed {seed}: no confusion pair ({source}): the override ensemble is the "
                    f"primary head '{primary}'"
                )
        found = attach_intervals(rows, tested, fit_columns=["method"], group_columns=["backbone", "seed"])
        results = pd.DataFrame(rows)
        summary = seed_summary(results[results["class"] == ""], KEYS)
        summary["low"], summary["high"] = zip(
            *(
                seed_mean_interval(found.replicates, k)
                for k in zip(summary["method"], summary["backbone"], summary["metric"])
            )
        )
        spec = specialisation(results)
        pair_table = pd.DataFrame(
            pair_rows,
            columns=["backbone", "seed", "pair", "source", "val_confusions", "n_replaced", "n_fixed", "n_broken"],
        )
        pair_table["val_confusions"] = pair_table["val_confusions"].astype("Int64")
        fits, fit_notes = fit_table(fit_rows)
        res = EnsembleResult(
            name,
            params,
            results,
            spec,
            summary,
            pair_table,
            fits,
            exclusions,
            list(dict.fromkeys(notes + fit_notes)),
            out=folder,
            compare=found.compare,
        )
        plots = {
            f"specialisation-{slug(b)}.png": (
                lambda path, t=t, b=b: plot_specialisation(t, path, title=f"{cells.dataset} · {b} · primary {primary}")
            )
            for b, t in spec.groupby("backbone", sort=False)
        }
        finish(
            res,
            tables={
                "results.csv": results,
                "results.parquet": results,
                "specialisation.csv": spec,
                "summary.csv": summary,
                "pairs.csv": pair_table,
                "compare.csv": res.compare,
                "fits.csv": fits,
                "exclusions.csv": exclusions,
            },
            plots=plots,
            documents={"study.json": lambda names: study_document("ensemble", name, params, res.notes, names)},
            panels=panels(res),
            show=opts.printing(),
        )
        return res


def _scored(rows: list[dict], group: TestedCells, base: dict, pred: np.ndarray, **key: str) -> None:
    """Score ``pred`` on the group's test cells into ``rows``, and record it for the intervals."""
    new = score_rows(base, group.truth, pred, group.classes, **key)
    group.add((key["method"],), pred, range(len(rows), len(rows) + len(new)))
    rows.extend(new)


def specialisation(results: pd.DataFrame) -> pd.DataFrame:
    """Per backbone x class x method: per-class F1 mean / std over seeds; ``best_head`` marks the head(s)
    with the highest mean for the class (ensembles are listed, never marked)."""
    pc = results[results["metric"] == CLASS_METRIC]
    out = (
        pc.groupby(["backbone", "class", "kind", "method"], sort=False)
        .agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    out["std"] = out["std"].fillna(0.0)
    heads = out["kind"] == "head"
    best = out[heads].groupby(["backbone", "class"])["mean"].transform("max")
    out["best_head"] = False
    out.loc[heads, "best_head"] = np.isclose(out.loc[heads, "mean"], best)
    return out


def panels(res: EnsembleResult) -> list[Panel]:
    """The specialisation table (best head per class in bold), the scores of heads and ensembles, the pairs."""
    out = []
    spec = res.specialisation
    n_seeds = int(spec["n_seeds"].max())
    for backbone, t in spec.groupby("backbone", sort=False):
        methods = list(dict.fromkeys(t["method"]))
        cols = [Col("class", "left", no_wrap=True)] + [Col(m) for m in methods] + [Col("best head", "left")]
        rows = []
        for cls, g in t.groupby("class", sort=False):
            by = {r.method: r for r in g.itertuples()}
            cells_: list[Any] = []
            for m in methods:
                r = by[m]
                txt = pm(r.mean, r.std, n_seeds)
                cells_.append(Bold(txt) if r.best_head else txt)
            rows.append([cls, *cells_, ", ".join(g.loc[g["best_head"], "method"])])
        out.append(
            Panel(
                f"{res.name} · {backbone}: per-class F1 on the same test cells"
                + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else "")
                + f"; primary head {res.params['primary']}; best head per class in bold",
                cols,
                rows,
            )
        )
    s = res.summary
    cols = [Col("backbone", "left", no_wrap=True), Col("method", "left", no_wrap=True)]
    cols += [Col(lab) for _, lab in PRINTED]
    rows = []
    for (b, m), g in s.groupby(["backbone", "method"], sort=False):
        v = {r.metric: (r.mean, r.std, r.low, r.high) for r in g.itertuples()}
        rows.append([b, m, *[interval_text(*v[k], n_seeds) for k, _ in PRINTED]])
    out.append(
        Panel(
            "heads and ensembles (override: the paper's rule; majority; mean: probability averaging), "
            "[95% interval over test cells]",
            cols,
            rows,
            ["macro / weighted precision and recall: summary.csv"],
        )
    )
    if res.compare is not None and len(res.compare):
        c = res.compare[res.compare["seed"] == res.compare["seed"].iloc[0]]
        c = c.assign(fit_a=c["backbone"] + " · " + c["method_a"], fit_b=c["method_b"])
        out += compare_panel(c, ["fit"], f"seed {c['seed'].iloc[0]}")
    p = res.pairs
    if len(p):
        agg = (
            p.groupby(["backbone", "pair", "source"], sort=False)
            .agg(
                seeds=("seed", "nunique"),
                replaced=("n_replaced", "sum"),
                fixed=("n_fixed", "sum"),
                broken=("n_broken", "sum"),
            )
            .reset_index()
        )
        out.append(
            Panel(
                "confusion pairs: test predictions of the primary head replaced (summed over seeds); fixed: "
                "now right, broken: was right",
                [
                    Col("backbone", "left", no_wrap=True),
                    Col("pair", "left"),
                    Col("chosen on", "left"),
                    Col("seeds"),
                    Col("replaced"),
                    Col("fixed"),
                    Col("broken"),
                ],
                [
                    [r.backbone, r.pair, r.source, str(r.seeds), str(r.replaced), str(r.fixed), str(r.broken)]
                    for r in agg.itertuples()
                ],
            )
        )
    return out
