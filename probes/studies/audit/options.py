"""How an audit runs, declared once (:class:`AuditOptions`): ``probes audit`` builds its flags from these
fields, and :func:`probes.audit` / :func:`probes.audit_arrays` take the object or any field as a keyword."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from embedcache.options import Interval, OneOf, Options, option
from probes.errors import ProbeError
from probes.studies.audit.data_issues import DEFAULT_K, DEFAULT_THRESHOLD
from probes.studies.audit.folds import SCHEMES
from probes.studies.audit.issues import LEAK_SPLITS
from probes.studies.audit.ranking import Ranking

__all__ = ["AuditOptions", "DEFAULT_PROBES"]

DEFAULT_PROBES = "knn"
# the ensemble the audit shipped with before the four-set benchmark chose by cost (~20 min where cleanlab on
# scikit-learn out-of-fold logistic took 1-2 min, 2,000 real cells): --probes logistic,knn,mlp --seeds 3 --joint


@dataclass(frozen=True)
class AuditOptions(Options):
    """How an audit runs; every field is also a keyword of :func:`audit` and :func:`audit_arrays`.

    ``folds_by``: fold scheme, ``auto`` (group-aware when the cells have groups), ``group`` or
    ``stratified``. ``cache``: Parquet file of out-of-fold probabilities read first and updated
    after (None: the default beside the store for :func:`audit`, none for :func:`audit_arrays`; False:
    none); ``cache_lock()`` is held while it is written and ``cache_legacy`` is read when ``cache`` does not
    exist yet. ``make_probe(name, seed=, device=)`` replaces :func:`probes.heads.make_probe`; ``threads``
    caps BLAS/OpenMP/torch threads during the fits. ``ranking``: how the evidence becomes the score (a
    :class:`~.ranking.Ranking` or its name such as ``cal|all|n0.2|c0``; None: :data:`~.ranking.DEFAULT_RANKING`,
    chosen by the label-noise benchmark). ``joint``: add the **joint member** to the ensemble, per seed: one
    plain logistic regression (``C = 1``, scikit-learn's default strength, no sweep) on every backbone's
    features side by side (:data:`JOINT_PROBE`; with one backbone, on its features).

    The defaults (kNN, 3 seeds, no joint member) are what ``benchmarks/label_noise.py`` chose on four real
    cell sets among the members costing at most 3x cleanlab on scikit-learn's out-of-fold logistic; the
    earlier, larger ensemble is ``probes="logistic,knn,mlp", seeds=3, joint=True``
    (``--probes logistic,knn,mlp --seeds 3 --joint``).
    """

    error = ProbeError

    probes: str | Sequence[str] = option(DEFAULT_PROBES, "probe or comma list of probes", flags=("--probes", "--probe"))
    folds: int = option(
        5, "out-of-fold folds (group-aware when the store's group column has values)", check=Interval(int, 2)
    )
    seeds: int | str | Sequence[int] = option(3, "a count N (seeds 42..42+N-1) or a comma list of seeds")
    folds_by: str = option(
        "auto",
        "fold scheme: auto (group-aware when obs.group has values), group, stratified",
        flags=("--folds-by",),
        check=OneOf(SCHEMES),
    )
    k: int = option(
        10, "neighbours per cell for the neighbour-disagreement evidence", flags=("-k", "--k"), check=Interval(int, 1)
    )
    ranking: Ranking | str | None = option(
        None,
        "score: calibration|order|neighbour weight|consensus weight[|margin share], e.g. 'cal|all|n0.2|c0' "
        "or 'raw|all|n0.2|c0.15|m0.2' (default: the one the label-noise benchmark chose)",
    )
    joint: bool = option(
        False,
        "add the joint member: a plain logistic (C=1) on every backbone's features side by side, per seed",
        flags=("--joint/--no-joint",),
    )
    top: int = option(50, "suspects in the report, contact sheet and corrections template", check=Interval(int, 1))
    html: bool = option(True, "write report.html", flags=("--html/--no-html",))
    map_tab: bool = option(
        False,
        "add a Map tab to report.html: the first backbone's cells laid out by t-SNE (probes map), coloured by label "
        "and audit suspicion, with thumbnails and neighbours (t-SNE adds ~5 s per 1,000 cells on two cores)",
        flags=("--map/--no-map",),
    )
    cache: str | os.PathLike | bool | None = option(
        None,
        "out-of-fold cache file (default: beside the store, <store>.embedcache/probes/audit-oof-<dataset>.parquet)",
    )
    threads: int | None = option(
        None,
        "BLAS/OpenMP/torch threads for the probe fits (default: the library's; 1 is often much faster on small "
        "or shared CPUs)",
        check=Interval(int, 1),
    )
    issues: str | Sequence[str] = option(
        "all", "what to audit: label,duplicate,leak,outlier (any subset; default all)", flags=("--issues",)
    )
    duplicate_threshold: float = option(
        DEFAULT_THRESHOLD,
        "near-duplicates: cosine similarity at or above which two cells are one (0, 1]",
        check=Interval(float, 0.0, 1.0, open_low=True, none_ok=False),
    )
    outlier_k: int = option(
        DEFAULT_K, "outliers: neighbours per cell of the kNN distance", check=Interval(int, 1, none_ok=False)
    )
    leak_split: str = option(
        "auto",
        "leaks: the split they cross: column (the store's split column), group or stratified (seed 42, 20% test), "
        "auto (column when it has test cells, else group when cells have groups, else stratified)",
        flags=("--split",),
        check=OneOf(LEAK_SPLITS),
    )
    cache_lock: Callable[[], Any] | None = option(None, cli=False)
    cache_legacy: str | None = option(None, cli=False)
    make_probe: Callable[..., Any] | None = option(None, cli=False)
