"""Near-duplicate cells on cached features (the first of the data-set issues, :mod:`.data_issues`).

**Near-duplicates** (:func:`near_duplicates`). Every pair of cells with cosine >= ``threshold``, from
FAISS range searches (no ANN, no top-k cap: a cell with 500 copies has 500 pairs). Candidates come from a
slightly lower radius and are re-scored one pair at a time (:func:`probes.search.vectors.pair_dots`,
whose value depends only on the two rows, not on how the search was cut into blocks), so the in-memory
and the out-of-core searches return the same pairs with the same similarities. A pair counts when its
similarity is >= ``threshold - SIM_TOLERANCE`` (float32 round-off of a unit-vector dot product), so
``threshold=1`` finds identical features. Pairs are joined into duplicate *sets* (connected components:
union-find on the pair graph, i.e. transitively: a ~ b and b ~ c puts a, b, c in one set).

Default :data:`DEFAULT_THRESHOLD` = 0.97, measured on EfficientNet-Lite0 ImageNet features ("mean" pool)
of Chula RBC-12 (64 px JPEG q95 crops). Altered copies of 200 cells against their originals (cosine
median / share >= 0.97): identical pixels 1.000 / 100 %; re-saved as JPEG q95 or q98 0.999 / 100 %; 1 px
shift 0.993 / 99.5 %; 1 px shift + JPEG q95 0.983 / 92 %; horizontal flip 0.981 / 89 %; 2 px shift
0.978 / 80 %; JPEG q90 0.956 / 14 %; 4 px shift 0.951 / 16 %; vertical flip 0.943 / 10 %; 90 degree
rotation 0.917 / 2 %; JPEG q50 0.816 / 0 %. Distinct cells: the nearest other cell scores median 0.894,
99.9th percentile 0.967 (3,000 random cells). Over all 22,106 cells, pairs at >= 0.95 / 0.96 / 0.97 /
0.98 / 0.99 number 1,472 / 365 / 117 / 21 / 2, of which 362 / 222 / 107 / 21 / 2 are the same cell
(grey-level difference < 3 after aligning by up to 12 px: Chula files re-crops of one field under two
smear ids), so 0.97 is ~91 % precise (the rest mostly look-alike neighbours), 0.96 only 61 %, while
0.98 (100 %) misses 4 in 10 flips and 2 px shifts and 0.99 (cleanlab-like) finds 2 pairs in all of
Chula. These features are not invariant to re-encoding at 64 px (JPEG q90 already costs 0.04), so no
threshold separates every altered copy from every distinct cell. Copies with identical pixels are
caught whatever the features by the pixel digest the store records at extraction
(:func:`embedcache.inputs.images.pixel_digest`, :func:`pixel_duplicates`), merged
with the feature evidence by :func:`merge_duplicates`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError

DEFAULT_THRESHOLD = 0.97  # cosine: see the module docstring for the measurements behind it
QUERY_ROWS = 4096  # queries per FAISS search (bounds the result buffers)
SIM_TOLERANCE = 1e-6  # float32 round-off of a unit-vector dot product: a pair at threshold - 1e-6 counts
MAX_PAIRS = 20_000_000  # above this many pairs (~320 MB) the threshold is too low for a duplicate search
_CANDIDATE_MARGIN = 1e-4  # range-search radius below the threshold: BLAS vs pair-by-pair round-off


@dataclass
class Duplicates:
    """Duplicate pairs and sets.

    ``pairs``: one row per pair, ``i < j`` (positions), ``id_i, id_j``, ``similarity`` (cosine, NaN for
    a pixel pair the feature search did not see), ``evidence`` ("pixel": same decoded pixels; "near":
    cosine >= threshold). ``cells``: per cell ``id, duplicate_set`` (-1: none), ``set_size`` (1: none),
    ``max_similarity`` (the highest cosine among its pairs, NaN: none), ``partner`` (id of its closest
    duplicate, pixel evidence first), ``evidence``, ``score`` (1.0 for a pixel duplicate, else
    ``max_similarity``, 0.0 for none), ``flag``, ``why``."""

    pairs: pd.DataFrame
    cells: pd.DataFrame
    threshold: float | None
    excluded_nonfinite: int = 0
    missing_hash: int = 0

    @property
    def n_sets(self) -> int:
        return int(self.cells["duplicate_set"].max()) + 1 if len(self.cells) else 0


# -- checks ---------------------------------------------------------------------------------------------
def _check_threshold(threshold: float) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ProbeError(f"threshold must be a number in (0, 1], got {threshold!r}") from None
    if not (0.0 < t <= 1.0):  # NaN fails too
        raise ProbeError(f"threshold must be in (0, 1] (a cosine similarity), got {threshold!r}")
    return t


def _check_len(name: str, values: Any, n: int) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or len(a) != n:
        shape = len(a) if a.ndim == 1 else a.shape
        raise ProbeError(f"{name} has {shape} entries for {n} cells (one per cell needed)")
    return a


def _ids(ids: Any, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n).astype(str)
    return _check_len("ids", ids, n).astype(str)


def _labels(values: Any, n: int, name: str) -> np.ndarray:
    """Per-cell strings, missing values (None, NaN) as ""."""
    a = pd.Series(_check_len(name, values, n), dtype=object)
    return a.where(a.notna(), "").astype(str).to_numpy()


# -- rows in blocks (in memory or out of core) ----------------------------------------------------
def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit length, float32 C-contiguous; usable: finite and not all zero). The norm is
    summed in float64 row by row, so a row's unit vector does not depend on the block it was read in."""
    x = np.asarray(x, dtype=np.float32)
    ok = np.isfinite(x).all(axis=1)
    norm = np.sqrt(np.square(x, dtype=np.float64).sum(axis=1))
    ok &= norm > 0
    out = np.zeros(x.shape, dtype=np.float32)
    out[ok] = (x[ok] / norm[ok, None]).astype(np.float32)
    return np.ascontiguousarray(out), ok


