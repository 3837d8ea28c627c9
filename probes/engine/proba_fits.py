"""Probes fitted on part of each split's training cells, giving class probabilities on the rest of the
training cells (the *validation part*) and on the test cells: the loop of the ``ensemble``,
``calibrate`` and ``selective`` studies, whose choices (confusion pairs, temperature, threshold) are
made on validation cells and only reported on test cells.

:func:`held_out_splits` makes the uncapped split per seed (:class:`probes.sampling.Sampler`, as
``evaluate``) and cuts its training cells into a fit part and a stratified, seeded ``val_fraction``
validation part (every class keeps a fit cell); :func:`fit_probas` plans one
:class:`probes.engine.skeleton.FitJob` per backbone x seed x probe and runs them under the one progress bar,
returning :class:`FittedProba` (probabilities with columns in the split's class order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from probes.engine.skeleton import FitJob, Fitted, fit_info
from probes.engine.split_fits import split_exclusions, split_notes
from probes.errors import ProbeError
from probes.features.cells import Cells
from probes.reporting.console import mean_std, progress
from probes.sampling import Sampler, Split

VAL_FRACTION = 0.2


@dataclass
class HeldOut:
    """One seed's split: ``fit`` and ``val`` (positions into the usable cells) partition ``split.train``."""

    split: Split
    fit: np.ndarray
    val: np.ndarray

    @property
    def seed(self) -> int:
        return self.split.seed

    @property
    def test(self) -> np.ndarray:
        return self.split.test

    @property
    def classes(self) -> list[str]:
        return self.split.classes


@dataclass
class FittedProba(Fitted):
    """A fit's labels and probabilities on ``[validation part, test cells]`` (columns: ``job.tag.classes``)."""

    probas: list[np.ndarray] = field(default_factory=list)


def held_out_splits(
    cells: Cells, seeds: Sequence[int], *, split: str, val: str, test_size: float, val_fraction: float
) -> tuple[dict[int, HeldOut], list[str], pd.DataFrame]:
    """Per seed the uncapped split and its fit / validation parts; the split notes and exclusions table."""
    from probes.heads.base import stratified_holdout

    if not 0 < val_fraction < 1:
        raise ProbeError(
            f"val_fraction must lie between 0 and 1 (the share of training cells held out for "
            f"validation), got {val_fraction}"
        )
    sampler = Sampler(
        cells.labels,
        split,
        groups=cells.obs["group"].to_numpy(),
        split_column=cells.obs["split"].to_numpy(),
        val=val,
        test_size=test_size,
    )
    splits = sampler.check_limits([None], seeds)
    notes = split_notes(cells, sampler, splits)
    held: dict[int, HeldOut] = {}
    for (_, seed), sp in splits.items():
        codes = class_codes(cells.labels[sp.train], sp.classes)
        fit, v = stratified_holdout(codes, val_fraction, seed)
        if len(v) == 0:
            raise ProbeError(
                f"seed {seed}: no training cell left for the validation part ({len(sp.train)} training "
                "cells); use more cells or a larger val_fraction"
            )
        held[seed] = HeldOut(sp, sp.train[fit], sp.train[v])
    return held, notes, split_exclusions(cells, sampler, splits)


def _constructor(make_probe: Callable[..., Any] | None) -> Callable[..., Any]:
    if make_probe is not None:
        return make_probe
    from probes.heads import make_probe as default

    return default


def require_probabilities(
    probes: Sequence[str], make_probe: Callable[..., Any] | None = None, *, what: str = "this study"
) -> None:
    """Refuse, before any fit, a probe that gives no class probabilities (no ``predict_proba``)."""
    ctor = _constructor(make_probe)
    for name in probes:
        est = ctor(name, seed=0, device="cpu")
        if not callable(getattr(est, "predict_proba", None)):
            raise ProbeError(
                f"probe '{name}' gives no class probabilities (no predict_proba); {what} needs them: "
                "use a probe that has them (logistic, knn, mlp, cosine, svm...)"
            )


def proba_columns(est: Any, classes: Sequence[str]) -> np.ndarray:
    """Column of ``est.predict_proba`` for each of ``classes`` (every class must be one the probe saw)."""
    order = {str(c): i for i, c in enumerate(np.asarray(est.classes_).tolist())}
    missing = [c for c in classes if c not in order]
    if missing:
        raise ProbeError(f"the fitted probe has no column for class(es) {', '.join(missing)}")
    return np.array([order[c] for c in classes], dtype=np.int64)


