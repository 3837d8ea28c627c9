"""Exact cosine search over rows read from the store block by block (out-of-core kNN).

A FAISS ``IndexFlatIP`` per database block, each query's candidates re-scored pair by pair
(:func:`probes.search.vectors.rescored_topk`) and merged across blocks into the exact global top-k
(:func:`merge_topk`); among equal similarities the lower row position wins, so the answer does not depend
on how the search was cut into blocks. :func:`all_neighbors` is the audit's form.
"""

from __future__ import annotations

import numpy as np

from probes.errors import ProbeError
from probes.features.chunked import ChunkedRows
from probes.search.vectors import RESCORE_EXTRA, l2_normalize, rescored_topk


def merge_topk(
    sims: np.ndarray, idx: np.ndarray, more_sims: np.ndarray, more_idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two candidate lists per query (q, *), best first; equal similarities go
    lower index first (invalid entries: similarity -inf)."""
    S = np.concatenate([sims, more_sims], axis=1)
    I = np.concatenate([idx, more_idx], axis=1)  # noqa: E741
    order = np.lexsort((I, -S))[:, :k]  # by similarity descending, then index ascending
    return np.take_along_axis(S, order, 1), np.take_along_axis(I, order, 1)


def exact_search(
    queries: np.ndarray,
    database: ChunkedRows,
    k: int,
    exclude: np.ndarray | None = None,
    normalized: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` of each query among the rows of ``database``, read block by block:
    ``(sims (q, k) float32, positions (q, k) int64)``, best first.

    ``queries`` (q, d) are L2-normalised here (unless ``normalized`` says they are); each database
    block is normalised, indexed in a FAISS ``IndexFlatIP`` and searched, and every query's answers
    are merged with those of the blocks before (:func:`merge_topk`): the result is the exact global
    top-k, ties to the lower position. ``exclude[i]`` (a position or -1) leaves that row out of
    query ``i``'s answer (the query itself); missing answers are position -1, similarity NaN."""
    import faiss

    Q = np.ascontiguousarray(queries, dtype=np.float32) if normalized else l2_normalize(np.atleast_2d(queries))
    if Q.shape[1] != database.width:
        raise ProbeError(f"queries have width {Q.shape[1]}, the database {database.width}")
    if k < 1:
        raise ProbeError(f"k must be at least 1, got {k}")
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(-1, 1)
    if ex is not None and len(ex) != len(Q):
        raise ProbeError(f"exclude has {len(ex)} entries for {len(Q)} queries")
    sims = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    idx = np.full((len(Q), 0), -1, dtype=np.int64)
    for pos, x in database.blocks():
        order = np.argsort(pos, kind="stable")  # local index order = position order (ties: lower position)
        pos, x = pos[order], x[order]
        xn = l2_normalize(x)
        index = faiss.IndexFlatIP(database.width)
        index.add(xn)
        kb = min(k + (ex is not None) + RESCORE_EXTRA, len(x))
        _, local = index.search(Q, kb)
        if ex is not None:  # the query's own row
            local = np.where(pos[local] == ex, -1, local)
        # exact similarities pair by pair, as the in-memory searches re-score theirs: the same answer
        D, I = rescored_topk(Q, xn, local, k, labels=pos[np.maximum(local, 0)])  # noqa: E741  (missing: -inf)
        sims, idx = merge_topk(sims, idx, D, I, k)
    sims = sims.copy()
    idx = idx.copy()
    missing = ~np.isfinite(sims) | (idx < 0)
    sims[missing], idx[missing] = np.nan, -1
    if sims.shape[1] < k:  # fewer rows than k
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims, idx


def all_neighbors(database: ChunkedRows, k: int, query_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's ``k`` nearest other rows (itself excluded), exact: ``(sims, positions)``, each (N, k);
    the out-of-core form of :meth:`probes.search.index.NeighborIndex.all_neighbors`. Queries go
    ``query_rows`` at a time (default: the database's block size), each batch one pass."""
    n = len(database)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for pos, x in database.blocks(query_rows):
        sims[pos], idx[pos] = exact_search(x, database, k, exclude=pos)
    return sims, idx