def _read_raw(X: Any, positions: np.ndarray) -> np.ndarray:
    """Float32 rows of out-of-core features *without* the finite check of ``ChunkedRows.read`` (which
    raises on NaN rows; here they are excluded and counted)."""
    from probes.features.chunked import ChunkedRows, SideBySide

    if isinstance(X, ChunkedRows):
        return X._read_store(X.rows[positions])
    if isinstance(X, SideBySide):
        return np.concatenate([_read_raw(p, positions) for p in X.parts], axis=1)
    return np.asarray(X[positions], dtype=np.float32)


def _store_order(X: Any) -> np.ndarray:
    from probes.features.chunked import ChunkedRows, SideBySide

    if isinstance(X, ChunkedRows):
        return np.argsort(X.rows, kind="stable")
    if isinstance(X, SideBySide):
        return X._order
    return np.arange(len(X))


class _Rows:
    """Unit-length usable rows of features, in blocks: ``(positions ascending, unit rows)``. In memory: one
    block (normalised once); out of core: blocks of the source's ``block_rows`` in store order, read
    again on every pass."""

    def __init__(self, X: Any, block_rows: int | None = None):
        from probes.features.chunked import is_chunked

        self.chunked = is_chunked(X)
        if self.chunked:
            self.X = X
            self.n, self.width = len(X), int(X.shape[1])
            self.block_rows = int(block_rows or X.block_rows)
            self._valid: np.ndarray | None = None
        else:
            a = np.asarray(X, dtype=np.float32)
            if a.ndim != 2:
                raise ProbeError(f"features must be 2-D (cells, dims), got shape {a.shape}")
            self.n, self.width = a.shape
            xn, ok = _unit_rows(a)
            self._valid = ok
            self._pos = np.flatnonzero(ok)
            self._xn = xn if ok.all() else np.ascontiguousarray(xn[ok])
            self._index: Any = None

    @property
    def valid(self) -> np.ndarray:
        """Per cell: finite, non-zero features (one pass over out-of-core rows, the first time)."""
        if self._valid is None:
            for _ in self.blocks():
                pass
        assert self._valid is not None
        return self._valid

    @property
    def excluded(self) -> int:
        return int(self.n - self.valid.sum())

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not self.chunked:
            yield self._pos, self._xn
            return
        order = _store_order(self.X)
        seen = np.zeros(self.n, dtype=bool) if self._valid is None else None
        for s in range(0, self.n, self.block_rows):
            pos = np.sort(order[s : s + self.block_rows])
            xn, ok = _unit_rows(_read_raw(self.X, pos))
            if seen is not None:
                seen[pos[ok]] = True
            yield pos[ok], np.ascontiguousarray(xn[ok])
        if seen is not None:
            self._valid = seen

    def index(self, xn: np.ndarray) -> Any:
        """A FAISS ``IndexFlatIP`` of a block (the in-memory block's is built once)."""
        import faiss

        if not self.chunked and self._index is not None:
            return self._index
        index = faiss.IndexFlatIP(self.width)
        index.add(xn)
        if not self.chunked:
            self._index = index
        return index


