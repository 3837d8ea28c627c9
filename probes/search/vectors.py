"""Row-wise vector helpers shared by the heads and the neighbour index."""

from __future__ import annotations

import numpy as np

from probes.errors import ProbeError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as a new C-contiguous float32 array (all-zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ProbeError(f"features must be 2-D (n, D), got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    x /= np.maximum(norms, 1e-12)
    return x


# -- exact similarities that do not depend on how the search was cut -------------------------------
RESCORE_EXTRA = 8  # candidates beyond k that an exact search re-scores (float32 round-off at the k-th)


def pair_dots(queries: np.ndarray, base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``queries[i] . base[cand[i, j]]`` (q, m) float32, one pair at a time (FAISS's fused
    ``fvec_inner_products_by_idx``, no gathered copy); entries with ``cand < 0`` are ``-inf``.

    A BLAS search's similarity of a pair can differ in the last bit with the shape of the matrices
    it was computed in (how many rows a database block has); this one depends only on the two rows."""
    import faiss

    qn = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.ascontiguousarray(cand, dtype=np.int64)
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    out = np.empty(ids.shape, dtype=np.float32)
    if ids.size and len(base):
        tn = np.ascontiguousarray(base, dtype=np.float32)
        fused = faiss.fvec_inner_products_by_idx  # type: ignore[attr-defined]  # a SWIG function: no stub
        fused(
            faiss.swig_ptr(out),
            faiss.swig_ptr(qn),
            faiss.swig_ptr(tn),
            faiss.swig_ptr(safe),
            qn.shape[1],
            ids.shape[0],
            ids.shape[1],
        )
    out[~valid] = -np.inf
    return out


def rescored_topk(
    queries: np.ndarray, base: np.ndarray, cand: np.ndarray, k: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the candidates ``cand`` (q, m) (rows of ``base``, -1: none) by their exact
    similarity (:func:`pair_dots`), ties to the lower index: ``(sims (q, k), idx (q, k))``, best first,
    missing answers ``-inf`` / -1. ``labels`` (q, m), when given, replaces the returned indices (e.g.
    positions of a block's rows; ties then go to the lower label, so labels must rise with the index).

    Every exact search (the kNN probe, the neighbour index, the out-of-core search in blocks) ends
    here with at least :data:`RESCORE_EXTRA` more candidates than ``k``, so they return the same
    neighbours in the same order with the same similarities, however the rows were cut into blocks."""
    sims = pair_dots(queries, base, cand)
    names = cand if labels is None else np.where(cand >= 0, labels, -1)
    key = np.where(names >= 0, names, np.iinfo(np.int64).max)  # missing answers last
    order = np.lexsort((key, -sims))[:, :k]
    out_sims = np.take_along_axis(sims, order, 1)
    out_idx = np.take_along_axis(names, order, 1)
    out_idx[~np.isfinite(out_sims)] = -1
    return out_sims, out_idx


def flat_vectors(index) -> np.ndarray:
    """The (n, d) float32 rows a FAISS ``IndexFlat`` holds, as a view of its storage (no copy)."""
    import faiss

    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
