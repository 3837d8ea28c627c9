"""Probe studies on a feature store: :func:`scale` (FlagLimit curves) and :func:`evaluate` (one fit).

Both read the store through :mod:`probes.data`, split through :mod:`probes.sampling`, fit the
heads of :mod:`probes.heads`, score with :mod:`probes.metrics` and write through
:mod:`probes.report`. Every backbone of a study is scored on the same splits (same cells).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .data import Cells, ProbeError, open_cells, parse_names
from .metrics import CLASS_METRIC, score
from .sampling import TEST_SIZE, Sampler, Split, flag_min, parse_limits, parse_seeds

RESULT_COLUMNS = [
    "study", "dataset", "backbone", "feature_key", "pool", "probe", "limit", "seed", "split",
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
    confusion: pd.DataFrame  # long: one row per fit x true class x predicted class
    notes: list[str] = field(default_factory=list)
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
    return _study("scale", name, params, cells, limit_list, seed_list, probe_list, split, val, test_size, device, out, quiet,
                  show)


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
    quiet: bool = False,
    show: bool | None = None,
) -> StudyResult:
    """One fit per backbone x probe x seed on the full training split (no cap, no FlagMin).

    Same splits and outputs as :func:`scale` (``limit`` is empty), plus a confusion-matrix
    PNG per backbone x probe; default ``out`` is ``eval-<models>-<probe>-<date>``.
    """
    seed_list = parse_seeds(seeds)
    cells = open_cells(store, model, dataset=dataset, pool=pool)
    probe_list = _check_probes(probe)
    name = _study_name("eval", cells.backbones + probe_list, out)
    params = dict(
        store=str(cells.store_url), dataset=cells.dataset, model=cells.backbones, probe=probe_list,
        seeds=seed_list, split=split, val=val, pool=pool, device=device, test_size=test_size,
    )
    return _study("evaluate", name, params, cells, [None], seed_list, probe_list, split, val, test_size, device, out, quiet,
                  show)


# -- the shared loop ----------------------------------------------------------------------------
def _study(kind, name, params, cells: Cells, limits, seeds, probe_list, split, val, test_size, device, out, quiet,
                  show):
    from . import report

    sampler = Sampler(
        cells.labels, split, groups=cells.obs["group"].to_numpy(), split_column=cells.obs["split"].to_numpy(),
        val=val, test_size=test_size,
    )
    splits = sampler.check_limits(limits, seeds)  # every bad limit fails here, before any fit
    notes = _notes(cells, sampler, splits)
    rows: list[dict] = []
    confusion: list[dict] = []
    needed = np.unique(np.concatenate([np.concatenate([s.train, s.test]) for s in splits.values()]))
    n_fits = len(cells.backbones) * len(splits) * len(probe_list)
    with report.progress(n_fits, quiet) as advance:
        for backbone in cells.backbones:
            x_all = cells.features(backbone, needed)  # only the rows some split uses
            for (limit, seed), sp in splits.items():
                x_tr, x_te = x_all[np.searchsorted(needed, sp.train)], x_all[np.searchsorted(needed, sp.test)]
                y_tr, y_te = cells.labels[sp.train], cells.labels[sp.test]
                for probe in probe_list:
                    advance(f"{backbone} · {probe} · {'all' if limit is None else limit} · seed {seed}")
                    pred, seconds = _fit_predict(probe, seed, device, x_tr, y_tr, x_te, backbone, sp)
                    sc = score(y_te, pred, sp.classes)
                    base = dict(
                        study=name, dataset=cells.dataset, backbone=backbone, feature_key=cells.feature_key(backbone),
                        pool=cells.pool, probe=probe, limit=limit, seed=seed, split=split, n_train=len(sp.train),
                        n_test=len(sp.test), n_classes=len(sp.classes),
                    )
                    extra = dict(seconds=seconds, exceeds_data=sp.exceeds_data)
                    rows += [{**base, "metric": m, "class": "", "value": v, **extra} for m, v in sc.values.items()]
                    rows += [{**base, "metric": CLASS_METRIC, "class": c, "value": v, **extra} for c, v in sc.class_f1.items()]
                    for i, t in enumerate(sc.classes):
                        for j, p in enumerate(sc.classes):
                            confusion.append({**{k: base[k] for k in ("backbone", "probe", "limit", "seed")},
                                              "true": t, "pred": p, "count": int(sc.confusion[i, j])})
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    results["limit"] = results["limit"].astype("Int64")
    conf = pd.DataFrame(confusion, columns=["backbone", "probe", "limit", "seed", "true", "pred", "count"])
    conf["limit"] = conf["limit"].astype("Int64")
    curves = report.summarize(results)
    summary = report.limit_reaching(curves, params.get("fraction", 0.95)) if kind == "scale" else report.eval_summary(curves)
    result = StudyResult(
        kind, name, params, results, curves, summary, _exclusions(cells, sampler, splits), conf, notes,
    )
    result.out = Path(out) if out is not None else Path(name)
    result.files = report.write_outputs(result)
    if show or (show is None and not quiet):
        report.print_result(result)
    return result


def _fit_predict(probe, seed, device, x_tr, y_tr, x_te, backbone, sp: Split):
    from .heads import make_probe

    where = f"probe '{probe}' on {backbone}" + (f" at limit {sp.limit}" if sp.limit is not None else "") + f", seed {seed}"
    try:
        est = make_probe(probe, seed=seed, device=device)
        t0 = time.perf_counter()
        est.fit(x_tr, y_tr)
        pred = np.asarray(est.predict(x_te)).astype(str)
        seconds = time.perf_counter() - t0
    except ProbeError:
        raise
    except Exception as e:  # a library failing deep inside: say where, keep the cause
        raise ProbeError(f"{where} failed ({len(y_tr)} training cells, {len(sp.classes)} classes): "
                         f"{type(e).__name__}: {e}") from e
    return pred, seconds


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
                         reason=key.replace("not_ok:", "unreadable for ").replace("no_label", "no label")))
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
