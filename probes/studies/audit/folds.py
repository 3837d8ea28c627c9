"""Folds and out-of-fold probabilities of the label audit: every cell predicted by probes fit on
folds without it (group-aware when the cells have groups), and the digests that key them in the cache."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError

SCHEMES = ("auto", "group", "stratified")


def label_digest(
    ids: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None = None,
) -> str:
    """sha256 (16 hex) of the cell ids, labels and groups, in order: what the folds and fits depend on."""
    h = hashlib.sha256()
    for col in (ids, labels, groups if groups is not None else []):
        h.update("\x1f".join(map(str, col)).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def feature_digest(x: Any) -> str:
    """sha256 (16 hex) of a feature matrix as float32 (shape included); an out-of-core matrix
    (:class:`probes.features.chunked.ChunkedRows`) is read block by block, to the same digest."""
    from probes.features.chunked import is_chunked

    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    if is_chunked(x):
        for start in range(0, len(x), x.block_rows):
            h.update(np.ascontiguousarray(x.read(np.arange(start, min(len(x), start + x.block_rows)))).data.cast("B"))
    else:
        h.update(np.ascontiguousarray(x, dtype=np.float32).data.cast("B"))
    return h.hexdigest()[:16]


def _has_groups(groups: Sequence[str] | np.ndarray | None) -> bool:
    if groups is None:
        return False
    g = pd.Series(np.asarray(groups, dtype=object)).fillna("").astype(str).str.strip()
    return bool((g != "").any())


def make_folds(
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    n_folds: int,
    seed: int,
    scheme: str = "auto",
) -> tuple[np.ndarray, str]:
    """Fold number (0..n_folds-1) of every cell and the scheme used (``group`` or ``stratified``).

    ``scheme="auto"``: ``group`` when ``groups`` has any value, else ``stratified``. Under
    ``group`` no group is split across folds (cells with an empty group are each their own
    group); fewer groups than folds is an error, never a silent switch to ``stratified``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if scheme not in SCHEMES:
        raise ProbeError(f"unknown fold scheme '{scheme}'; use one of {', '.join(SCHEMES)}")
    y = np.asarray(labels, dtype=str)
    if n_folds < 2:
        raise ProbeError(f"--folds must be at least 2, got {n_folds}")
    if len(y) < n_folds:
        raise ProbeError(f"{len(y)} cells are too few for {n_folds} folds")
    classes, counts = np.unique(y, return_counts=True)
    if counts.max() < n_folds:
        raise ProbeError(
            f"every class has fewer cells than --folds {n_folds} (the largest, {classes[counts.argmax()]!r}, has "
            f"{counts.max()}): a label audit compares each cell with other cells of its class; label at least "
            f"{n_folds} cells of a class, or use fewer folds"
        )
    if scheme == "auto":
        scheme = "group" if _has_groups(groups) else "stratified"
    fold = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits"
        if scheme == "group":
            if not _has_groups(groups):
                raise ProbeError(
                    "fold scheme 'group' needs a group column with values (the store's obs.group is empty)"
                )
            g = pd.Series(np.asarray(groups, dtype=object)).fillna("").astype(str).str.strip().to_numpy(dtype=object)
            empty = g == ""
            g[empty] = [f"\x00cell{i}" for i in np.flatnonzero(empty)]
            n_groups = len(pd.unique(g))
            if n_groups < n_folds:
                raise ProbeError(
                    f"only {n_groups} groups for {n_folds} group-aware folds; use --folds {max(n_groups, 2)} "
                    "or --folds-by stratified (cells of one group then land in different folds)"
                )
            splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y, g)
        else:
            splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(y, y)
        for f, (_, test) in enumerate(splits):
            fold[test] = f
    if (fold < 0).any():  # pragma: no cover - sklearn's splitters partition the cells
        raise ProbeError("internal error: some cells got no fold")
    return fold, scheme


def probe_signature(name: str, make_probe: Callable[..., Any]) -> str:
    """What identifies probe ``name``'s fits in the cache: its class and parameters (seed and
    device left out), so changing a head's defaults invalidates the cached predictions."""
    est = make_probe(name, seed=0, device="cpu")
    params = (
        {k: v for k, v in est.get_params(deep=False).items() if k not in ("seed", "device", "random_state")}
        if hasattr(est, "get_params")
        else {}
    )
    text = f"{type(est).__module__}.{type(est).__qualname__}:{sorted((k, repr(v)) for k, v in params.items())}"
    return f"{type(est).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def oof_proba(
    x: Any,
    labels: np.ndarray,
    fold: np.ndarray,
    classes: Sequence[str],
    make: Callable[[], Any],
    name: str = "probe",
) -> np.ndarray:
    """(N, C) out-of-fold probabilities: fold ``f`` is predicted by a probe fit on every other fold.

    A class absent from a fold's training cells gets probability 0 for that fold's cells. ``x`` may be
    read out of core (:class:`probes.features.chunked.ChunkedRows`): kNN and logistic (``name``) fit it there.
    """
    from probes.features.chunked import predict_blocks, proba_blocks
    from probes.heads.rows import for_rows

    idx = {c: i for i, c in enumerate(classes)}
    proba = np.full((len(labels), len(classes)), np.nan, dtype=np.float32)
    for f in np.unique(fold):
        test, train = fold == f, fold != f
        est = for_rows(make(), name, x[train])
        est.fit(x[train], labels[train])
        cols = [idx[str(c)] for c in est.classes_]
        if hasattr(est, "predict_proba"):
            p = np.asarray(proba_blocks(est, x[test]), dtype=np.float32)
        else:  # a probe without probabilities votes with its prediction
            pred = np.asarray(predict_blocks(est, x[test])).astype(str)
            p = (pred[:, None] == np.asarray(est.classes_, dtype=str)[None]).astype(np.float32)
        block = np.zeros((int(test.sum()), len(classes)), dtype=np.float32)
        block[:, cols] = p
        proba[test] = block
    if not np.isfinite(proba).all():
        raise ProbeError("the probe returned NaN or inf probabilities")
    return proba


@dataclass
class OOF:
    """Out-of-fold probabilities of one model (backbone x probe x seed) for every cell."""

    key: dict[str, Any]  # the KEY_COLUMNS values
    classes: list[str]
    proba: np.ndarray  # (N, C) float32, columns in the order of ``classes``
    fold: np.ndarray  # (N,) the fold that predicted each cell

    @property
    def name(self) -> str:
        return f"{self.key['backbone']}|{self.key['probe']}|{self.key['seed']}"
