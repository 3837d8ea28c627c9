"""Probes fitted on a study's splits and scored on every test set: the loop of ``scale`` and
``evaluate`` (and of any study that reports the same results, fits and confusion tables).

:func:`fit_splits` makes the splits (:class:`probes.sampling.Sampler`, over a domain plan's
training cells when there is one), plans one :class:`probes.engine.skeleton.FitJob` per backbone x split x
probe (features read once per backbone, test matrices once per split), runs them
(:func:`probes.engine.skeleton.run_plan`) and returns tidy tables in a :class:`SplitFits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probes.domains import DomainPlan, TestSet, evaluations
from probes.engine.intervals import TestedCells, attach_intervals, compare_panel, seed_mean_interval
from probes.engine.skeleton import FitJob, Saves, epoch_table, fit_table, run_plan
from probes.errors import ProbeError
from probes.features.cells import Cells, exclusion_reason
from probes.metrics import CLASS_METRIC, confusion_table, score
from probes.reporting.console import Panel
from probes.sampling import Sampler, Split, flag_min

RESULT_COLUMNS = [
    "study",
    "dataset",
    "backbone",
    "feature_key",
    "pool",
    "probe",
    "limit",
    "seed",
    "split",
    "train_domain",
    "test_domain",
    "in_domain",
    "n_train",
    "n_test",
    "n_classes",
    "metric",
    "class",
    "value",
    "low",
    "high",
    "seconds",
    "exceeds_data",
]
CONFUSION_COLUMNS = ["backbone", "probe", "limit", "seed", "test_domain", "true", "pred", "count"]
CURVE_KEYS = ["backbone", "feature_key", "pool", "probe", "test_domain", "in_domain"]
COMPARE_GROUP = ["limit", "seed", "test_domain"]  # the fits of one test set
COMPARE_FIT = ["backbone", "probe"]


@dataclass
class StudyResult(Saves):
    """What a study produced; the tables are also written under ``out``."""

    kind: str  # "scale" | "evaluate"
    name: str
    params: dict[str, Any]
    results: pd.DataFrame  # tidy: one row per backbone x probe x limit x seed x metric (x class)
    curves: pd.DataFrame  # mean / std over seeds per backbone x probe x limit x metric
    summary: pd.DataFrame  # scale: one row per curve with the 95% limit; evaluate: one row per fit group
    exclusions: pd.DataFrame  # cells and classes left out, and why
    confusion: pd.DataFrame  # long: one row per fit x test domain x true class x predicted class
    notes: list[str] = field(default_factory=list)
    domains: pd.DataFrame | None = None  # domain studies: in- vs out-of-domain macro-F1 and the gap
    splits: dict = field(default_factory=dict)  # (limit, seed) -> Split (positions into the usable cells)
    evaluations: dict = field(default_factory=dict)  # (limit, seed) -> [(test_domain, in_domain, positions, classes)]
    fits: pd.DataFrame | None = None  # one row per fit: chosen C, solver iterations, convergence, precision...
    epochs: pd.DataFrame | None = None  # fine-tunes: one row per fit x epoch (loss, hold-out macro-F1)
    compare: pd.DataFrame | None = None  # paired comparisons of the fits scored on the same test cells
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of_fits(
        cls,
        kind: str,
        name: str,
        params: dict[str, Any],
        fits: SplitFits,
        curves: pd.DataFrame,
        summary: pd.DataFrame,
        *,
        domains: pd.DataFrame | None,
        out: Path | None,
        notes: list[str] | None = None,
    ) -> StudyResult:
        """The result of a study whose fits are ``fits`` (``notes`` go before the fits' own)."""
        return cls(
            kind, name, params, fits.results, curves, summary, fits.exclusions, fits.confusion,
            [*(notes or []), *fits.notes], domains=domains, splits=fits.splits, evaluations=fits.evaluations,
            fits=fits.fits, epochs=fits.epochs, compare=fits.compare, out=out,
        )  # fmt: skip


@dataclass
class SplitFits:
    """The tidy outcome of :func:`fit_splits`."""

    results: pd.DataFrame  # RESULT_COLUMNS
    confusion: pd.DataFrame  # CONFUSION_COLUMNS
    fits: pd.DataFrame  # probes.engine.skeleton.FIT_COLUMNS
    exclusions: pd.DataFrame
    notes: list[str]
    splits: dict[tuple[int | None, int], Split]
    evaluations: dict[tuple[int | None, int], list[TestSet]]
    epochs: pd.DataFrame | None = None  # probes.engine.skeleton.EPOCH_COLUMNS
    compare: pd.DataFrame | None = None  # paired comparisons per test set (probes.engine.intervals.attach_intervals)
    replicates: dict = field(default_factory=dict)  # (backbone, probe, limit, test_domain, metric) -> (B,) per seed


def fit_splits(
    name: str,
    cells: Cells,
    limits: Sequence[int | None],
    seeds: Sequence[int],
    probes: Sequence[str],
    *,
    split: str,
    val: str,
    test_size: float,
    device: str,
    quiet: bool,
    plan: DomainPlan | None = None,
    make_probe: Callable[..., Any] | None = None,
    inputs: Any = None,
) -> SplitFits:
    """Every probe on every backbone's (limit, seed) split, scored on the split's test sets.

    ``inputs`` (a :class:`probes.tuning.study_inputs.TuneInputs`) gives the fine-tune probes their
    token / image readers and backbones; checked before any fit."""
    inside = np.flatnonzero(plan.train_mask) if plan is not None else np.arange(len(cells.obs))
    if len(inside) == 0:
        raise ProbeError(f"no usable cell in training domain(s) {plan.train_name if plan else ''}")
    sampler = Sampler(
        cells.labels[inside],
        split,
        groups=cells.obs["group"].to_numpy()[inside],
        split_column=cells.obs["split"].to_numpy()[inside],
        val=val,
        test_size=test_size,
    )
    splits = {k: _lift(sp, inside) for k, sp in sampler.check_limits(limits, seeds).items()}  # bad limits fail here
    notes = split_notes(cells, sampler, splits)
    evals = {k: evaluations(sp, plan, cells.labels, notes) for k, sp in splits.items()}
    notes[:] = list(dict.fromkeys(notes))
    train_domain = plan.train_name if plan is not None else ""
    rows: list[dict] = []
    confusion: list[dict] = []
    fit_rows: list[dict] = []
    epoch_rows: list[dict] = []
    tested: dict[tuple, TestedCells] = {}  # (limit, seed, test_domain) -> the predictions on those cells
    from probes.tuning.study_inputs import TUNE_PROBES, TuneInputs, TuneOptions  # torch: imported when fitting

    if inputs is None and any(p in TUNE_PROBES for p in probes):
        inputs = TuneInputs(cells, TuneOptions())  # the fine-tunes' defaults (lp on pooled features)
    if inputs is not None:
        inputs.check(list(probes))
    total = len(cells.backbones) * len(splits) * len(probes)
    jobs = _jobs(cells, splits, evals, probes, inputs)
    for done in run_plan(jobs, total, device=device, quiet=quiet, make_probe=make_probe):
        job, (sp, tests) = done.job, done.job.tag
        fit_rows.append(done.fit_row())
        epoch_rows += done.epoch_rows()
        for (test_domain, in_domain, pos, classes), pred in zip(tests, done.predictions):
            sc = score(cells.labels[pos], pred, classes)
            group = tested.setdefault((sp.limit, sp.seed, test_domain), TestedCells(cells.labels[pos], classes))
            group.add((job.backbone, job.probe), pred, range(len(rows), len(rows) + len(sc.values) + len(sc.class_f1)))
            base = dict(
                study=name,
                dataset=cells.dataset,
                backbone=job.backbone,
                feature_key=cells.feature_key(job.backbone),
                pool=cells.pool_of(job.backbone),
                probe=job.probe,
                limit=sp.limit,
                seed=sp.seed,
                split=split,
                train_domain=train_domain,
                test_domain=test_domain,
                in_domain=in_domain,
                n_train=len(sp.train),
                n_test=len(pos),
                n_classes=len(classes),
            )
            extra = dict(low=np.nan, high=np.nan, seconds=done.seconds, exceeds_data=sp.exceeds_data)
            rows += [{**base, "metric": m, "class": "", "value": v, **extra} for m, v in sc.values.items()]
            rows += [{**base, "metric": CLASS_METRIC, "class": c, "value": v, **extra} for c, v in sc.class_f1.items()]
            keys = {k: base[k] for k in ("backbone", "probe", "limit", "seed", "test_domain")}
            # columns: every class the probe was trained on, so predictions into a class the test domain
            # lacks stay in the table (each row sums to that class's test cells)
            predicted, counts = confusion_table(cells.labels[pos], pred, sc.classes, sp.classes)
            for i, t in enumerate(sc.classes):
                for j, p in enumerate(predicted):
                    confusion.append({**keys, "true": t, "pred": p, "count": int(counts[i, j])})
    found = attach_intervals(rows, tested, fit_columns=COMPARE_FIT, group_columns=COMPARE_GROUP)
    compare, replicates = found.compare, found.replicates
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    results["limit"] = results["limit"].astype("Int64")
    compare["limit"] = compare["limit"].astype("Int64")
    conf = pd.DataFrame(confusion, columns=CONFUSION_COLUMNS)
    conf["limit"] = conf["limit"].astype("Int64")
    fits, fit_notes = fit_table(fit_rows)
    return SplitFits(
        results,
        conf,
        fits,
        split_exclusions(cells, sampler, splits),
        notes + fit_notes,
        splits,
        evals,
        epochs=epoch_table(epoch_rows) if epoch_rows else None,
        compare=compare,
        replicates=replicates,
    )


def _jobs(cells: Cells, splits: dict, evals: dict, probes: Sequence[str], inputs: Any = None) -> Iterator[FitJob]:
    """The plan: per backbone, only the rows some split uses are read, once; test matrices once per split.
    Fine-tunes get readers of their split's cells instead (tokens / images read in minibatches)."""
    needed = np.unique(
        np.concatenate([sp.train for sp in splits.values()] + [e[2] for ev in evals.values() for e in ev])
    )
    pooled = [p for p in probes if inputs is None or inputs.source(p) == "features"]
    for backbone in cells.backbones:
        x_all = cells.features(backbone, needed) if pooled else None

        def rows_of(pos: np.ndarray, x_all: np.ndarray | None = x_all) -> np.ndarray:
            assert x_all is not None
            return x_all[np.searchsorted(needed, pos)]

        for key, sp in splits.items():
            y_tr = cells.labels[sp.train]
            if pooled:
                x_tr = rows_of(sp.train)
                x_tests = [rows_of(pos) for _, _, pos, _ in evals[key]]  # once per split, for every probe
            for probe in probes:
                params: dict[str, Any] = {}
                if inputs is not None:
                    params = inputs.params(backbone, probe, sp.classes)
                if probe in pooled:
                    tr, tests = x_tr, x_tests
                    if inputs is not None:
                        tr, tests = inputs.pooled(probe, tr), [inputs.pooled(probe, x) for x in tests]
                else:
                    tr = inputs.reader(backbone, probe, sp.train, sp.seed)
                    tests = [inputs.reader(backbone, probe, pos, sp.seed) for _, _, pos, _ in evals[key]]
                yield FitJob(
                    backbone,
                    probe,
                    sp.seed,
                    tr,
                    y_tr,
                    tests,
                    limit=sp.limit,
                    n_classes=len(sp.classes),
                    tag=(sp, evals[key]),
                    params=params,
                )


def _lift(sp: Split, inside: np.ndarray) -> Split:
    """A split made over a subset of the cells, with positions mapped back to all usable cells."""
    sp.train, sp.test = inside[sp.train], inside[sp.test]
    return sp


# -- tables -------------------------------------------------------------------------------------
def over_seeds(results: pd.DataFrame, replicates: dict | None = None) -> pd.DataFrame:
    """Mean and std (sample std; 0 with one seed) over seeds per curve x limit x metric x class.

    ``low`` / ``high``: the 95% bootstrap interval over test cells of that mean (from ``replicates``,
    :attr:`SplitFits.replicates`; each seed's test cells resampled, resample r averaged over seeds),
    for the aggregate metrics; NaN for per-class rows or without ``replicates``."""
    keys = CURVE_KEYS + ["limit", "metric", "class"]
    g = results.groupby(keys, dropna=False, sort=False)
    out = g.agg(
        mean=("value", "mean"),
        std=("value", "std"),
        n_seeds=("seed", "nunique"),
        n_train=("n_train", "mean"),
        n_test=("n_test", "mean"),
        n_classes=("n_classes", "max"),
        seconds=("seconds", "mean"),
        exceeds_data=("exceeds_data", "any"),
    ).reset_index()
    out["std"] = out["std"].fillna(0.0)
    low, high = np.full(len(out), np.nan), np.full(len(out), np.nan)
    if replicates:
        for i, r in enumerate(out[["backbone", "probe", "limit", "test_domain", "metric", "class"]].itertuples(False)):
            if r[5] == "":
                key = (r[0], r[1], None if pd.isna(r[2]) else r[2], r[3], r[4])
                low[i], high[i] = seed_mean_interval(replicates, key)
    out.insert(out.columns.get_loc("std") + 1, "low", low)
    out.insert(out.columns.get_loc("low") + 1, "high", high)
    return out


def confusion_matrices(confusion: pd.DataFrame) -> list[dict]:
    """The long confusion table as one matrix per fit (rows: the test set's true classes, ``labels``; columns:
    every training class, ``predicted``: not square when the test domain lacks some training classes)."""
    out = []
    keys = ["backbone", "probe", "limit", "seed", "test_domain"]
    for (b, p, lim, s, dom), c in confusion.groupby(keys, sort=False, dropna=False):
        labels = list(dict.fromkeys(c["true"]))
        predicted = list(dict.fromkeys(c["pred"]))
        m = c.pivot(index="true", columns="pred", values="count").reindex(index=labels, columns=predicted)
        out.append(
            {
                "backbone": b,
                "probe": p,
                "limit": None if pd.isna(lim) else int(lim),
                "seed": int(s),
                "test_domain": dom,
                "labels": labels,  # rows: the true classes of the test set
                "predicted": predicted,  # columns: every training class (a test domain may lack some)
                "matrix": m.to_numpy().astype(int).tolist(),
            }
        )
    return out


def common_tables(res: StudyResult) -> dict[str, pd.DataFrame]:
    """The tables every split study writes (file name -> table)."""
    tables = {
        "results.csv": res.results,
        "results.parquet": res.results,
        "curves.csv": res.curves,
        "summary.csv": res.summary,
        "exclusions.csv": res.exclusions,
        "confusion.csv": res.confusion,
    }
    if res.compare is not None:
        tables["compare.csv"] = res.compare
    if res.fits is not None:
        tables["fits.csv"] = res.fits
    if res.epochs is not None:
        tables["epochs.csv"] = res.epochs
    if res.domains is not None:
        tables["domains.csv"] = res.domains
    return tables


def split_notes(cells: Cells, sampler: Sampler, splits: dict) -> list[str]:
    """What was left out, per limit: excluded cells, classes below FlagMin, limits beyond the data."""
    notes = cells.exclusion_lines()
    if sampler.mode == "column" and sampler.unassigned:
        notes.append(
            f"{sampler.unassigned} cells excluded: split column neither train"
            f"{'/val' if sampler.val == 'train' else ''} nor test"
        )
    seen: set = set()
    for (limit, _), sp in splits.items():
        if limit is None:
            for c, why in sp.excluded.items():
                if (c, why) not in seen:
                    seen.add((c, why))
                    notes.append(f"class {c} excluded: {why}")
            continue
        key = (limit, tuple(sorted(sp.excluded.items())))
        if sp.excluded and key not in seen:
            seen.add(key)
            notes.append(
                f"limit {limit} (FlagMin {flag_min(limit)}): class(es) excluded: "
                + "; ".join(f"{c} ({why})" for c, why in sp.excluded.items())
            )
        if sp.exceeds_data and ("exceeds", limit) not in seen:
            seen.add(("exceeds", limit))
            notes.append(
                f"limit {limit} >= the largest class ({sp.largest_class} cells): no class is capped, "
                "the set is the full data"
            )
    return notes


def split_exclusions(cells: Cells, sampler: Sampler, splits: dict) -> pd.DataFrame:
    """``exclusions.csv``: cells and classes left out (per limit and seed) and why."""
    rows = []
    for key, n in cells.excluded.items():
        rows.append(dict(limit=None, seed=None, **{"class": ""}, cells=n, reason=exclusion_reason(key)))
    if sampler.mode == "column":
        rows.append(
            dict(
                limit=None,
                seed=None,
                **{"class": ""},
                cells=sampler.unassigned,
                reason="split column neither train nor test",
            )
        )
    counts = pd.Series(cells.labels).value_counts()
    for (limit, seed), sp in splits.items():
        for c, why in sp.excluded.items():
            rows.append(dict(limit=limit, seed=seed, **{"class": c}, cells=int(counts.get(c, 0)), reason=why))
    df = pd.DataFrame(rows, columns=["limit", "seed", "class", "cells", "reason"])
    df["limit"] = df["limit"].astype("Int64")
    df["seed"] = df["seed"].astype("Int64")
    return df


def study_compare_panel(compare: pd.DataFrame | None) -> list[Panel]:
    """The printed paired comparisons of a split study: the largest limit's first seed, every test set."""
    if compare is None or compare.empty:
        return []
    lim = compare["limit"].dropna()
    chosen = compare[compare["limit"].isna()] if lim.empty else compare[compare["limit"] == lim.max()]
    seed = chosen["seed"].iloc[0]
    chosen = chosen[chosen["seed"] == seed]
    where = ("" if lim.empty else f"limit {int(lim.max())}, ") + f"seed {int(seed)}"
    columns = COMPARE_FIT + (["test_domain"] if (chosen["test_domain"] != "").any() else [])
    if "test_domain" in columns:
        chosen = chosen.assign(test_domain_a=chosen["test_domain"], test_domain_b=chosen["test_domain"])
    return compare_panel(chosen, columns, where)