# -- sets from pairs ----------------------------------------------------------------------------------
def duplicate_sets(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Per cell the id of its duplicate set (connected component of the pairs ``(i, j)`` with at least two
    cells), -1 for cells in no pair; sets are numbered 0, 1, ... in order of their first cell."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    size = np.bincount(comp)
    first = np.full(len(size), n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    multi = size >= 2
    new_id = np.full(len(size), -1, dtype=np.int64)
    new_id[np.flatnonzero(multi)[np.argsort(first[multi], kind="stable")]] = np.arange(int(multi.sum()))
    return new_id[comp]


def _duplicate_cells(n: int, pairs: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    """Per-cell columns of :class:`Duplicates` from its pairs."""
    i, j = pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)
    sets = duplicate_sets(n, i, j)
    size = np.ones(n, dtype=np.int64)
    inset = sets >= 0
    size[inset] = np.bincount(sets[inset])[sets[inset]]
    # each pair from both ends; the best partner: pixel evidence first, then the highest cosine
    a, b = np.concatenate([i, j]), np.concatenate([j, i])
    sim = np.tile(pairs["similarity"].to_numpy(np.float64), 2)
    pixel = np.tile(pairs["evidence"].to_numpy(str) == "pixel", 2)
    order = np.lexsort((b, -np.nan_to_num(sim, nan=-np.inf), ~pixel, a))
    firsts = order[np.unique(a[order], return_index=True)[1]]
    partner = np.full(n, "", dtype=object)
    evidence = np.full(n, "", dtype=object)
    best_sim = np.full(n, np.nan)
    partner[a[firsts]] = ids[b[firsts]]
    evidence[a[firsts]] = np.where(pixel[firsts], "pixel", "near")
    best_sim[a[firsts]] = sim[firsts]
    max_sim = np.full(n, np.nan)
    has_sim = ~np.isnan(sim)
    np.fmax.at(max_sim, a[has_sim], sim[has_sim])
    score = np.where(evidence == "pixel", 1.0, np.nan_to_num(max_sim, nan=0.0))
    cells = pd.DataFrame(
        {
            "id": ids,
            "duplicate_set": sets,
            "set_size": size,
            "max_similarity": max_sim,
            "partner": partner,
            "evidence": evidence,
            "score": score,
            "flag": inset,
        }
    )
    tail = " (set " + pd.Series(sets).astype(str) + " of " + pd.Series(size).astype(str) + " cells)"
    sim_text = pd.Series(best_sim).map(lambda s: f"{s:.3f}")
    why = np.where(
        evidence == "pixel",
        "same decoded pixels as cell " + pd.Series(partner).astype(str) + tail,
        "cosine " + sim_text + " to " + pd.Series(partner).astype(str) + tail,
    )
    cells["why"] = np.where(inset, why, "")
    return cells


def _pairs_frame(i: np.ndarray, j: np.ndarray, sim: np.ndarray, evidence: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    return pd.DataFrame(
        {
            "i": i,
            "j": j,
            "id_i": ids[i],
            "id_j": ids[j],
            "similarity": sim[order].astype(np.float64),
            "evidence": evidence[order].astype(object),
        }
    )


# -- near duplicates ----------------------------------------------------------------------------------
def _rescore(q: np.ndarray, xb: np.ndarray, qi: np.ndarray, local: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Exact cosine of the pairs ``(q[qi], xb[local])``, a pair at a time (a value of the two rows only),
    ``chunk`` pairs per call (bounded copies)."""
    from probes.search.vectors import pair_dots

    out = np.empty(len(qi), dtype=np.float32)
    for s in range(0, len(qi), chunk):
        out[s : s + chunk] = pair_dots(q[qi[s : s + chunk]], xb, local[s : s + chunk, None])[:, 0]
    return out


def near_duplicate_pairs(
    X: Any,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    query_rows: int = QUERY_ROWS,
    block_rows: int | None = None,
    max_pairs: int = MAX_PAIRS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every pair of cells with cosine >= ``threshold`` (exact FAISS range searches): ``(i, j, similarity,
    excluded_nonfinite)``, ``i < j`` positions sorted by ``(i, j)``, similarity float32 (re-scored pair by
    pair). ``X``: (n, d) features of any scale, or out-of-core rows (``blocks()`` of ``block_rows``; each
    database block is indexed once and searched by itself and every block before it)."""
    t = _check_threshold(threshold)
    rows = _Rows(X, block_rows)
    radius = t - SIM_TOLERANCE - _CANDIDATE_MARGIN
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    found_s: list[np.ndarray] = []
    total = 0
    for b, (pb, xb) in enumerate(rows.blocks()):
        if not len(pb):
            continue
        index = rows.index(xb)
        # the query blocks: every block before this one (read again, one at a time), then this one
        earlier = islice(rows.blocks(), b) if rows.chunked else iter(())
        queries = chain(((False, blk) for blk in earlier), [(True, (pb, xb))])
        for diagonal, (pa, xa) in queries:
            for s in range(0, len(pa), query_rows):
                q, qp = xa[s : s + query_rows], pa[s : s + query_rows]
                lims, _, local = index.range_search(q, radius)
                qi = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
                i, j = qp[qi], pb[local]
                keep = i < j if diagonal else np.ones(len(i), dtype=bool)
                qi, local, i, j = qi[keep], local[keep], i[keep], j[keep]
                sim = _rescore(q, xb, qi, local)
                hit = sim >= t - SIM_TOLERANCE
                found_i.append(np.minimum(i[hit], j[hit]))
                found_j.append(np.maximum(i[hit], j[hit]))
                found_s.append(np.minimum(sim[hit], np.float32(1.0)))
                total += int(hit.sum())
                if total > max_pairs:
                    raise ProbeError(
                        f"more than {max_pairs:,} pairs of cells have cosine >= {t}: that is not a duplicate "
                        "search any more; raise the threshold (or max_pairs)"
                    )
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), rows.excluded
    i, j, sim = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    order = np.lexsort((j, i))
    return i[order], j[order], sim[order], rows.excluded


def near_duplicates(
    X: Any,
    ids: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    query_rows: int = QUERY_ROWS,
    block_rows: int | None = None,
    max_pairs: int = MAX_PAIRS,
) -> Duplicates:
    """Near-duplicate pairs (cosine >= ``threshold``) and sets of ``X`` (:func:`near_duplicate_pairs`);
    ``ids`` (one per cell, default the positions) name cells in ``why``."""
    n = len(X)
    names = _ids(ids, n)
    i, j, s, excluded = near_duplicate_pairs(
        X, threshold, query_rows=query_rows, block_rows=block_rows, max_pairs=max_pairs
    )
    pairs = _pairs_frame(i, j, s, np.full(len(i), "near", dtype=object), names)
    return Duplicates(pairs, _duplicate_cells(n, pairs, names), float(threshold), excluded_nonfinite=excluded)


def pixel_duplicates(hashes: Any, ids: Any = None) -> Duplicates:
    """Cells with the same pixel hash (:func:`embedcache.inputs.images.pixel_digest`; strings or integers),
    as duplicate sets. Cells with no hash (None, NaN, "", 0) are left out and counted (``missing_hash``).
    Each set's pairs are its cells paired with its first cell (identity is transitive: the others follow)."""
    h = pd.Series(np.asarray(hashes, dtype=object))
    n = len(h)
    _check_len("hashes", h.to_numpy(), n)
    names = _ids(ids, n)
    text = h.astype(str).str.strip()
    missing = h.isna().to_numpy() | (text == "").to_numpy() | (text == "0").to_numpy()
    codes, _ = pd.factorize(h.where(~missing, None))  # missing: -1
    codes = np.where(missing, -1, codes)
    has = np.flatnonzero(codes >= 0)
    first = np.full(int(codes.max()) + 1 if len(has) else 0, n, dtype=np.int64)
    np.minimum.at(first, codes[has], has)
    head = first[codes[has]]
    member = has[has != head]  # every cell but the first of its hash, paired with the first
    i, j = head[has != head], member
    pairs = _pairs_frame(
        np.minimum(i, j),
        np.maximum(i, j),
        np.full(len(i), np.nan),
        np.full(len(i), "pixel", dtype=object),
        names,
    )
    return Duplicates(pairs, _duplicate_cells(n, pairs, names), None, missing_hash=int(missing.sum()))


def merge_duplicates(near: Duplicates, pixel: Duplicates) -> Duplicates:
    """One set assignment from feature (``near``) and pixel (``pixel``) evidence: the union of their pairs
    (a pair found by both keeps its cosine and is marked "pixel"; a pair the feature search did not see,
    e.g. of excluded rows, has similarity NaN), sets the connected components of that union."""
    n = len(near.cells)
    if len(pixel.cells) != n:
        raise ProbeError(f"near-duplicates cover {n} cells, pixel duplicates {len(pixel.cells)}")
    names = near.cells["id"].to_numpy(str)
    pix_set = pixel.cells["duplicate_set"].to_numpy(np.int64)
    both = pd.concat([near.pairs[["i", "j", "similarity"]], pixel.pairs[["i", "j", "similarity"]]])
    both = both.groupby(["i", "j"], as_index=False, sort=True)["similarity"].max()  # max skips NaN
    i, j = both["i"].to_numpy(np.int64), both["j"].to_numpy(np.int64)
    same_pixels = (pix_set[i] >= 0) & (pix_set[i] == pix_set[j])
    evidence = np.where(same_pixels, "pixel", "near").astype(object)
    pairs = _pairs_frame(i, j, both["similarity"].to_numpy(np.float64), evidence, names)
    return Duplicates(
        pairs,
        _duplicate_cells(n, pairs, names),
        near.threshold,
        excluded_nonfinite=near.excluded_nonfinite,
        missing_hash=pixel.missing_hash,
    )


def duplicates(
    X: Any,
    ids: Any = None,
    hashes: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    **search: Any,
) -> Duplicates:
    """Near-duplicates of ``X``, merged with pixel duplicates of ``hashes`` when given."""
    near = near_duplicates(X, ids, threshold, **search)
    return near if hashes is None else merge_duplicates(near, pixel_duplicates(hashes, ids))


# -- leaks across a split -------------------------------------------------------------------------------
