"""Probe studies on a feature store: :func:`scale` (FlagLimit curves) and :func:`evaluate` (one fit).

Both read the store through :mod:`probes.data`, split through :mod:`probes.sampling`, fit the
heads of :mod:`probes.heads`, score with :mod:`probes.metrics` and write through
:mod:`probes.report`. Every backbone of a study is scored on the same splits (same cells).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .data import Cells, ProbeError, exclusion_reason, open_cells, parse_names
from .metrics import CLASS_METRIC, score
from .sampling import TEST_SIZE, Sampler, Split, flag_min, parse_limits, parse_seeds, sort_labels

FIT_COLUMNS = [
    "backbone", "probe", "limit", "seed", "n_train", "seconds",
    "C", "val_f1", "n_iter", "converged", "precision", "backend", "exact_fallbacks",
]
FIT_ATTRS = ("C_", "val_f1_", "n_iter_", "converged_", "precision_", "backend_", "exact_fallbacks_")

RESULT_COLUMNS = [
    "study", "dataset", "backbone", "feature_key", "pool", "probe", "limit", "seed", "split",
    "train_domain", "test_domain", "in_domain",
    "n_train", "n_test", "n_classes", "metric", "class", "value", "seconds", "exceeds_data",
]


@dataclass
class StudyResult:
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
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def scale(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    limits: str | int | Sequence[int] = "256..16384",
    probes: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 5,
    split: str = "stratified",
    val: str = "train",
    dataset: str | None = None,
    pool: str = "cls",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    test_size: float = TEST_SIZE,
    fraction: float = 0.95,
    train_domain: str | Sequence[str] | None = None,
    test_domain: str | Sequence[str] | None = None,
    quiet: bool = False,
    show: bool | None = None,
) -> StudyResult:
    """Macro-F1 (and the rest) against cells per class, for each backbone x probe.

    ``limits``: ``"256..16384"`` (powers of two), a comma list or integers. ``seeds``: a count
    N (seeds 42..42+N-1) or explicit seeds. ``split``: ``stratified`` (the protocol),
    ``column`` or ``group`` (see :mod:`probes.sampling`). Writes ``results.csv/.parquet``,
    ``curves.csv``, ``summary.csv`` (smallest limit reaching ``fraction`` of each curve's best
    mean), ``exclusions.csv``, ``confusion.csv/.json``, ``scaling.png`` and ``study.json`` to
    ``out`` (default ``scale-<models>-<date>``). ``quiet`` hides the progress bar and the printed
    summary; ``show`` prints the summary regardless (the CLI's ``--quiet`` keeps it).
    """
    limit_list = parse_limits(limits)
    seed_list = parse_seeds(seeds)
    cells = open_cells(store, model, dataset=dataset, pool=pool)
    probe_list = _check_probes(probes)
    name = _study_name("scale", cells.backbones, out)
    params = dict(
        store=str(cells.store_url), dataset=cells.dataset, model=cells.backbones, limits=limit_list,
        probes=probe_list, seeds=seed_list, split=split, val=val, pool=pool, device=device,
        test_size=test_size, fraction=fraction,
    )
    plan = DomainPlan.make(cells, train_domain, test_domain)
    if plan is not None:
        params.update(train_domain=plan.train, test_domain=plan.test)
    return _study("scale", name, params, cells, limit_list, seed_list, probe_list, split, val, test_size, device, out, quiet,
                  show, plan)


def evaluate(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    probe: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 1,
    split: str = "stratified",
    val: str = "train",
    dataset: str | None = None,
    pool: str = "cls",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    test_size: float = TEST_SIZE,
    train_domain: str | Sequence[str] | None = None,
    test_domain: str | Sequence[str] | None = None,
    quiet: bool = False,
    show: bool | None = None,
) -> StudyResult:
    """One fit per backbone x probe x seed on the full training split (no cap, no FlagMin).

    Same splits and outputs as :func:`scale` (``limit`` is empty), plus a confusion-matrix
    PNG per backbone x probe; default ``out`` is ``eval-<models>-<probe>-<date>``.
    ``train_domain`` / ``test_domain``: as in :func:`scale`.
    """
    seed_list = parse_seeds(seeds)
    cells = open_cells(store, model, dataset=dataset, pool=pool)
    probe_list = _check_probes(probe)
    name = _study_name("eval", cells.backbones + probe_list, out)
    params = dict(
        store=str(cells.store_url), dataset=cells.dataset, model=cells.backbones, probe=probe_list,
        seeds=seed_list, split=split, val=val, pool=pool, device=device, test_size=test_size,
    )
    plan = DomainPlan.make(cells, train_domain, test_domain)
    if plan is not None:
        params.update(train_domain=plan.train, test_domain=plan.test)
    return _study("evaluate", name, params, cells, [None], seed_list, probe_list, split, val, test_size, device, out, quiet,
                  show, plan)


# -- the shared loop ----------------------------------------------------------------------------
@dataclass
class DomainPlan:
    """Which cells train (and give the in-domain test split) and which form each out-of-domain test set."""

    train: list[str]
    test: list[str]
    train_mask: np.ndarray  # over the usable cells
    test_masks: dict[str, np.ndarray]

    @property
    def train_name(self) -> str:
        return "+".join(self.train)

    @classmethod
    def make(cls, cells: Cells, train_domain, test_domain) -> "DomainPlan | None":
        """Check the names against the store's ``domain`` column; None when no domain is asked for."""
        train, test = parse_names(train_domain or []), parse_names(test_domain or [])
        if not train:
            if test:
                raise ProbeError("--test-domain needs --train-domain (the domain(s) the probes are trained on)")
            return None
        dom = cells.obs["domain"].to_numpy(dtype=str)
        present = sort_labels(set(dom) - {""})
        if not present:
            raise ProbeError(
                f"dataset '{cells.dataset}' has no domain column (obs.domain is empty for every cell); "
                "give the manifest a 'domain' column (e.g. the site or scanner) and extract again"
            )
        unknown = [d for d in train + test if d not in present]
        if unknown:
            raise ProbeError(f"unknown domain(s) {', '.join(unknown)}; the store has: {', '.join(present)}")
        both = sorted(set(train) & set(test))
        if both:
            raise ProbeError(f"domain(s) {', '.join(both)} are both training and test domains; a domain is one or the other")
        if not test:
            test = [d for d in present if d not in train]
            if not test:
                raise ProbeError(f"every domain ({', '.join(present)}) is a training domain: nothing is left to test on")
        return cls(train, test, np.isin(dom, train), {d: dom == d for d in test})


def _evaluations(sp: Split, plan: DomainPlan | None, labels: np.ndarray, notes: list[str]):
    """``[(test_domain, in_domain, positions, classes)]`` for one split: the split's own test cells,
    then, in a domain study, every cell of each test domain whose class the probes were trained on."""
    if plan is None:
        return [("", True, sp.test, sp.classes)]
    out = [(plan.train_name, True, sp.test, sp.classes)]
    for d, mask in plan.test_masks.items():
        pos = np.flatnonzero(mask & np.isin(labels, sp.classes))
        present = set(labels[pos])
        classes = [c for c in sp.classes if c in present]
        unseen = sorted(set(labels[mask]) - set(sp.classes))
        if unseen:
            notes.append(f"domain {d}: {int(np.isin(labels[mask], unseen).sum())} cells of class(es) "
                         f"{', '.join(unseen)} not scored (no training cells of that class in {plan.train_name})")
        if len(classes) < 1:
            notes.append(f"domain {d}: no cell of a trained class; not scored")
            continue
        out.append((d, False, pos, classes))
    return out


def _study(kind, name, params, cells: Cells, limits, seeds, probe_list, split, val, test_size, device, out, quiet,
           show, plan: DomainPlan | None = None):
    from . import report

    inside = np.flatnonzero(plan.train_mask) if plan is not None else np.arange(len(cells.obs))
    if len(inside) == 0:
        raise ProbeError(f"no usable cell in training domain(s) {plan.train_name}")
    sampler = Sampler(
        cells.labels[inside], split, groups=cells.obs["group"].to_numpy()[inside],
        split_column=cells.obs["split"].to_numpy()[inside], val=val, test_size=test_size,
    )
    splits = {k: _lift(sp, inside) for k, sp in sampler.check_limits(limits, seeds).items()}  # bad limits fail here
    notes = _notes(cells, sampler, splits)
    evals = {k: _evaluations(sp, plan, cells.labels, notes) for k, sp in splits.items()}
    notes[:] = list(dict.fromkeys(notes))
    rows: list[dict] = []
    confusion: list[dict] = []
    fits: list[dict] = []
    needed = np.unique(np.concatenate([sp.train for sp in splits.values()]
                                      + [e[2] for ev in evals.values() for e in ev]))
    n_fits = len(cells.backbones) * len(splits) * len(probe_list)
    train_domain = plan.train_name if plan is not None else ""
    with report.progress(n_fits, quiet) as advance:
        for backbone in cells.backbones:
            x_all = cells.features(backbone, needed)  # only the rows some split uses
            rows_of = lambda pos: x_all[np.searchsorted(needed, pos)]  # noqa: E731
            for (limit, seed), sp in splits.items():
                x_tr, y_tr = rows_of(sp.train), cells.labels[sp.train]
                x_tests = [rows_of(pos) for _, _, pos, _ in evals[(limit, seed)]]  # once per split, for every probe
                for probe in probe_list:
                    advance(f"{backbone} · {probe} · {'all' if limit is None else limit} · seed {seed}")
                    preds, seconds, info = _fit_predict(probe, seed, device, x_tr, y_tr, x_tests, backbone, sp)
                    fits.append(dict(backbone=backbone, probe=probe, limit=limit, seed=seed, n_train=len(sp.train),
                                     seconds=seconds, **info))
                    for (test_domain, in_domain, pos, classes), pred in zip(evals[(limit, seed)], preds):
                        sc = score(cells.labels[pos], pred, classes)
                        base = dict(
                            study=name, dataset=cells.dataset, backbone=backbone,
                            feature_key=cells.feature_key(backbone), pool=cells.pool, probe=probe, limit=limit,
                            seed=seed, split=split, train_domain=train_domain, test_domain=test_domain,
                            in_domain=in_domain, n_train=len(sp.train), n_test=len(pos), n_classes=len(classes),
                        )
                        extra = dict(seconds=seconds, exceeds_data=sp.exceeds_data)
                        rows += [{**base, "metric": m, "class": "", "value": v, **extra} for m, v in sc.values.items()]
                        rows += [{**base, "metric": CLASS_METRIC, "class": c, "value": v, **extra}
                                 for c, v in sc.class_f1.items()]
                        keys = {k: base[k] for k in ("backbone", "probe", "limit", "seed", "test_domain")}
                        for i, t in enumerate(sc.classes):
                            for j, p in enumerate(sc.classes):
                                confusion.append({**keys, "true": t, "pred": p, "count": int(sc.confusion[i, j])})
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    results["limit"] = results["limit"].astype("Int64")
    conf = pd.DataFrame(confusion, columns=["backbone", "probe", "limit", "seed", "test_domain", "true", "pred", "count"])
    conf["limit"] = conf["limit"].astype("Int64")
    fit_table = pd.DataFrame(fits, columns=FIT_COLUMNS)
    for col in ("limit", "n_iter", "exact_fallbacks"):
        fit_table[col] = fit_table[col].astype("Int64")
    unconverged = fit_table[fit_table["converged"] == False]  # noqa: E712 - None (not an iterative probe) is not False
    if len(unconverged):
        notes.append(f"{len(unconverged)} of {len(fit_table)} fits stopped at their iteration limit before meeting "
                     "the stopping rule (converged = False in fits.csv): "
                     + ", ".join(sorted({f"{b} · {p}" for b, p in zip(unconverged["backbone"], unconverged["probe"])})))
    curves = report.summarize(results)
    summary = report.limit_reaching(curves, params.get("fraction", 0.95)) if kind == "scale" else report.eval_summary(curves)
    result = StudyResult(
        kind, name, params, results, curves, summary, _exclusions(cells, sampler, splits), conf, notes,
        domains=report.domain_gaps(curves) if plan is not None else None, splits=splits, evaluations=evals,
        fits=fit_table,
    )
    result.out = Path(out) if out is not None else Path(name)
    result.files = report.write_outputs(result)
    if show or (show is None and not quiet):
        report.print_result(result)
    return result


def _lift(sp: Split, inside: np.ndarray) -> Split:
    """A split made over a subset of the cells, with positions mapped back to all usable cells."""
    sp.train, sp.test = inside[sp.train], inside[sp.test]
    return sp


def fit_info(est) -> dict:
    """What a fitted probe chose and how its solver ended (None where the probe has no such thing):
    ``C`` and ``val_f1`` (the sweep's hold-out macro-F1 per C, as JSON), ``n_iter``, ``converged``,
    ``precision``, ``backend``, ``exact_fallbacks`` (kNN queries re-searched exactly)."""
    info = {}
    for attr in FIT_ATTRS:
        v = getattr(est, attr, None)
        if isinstance(v, dict):
            v = json.dumps({str(k): round(float(x), 6) for k, x in v.items()})
        elif hasattr(v, "item"):  # numpy scalar or 0-d torch tensor
            v = v.item()
        info[attr.rstrip("_")] = v
    return info


def _fit_predict(probe, seed, device, x_tr, y_tr, x_tests, backbone, sp: Split):
    """Fit one probe and predict each test matrix; seconds cover the fit and every prediction.
    Returns ``(predictions, seconds, fit_info(estimator))``."""
    from .heads import make_probe

    where = f"probe '{probe}' on {backbone}" + (f" at limit {sp.limit}" if sp.limit is not None else "") + f", seed {seed}"
    try:
        est = make_probe(probe, seed=seed, device=device)
        t0 = time.perf_counter()
        est.fit(x_tr, y_tr)
        preds = [np.asarray(est.predict(x)).astype(str) for x in x_tests]
        seconds = time.perf_counter() - t0
        info = fit_info(est)
    except ProbeError:
        raise
    except Exception as e:  # a library failing deep inside: say where, keep the cause
        raise ProbeError(f"{where} failed ({len(y_tr)} training cells, {len(sp.classes)} classes): "
                         f"{type(e).__name__}: {e}") from e
    return preds, seconds, info


def _check_probes(probes) -> list[str]:
    try:
        from .heads import PROBES
    except ImportError as e:
        raise ProbeError(f"the probe heads (probes.heads) cannot be imported: {e}") from e
    names = parse_names(probes)
    if not names:
        raise ProbeError(f"no probe given; choose from {', '.join(PROBES)}")
    unknown = [p for p in names if p not in PROBES]
    if unknown:
        raise ProbeError(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    return names


def _study_name(kind: str, parts: Sequence[str], out) -> str:
    if out is not None:
        return Path(out).name
    slug = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") for p in parts)
    return f"{kind}-{slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _notes(cells: Cells, sampler: Sampler, splits: dict) -> list[str]:
    notes = cells.exclusion_lines()
    if sampler.mode == "column" and sampler.unassigned:
        notes.append(f"{sampler.unassigned} cells excluded: split column neither train"
                     f"{'/val' if sampler.val == 'train' else ''} nor test")
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
            notes.append(f"limit {limit} (FlagMin {flag_min(limit)}): class(es) excluded: "
                         + "; ".join(f"{c} ({why})" for c, why in sp.excluded.items()))
        if sp.exceeds_data and ("exceeds", limit) not in seen:
            seen.add(("exceeds", limit))
            notes.append(f"limit {limit} >= the largest class ({sp.largest_class} cells): no class is capped, "
                         "the set is the full data")
    return notes


def _exclusions(cells: Cells, sampler: Sampler, splits: dict) -> pd.DataFrame:
    rows = []
    for key, n in cells.excluded.items():
        rows.append(dict(limit=None, seed=None, **{"class": ""}, cells=n,
                         reason=exclusion_reason(key)))
    if sampler.mode == "column":
        rows.append(dict(limit=None, seed=None, **{"class": ""}, cells=sampler.unassigned, reason="split column neither train nor test"))
    counts = pd.Series(cells.labels).value_counts()
    for (limit, seed), sp in splits.items():
        for c, why in sp.excluded.items():
            rows.append(dict(limit=limit, seed=seed, **{"class": c}, cells=int(counts.get(c, 0)), reason=why))
    df = pd.DataFrame(rows, columns=["limit", "seed", "class", "cells", "reason"])
    df["limit"] = df["limit"].astype("Int64")
    df["seed"] = df["seed"].astype("Int64")
    return df