def fit_proba(job: FitJob, device: str = "auto", make_probe: Callable[..., Any] | None = None) -> FittedProba:
    """Fit ``job``'s probe, then labels and probabilities of each test matrix (seconds cover all).

    A failure deep inside a library becomes a :class:`ProbeError` naming the fit (cause kept).
    """
    from probes.features.chunked import is_chunked, predict_blocks, proba_blocks
    from probes.heads.rows import for_rows

    where = f"probe '{job.probe}' on {job.backbone}, seed {job.seed}"
    classes = job.tag.classes
    try:
        est = for_rows(_constructor(make_probe)(job.probe, seed=job.seed, device=device), job.probe, job.x_train)
        if not callable(getattr(est, "predict_proba", None)):
            raise ProbeError(f"probe '{job.probe}' gives no class probabilities (no predict_proba)")
        t0 = time.perf_counter()
        est.fit(job.x_train, job.y_train)
        cols = proba_columns(est, classes)
        probas = [np.asarray(proba_blocks(est, x), dtype=np.float64)[:, cols] for x in job.x_tests]
        preds = [np.asarray(predict_blocks(est, x)).astype(str) for x in job.x_tests]
        seconds = time.perf_counter() - t0
        info = fit_info(est)
        info["features"] = "out-of-core" if is_chunked(job.x_train) else "in-memory"
    except ProbeError:
        raise
    except Exception as e:  # a library failing deep inside: say where, keep the cause
        raise ProbeError(
            f"{where} failed ({len(job.y_train)} training cells, {job.n_classes} classes): {type(e).__name__}: {e}"
        ) from e
    return FittedProba(job, preds, seconds, info, probas=probas)


def fit_probas(
    cells: Cells,
    held: dict[int, HeldOut],
    probes: Sequence[str],
    *,
    device: str = "auto",
    quiet: bool = False,
    make_probe: Callable[..., Any] | None = None,
) -> Iterator[FittedProba]:
    """Every probe on every backbone x seed: fitted on the fit part, predicting the validation part and
    the test cells (features read once per backbone, matrices once per seed). Under ``--scheduler``
    (:func:`probes.engine.dask_fits.current_scheduler`) each fit is a Dask task; results come back in the same order."""
    from probes.engine.dask_fits import current_scheduler, run_on_dask

    total = len(cells.backbones) * len(held) * len(probes)
    scheduler = current_scheduler()
    with progress(total, quiet) as advance:
        if scheduler:
            jobs = _jobs(cells, held, probes)
            yield from run_on_dask(
                jobs, scheduler, device=device, make_probe=make_probe, advance=advance, fit=fit_proba, ship_tag=True
            )
            return
        for job in _jobs(cells, held, probes):
            advance(job.label)
            yield fit_proba(job, device, make_probe)


def _jobs(cells: Cells, held: dict[int, HeldOut], probes: Sequence[str]) -> Iterator[FitJob]:
    needed = np.unique(np.concatenate([np.r_[h.split.train, h.test] for h in held.values()]))
    for backbone in cells.backbones:
        x_all = cells.features(backbone, needed)

        def rows_of(pos: np.ndarray, x_all: np.ndarray = x_all) -> np.ndarray:
            return x_all[np.searchsorted(needed, pos)]

        for h in held.values():
            x_fit, y_fit = rows_of(h.fit), cells.labels[h.fit]
            x_tests = [rows_of(h.val), rows_of(h.test)]
            for probe in probes:
                yield FitJob(backbone, probe, h.seed, x_fit, y_fit, x_tests, n_classes=len(h.classes), tag=h)


def class_codes(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Integer codes of ``labels`` in ``classes`` (columns of the aligned probabilities)."""
    order = {c: i for i, c in enumerate(classes)}
    return np.array([order[c] for c in np.asarray(labels).astype(str).tolist()], dtype=np.int64)


def base_row(name: str, cells: Cells, fitted: FittedProba, split: str) -> dict[str, Any]:
    """The keys every tidy row of a held-out study starts with."""
    job, h = fitted.job, fitted.job.tag
    return dict(
        study=name,
        dataset=cells.dataset,
        backbone=job.backbone,
        feature_key=cells.feature_key(job.backbone),
        pool=cells.pool_of(job.backbone),
        probe=job.probe,
        seed=job.seed,
        split=split,
        n_fit=len(h.fit),
        n_val=len(h.val),
        n_test=len(h.test),
        n_classes=len(h.classes),
    )


def score_rows(
    base: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], **key: Any
) -> list[dict[str, Any]]:
    """Tidy rows of every metric of :func:`probes.metrics.score` (accuracy, macro and weighted P/R/F1...)
    and the per-class F1 (``class_f1``), each ``{**base, **key, metric, class, value}``."""
    from probes.metrics import CLASS_METRIC, score

    sc = score(y_true, y_pred, classes)
    rows = [{**base, **key, "metric": m, "class": "", "value": v} for m, v in sc.values.items()]
    rows += [{**base, **key, "metric": CLASS_METRIC, "class": c, "value": v} for c, v in sc.class_f1.items()]
    return rows


def seed_summary(results: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean and std (sample std; 0 with one seed) of ``value`` over seeds per ``keys`` x metric x class."""
    by = [*keys, "metric", "class"]
    out = (
        results.groupby(by, sort=False, dropna=False)
        .agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    out["std"] = out["std"].fillna(0.0)
    return out


def pm(mean: float, std: float, n_seeds: int, digits: int = 3) -> str:
    """``mean±std`` (just the mean with one seed; ``-`` for NaN): :func:`probes.reporting.console.mean_std`."""
    return mean_std(mean, std, n_seeds, digits)


def slug(s: str) -> str:
    """``s`` safe in a file name."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in str(s))
