"""Cosine nearest neighbours over a backbone's cached features: exact (FAISS ``IndexFlatIP``) or, for
large sets, an approximate FAISS index whose candidates are re-ranked exactly (:mod:`probes.search.ann`).

Features are L2-normalised float32, so inner product = cosine similarity and the search is
exact (brute force, BLAS). :class:`NeighborIndex` is built once and answers batched queries:
by cell position or id (the cell itself left out), by feature vectors, or by new images
embedded exactly as the stored set was made (:func:`embedcache.extraction.new_images.embed_images`).
:func:`probes.neighbors` is the one-call form behind ``probes neighbors``.

The index holds every readable cell of the feature set (``ok``), labelled or not: a store
extracted with ``--no-labels`` can be searched too (the label column is then empty).

``index="auto"`` (the default) searches exactly below :data:`probes.search.ann.AUTO_EXACT_BELOW` cells
(200,000) and through an IVF-PQ index from there on (:class:`ApproxNeighborIndex`): built on the
first look-up, kept beside the store keyed by the features' digest, loaded by the next ones; its
candidates are re-scored by exact cosine, and its recall@k against exact search is measured on a
sample of the indexed cells and reported with every answer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError
from probes.features.cells import open_cells, parse_names
from probes.search import ann as _ann
from probes.search.vectors import RESCORE_EXTRA, flat_vectors, l2_normalize, rescored_topk

NEIGHBOR_COLUMNS = ["query", "rank", "id", "label", "similarity", "path"]
QUERY_BATCH = 4096  # query rows per FAISS call: bounds the (batch, k) answer and BLAS scratch memory
ADD_BATCH = 65536  # rows normalised and added at a time while building
# FAISS's exhaustive search: BLAS for every batch size, in (1024 query x 65536 database)-row blocks
# (256 MiB scratch). Its defaults (no BLAS under 20 queries, 1024-row database blocks) make a
# batch of 12-100 look-ups on 10^6 cells 10-20x slower on a small CPU.
_FAISS_BLAS = {
    "distance_compute_blas_threshold": 1,
    "distance_compute_blas_query_bs": 1024,
    "distance_compute_blas_database_bs": 65536,
}


@contextlib.contextmanager
def _faiss_blocks():
    import faiss

    before = {k: getattr(faiss.cvar, k) for k in _FAISS_BLAS}
    try:
        for k, v in _FAISS_BLAS.items():
            setattr(faiss.cvar, k, v)
        yield
    finally:
        for k, v in before.items():
            setattr(faiss.cvar, k, v)


class NeighborIndex:
    """An exact cosine index over ``features`` (N, D); build once, query many times.

    ``obs`` (optional) has one row per feature row with at least ``id`` (and ``label``,
    ``path`` for the tables). ``feature_set`` and ``pool`` let :meth:`query_images` embed new
    images exactly like the indexed ones.
    """

    kind = "exact"

    def __init__(
        self, features: np.ndarray, obs: pd.DataFrame | None = None, *, feature_set: Any = None, pool: str = "cls"
    ):
        x = np.asarray(features)
        if x.ndim != 2 or len(x) == 0 or x.shape[1] == 0:
            raise ProbeError(f"a neighbour index needs a non-empty (N, D) feature matrix, got shape {x.shape}")
        self.n, self.dim = x.shape
        self._build(x)
        if obs is None:
            obs = pd.DataFrame({"id": np.arange(self.n).astype(str)})
        if len(obs) != self.n:
            raise ProbeError(f"obs has {len(obs)} rows but features have {self.n}")
        self.obs = obs.reset_index(drop=True).copy()
        for col in ("label", "path"):
            if col not in self.obs.columns:
                self.obs[col] = ""
        ids = self.obs["id"].astype(str).to_numpy()
        self._pos = pd.Series(np.arange(self.n), index=ids)
        if not self._pos.index.is_unique:
            dup = self._pos.index[self._pos.index.duplicated()].unique()[:5]
            raise ProbeError(f"cell ids must be unique; repeated: {', '.join(map(str, dup))}")
        self.feature_set, self.pool = feature_set, pool

    def _build(self, x: np.ndarray) -> None:
        import faiss

        self.index = faiss.IndexFlatIP(self.dim)
        for start in range(0, self.n, ADD_BATCH):  # normalised block by block: no second full copy
            block = l2_normalize(x[start : start + ADD_BATCH])
            if not np.isfinite(block).all():
                bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                raise ProbeError(f"feature row {bad} holds NaN or inf; a neighbour index needs finite features")
            self.index.add(block)

    def describe(self) -> str:
        """One line: which search answers (printed with every look-up)."""
        return f"index: exact (FAISS flat inner product over {self.n:,} unit vectors)"

    @classmethod
    def from_store(
        cls,
        store: Any,
        model: str,
        *,
        dataset: str | None = None,
        pool: str | None = None,
        index: str = "auto",
        exact_below: int = _ann.AUTO_EXACT_BELOW,
        params: _ann.AnnParams | None = None,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        keep: bool = True,
        log: Any = None,
    ) -> NeighborIndex:
        """The index of one backbone's readable cells (``ok``; labelled or not) in ``store``.

        ``index``: ``exact``, ``ivf`` or ``hnsw`` (:class:`ApproxNeighborIndex`, kept beside the store
        unless ``keep`` is False), or ``auto``: exact below ``exact_below`` cells, ``ivf`` from there on.
        ``params`` sets how an ANN index is built; ``nprobe`` / ``ef`` / ``rerank`` how it is searched.
        ``log`` (a callable taking one line) hears about a build in progress.
        """
        kind = _ann.choose_kind(index, None, exact_below)  # checks the name before any reading
        names = parse_names(model)
        if len(names) != 1:
            raise ProbeError(f"neighbours use one backbone at a time; got {len(names)}: {', '.join(names) or '(none)'}")
        cells = open_cells(store, names, dataset=dataset, pool=pool, labelled=False)
        fs, obs, pool = cells.feature_sets[names[0]], cells.obs, cells.pool_of(names[0])
        rows = obs["row"].to_numpy()
        try:
            # the stored dtype (float16 by default): converted to float32 block by block while indexing
            x = fs.to_numpy(pool, rows=rows if len(rows) < fs.n else None, dtype=np.dtype(fs.array(pool).dtype))
        except Exception as e:  # StoreError, I/O
            raise ProbeError(f"cannot read '{fs.key}/{pool}' features: {e}") from e
        kind = _ann.choose_kind(index, len(x), exact_below)
        if kind == "exact":
            return NeighborIndex(x, obs, feature_set=fs, pool=pool)
        if params is not None and params.kind != kind:
            raise ProbeError(f"index '{index}' searches with {kind}, but the parameters given are for {params.kind}")
        return ApproxNeighborIndex.kept(
            x, obs, fs, pool, rows, params=params or _ann.AnnParams(kind), nprobe=nprobe, ef=ef, rerank=rerank,
            keep=keep, log=log,
        )  # fmt: skip

    # -- raw search ---------------------------------------------------------------------------
    def _checked(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Unit-length queries of the index's width, a positive ``k`` and one ``exclude`` entry per query."""
        q = l2_normalize(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ProbeError(f"queries have width {q.shape[1]}, the index {self.dim}")
        k = int(k)
        if k < 1:
            raise ProbeError(f"k must be at least 1, got {k}")
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
            if len(exclude) != len(q):
                raise ProbeError(f"exclude has {len(exclude)} entries for {len(q)} queries")
        return q, k, exclude

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (similarities, positions) per query row, best first; batched.

        ``exclude[i]`` (a position, or -1 for none) is left out of query ``i``'s answer: the
        query cell itself. Rows with fewer than ``k`` answers are padded with position -1 and
        similarity NaN.
        """
        q, k, exclude = self._checked(queries, k, exclude)
        sims_out = np.full((len(q), k), np.nan, dtype=np.float32)
        idx_out = np.full((len(q), k), -1, dtype=np.int64)
        # FAISS's candidates re-scored pair by pair (probes.search.vectors.rescored_topk): the answer does not
        # depend on how the search was cut into BLAS blocks, and equals the out-of-core search's
        kk = min(k + (exclude is not None) + RESCORE_EXTRA, self.n)
        base = flat_vectors(self.index)
        for start in range(0, len(q), QUERY_BATCH):
            stop = min(start + QUERY_BATCH, len(q))
            with _faiss_blocks():
                _, idx = self.index.search(q[start:stop], kk)
            if exclude is not None:  # the query cell itself
                idx = np.where(idx == exclude[start:stop, None], -1, idx)
            sims, idx = rescored_topk(q[start:stop], base, idx, k)
            sims_out[start:stop, : idx.shape[1]] = sims
            idx_out[start:stop, : idx.shape[1]] = idx
        idx_out[idx_out < 0] = -1
        sims_out[idx_out < 0] = np.nan
        return sims_out, idx_out

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The indexed (unit-length) feature rows at ``positions``."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) and np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions))):
            return self.index.reconstruct_n(int(positions[0]), len(positions))
        return (
            np.stack([self.index.reconstruct(int(p)) for p in positions])
            if len(positions)
            else np.zeros((0, self.dim), np.float32)
        )

    def all_neighbors(self, k: int, batch: int = QUERY_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Every indexed cell's ``k`` nearest other cells (itself excluded): (sims, positions), each (N, k)."""
        sims, idx = [], []
        for start in range(0, self.n, batch):
            pos = np.arange(start, min(start + batch, self.n))
            s, i = self.search(self.vectors(pos), k, exclude=pos)
            sims.append(s)
            idx.append(i)
        return np.concatenate(sims), np.concatenate(idx)

    # -- tables -------------------------------------------------------------------------------
    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """Positions of cell ids; unknown ids are a clear error."""
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self._pos.index]
        if missing:
            raise ProbeError(
                f"unknown cell id(s): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
                + " (ids are obs.id of the dataset; unreadable cells are not indexed)"
            )
        return self._pos[ids].to_numpy()

    def query_ids(self, ids: Sequence[str], k: int = 12) -> pd.DataFrame:
        """Neighbours of stored cells (each cell itself left out), one table row per answer."""
        pos = self.positions(ids)
        sims, idx = self.search(self.vectors(pos), k, exclude=pos)
        return self.table([str(i) for i in ids], sims, idx)

    def query_features(self, queries: np.ndarray, k: int = 12, names: Sequence[str] | None = None) -> pd.DataFrame:
        """Neighbours of arbitrary feature vectors (nothing left out)."""
        sims, idx = self.search(queries, k)
        names = list(names) if names is not None else [f"query-{i}" for i in range(len(sims))]
        return self.table(names, sims, idx)

    def embed(self, images: Sequence[Any], *, device: str = "auto") -> np.ndarray:
        """Features of new images (paths or arrays) made like the indexed ones."""
        if self.feature_set is None:
            raise ProbeError(
                "this index was built from bare features; build it with NeighborIndex.from_store to query images"
            )
        from embedcache.extraction.new_images import embed_images

        try:
            return embed_images(self.feature_set, list(images), pool=self.pool, device=device)
        except ProbeError:
            raise
        except Exception as e:  # unreadable image, missing weights, perturbed set ...
            raise ProbeError(f"cannot embed the query image(s) with '{self.feature_set.key}': {e}") from e

    def query_images(self, images: Sequence[Any], k: int = 12, *, device: str = "auto") -> pd.DataFrame:
        """Neighbours of new images (paths or arrays), embedded like the stored features."""
        x = self.embed(images, device=device)
        names = [str(im) if isinstance(im, (str, os.PathLike)) else f"image-{i}" for i, im in enumerate(images)]
        return self.query_features(x, k, names)

    def table(self, names: Sequence[str], sims: np.ndarray, idx: np.ndarray) -> pd.DataFrame:
        """Tidy rows ``query, rank, id, label, similarity, path`` (padding left out)."""
        q, r = np.nonzero(idx >= 0)
        pos = idx[q, r]
        return pd.DataFrame(
            {
                "query": np.asarray(list(names), dtype=object)[q] if len(q) else np.array([], dtype=object),
                "rank": r + 1,
                "id": self.obs["id"].astype(str).to_numpy()[pos],
                "label": self.obs["label"].astype(str).to_numpy()[pos],
                "similarity": sims[q, r].astype(float),
                "path": self.obs["path"].astype(str).to_numpy()[pos],
            },
            columns=NEIGHBOR_COLUMNS,
        )


class ApproxNeighborIndex(NeighborIndex):
    """Approximate search (``ivf`` or ``hnsw``, :mod:`probes.search.ann`) with exact re-ranking, same API as
    :class:`NeighborIndex`.

    Keeps ``features`` as given (the store's float16: half the memory of the exact index's float32
    copy); the ANN index proposes ``rerank`` candidates per query and each is scored by exact cosine
    against its feature row, so similarities equal the exact index's and only which cells are found
    can differ: :meth:`measure_recall` says how often. ``ann`` is a built :class:`~probes.search.ann.AnnIndex`
    or the :class:`~probes.search.ann.AnnParams` (or kind name) to build one with. ``recall_sample`` cells
    (0: none) are searched both ways right after a build to measure recall@20.
    """

    def __init__(
        self,
        features: np.ndarray,
        obs: pd.DataFrame | None = None,
        *,
        feature_set: Any = None,
        pool: str = "cls",
        ann: _ann.AnnIndex | _ann.AnnParams | str = "ivf",
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        recall_sample: int = _ann.RECALL_SAMPLE,
        log: Any = None,
    ):
        self._spec, self._log = ann, log
        self.nprobe = int(nprobe or _ann.DEFAULT_NPROBE)
        self.ef = int(ef or _ann.DEFAULT_EF)
        self.rerank = int(rerank or _ann.DEFAULT_RERANK)
        if min(self.nprobe, self.ef, self.rerank) < 1:
            raise ProbeError("nprobe, ef and rerank must be at least 1")
        super().__init__(features, obs, feature_set=feature_set, pool=pool)
        self.kind = self.ann.params.kind
        if not self.ann.loaded and recall_sample:
            self.measure_recall(_ann.RECALL_K, sample=recall_sample)

    def _build(self, x: np.ndarray) -> None:
        self._x = x
        spec = self._spec
        if isinstance(spec, _ann.AnnIndex):
            if (spec.n, spec.dim) != (self.n, self.dim):
                raise ProbeError(
                    f"the ANN index holds {spec.n} x {spec.dim} vectors, the features {self.n} x {self.dim}"
                )
            self.ann = spec
        else:
            params = _ann.AnnParams(spec) if isinstance(spec, str) else spec
            self.ann = _ann.AnnIndex.build(x, params, log=self._log)

    @classmethod
    def kept(
        cls,
        x: np.ndarray,
        obs: pd.DataFrame,
        feature_set: Any,
        pool: str,
        rows: np.ndarray,
        *,
        params: _ann.AnnParams,
        nprobe: int | None = None,
        ef: int | None = None,
        rerank: int | None = None,
        keep: bool = True,
        log: Any = None,
    ) -> ApproxNeighborIndex:
        """The index of ``feature_set``'s rows ``rows`` (features ``x``): the one kept beside the store when it
        was built from exactly these features with these parameters, else built now (and kept)."""
        n, dim = np.shape(x)
        p = params.resolved(n, dim)
        digest = _ann.features_digest(feature_set, pool, rows, None if feature_set.has_checksums else x)
        url = _ann.index_url(feature_set, pool, p, digest)
        found, note = None, ""
        if keep:
            try:
                found = _ann.AnnIndex.load(url, digest=digest, n=n, dim=dim)
            except Exception as e:  # noqa: BLE001  a damaged or foreign file is rebuilt, and said so
                note = f"the kept index at {url} was unusable ({type(e).__name__}: {e}); rebuilt"
        if log and found is None:
            log(
                f"building the {p.kind} neighbour index of {n:,} cells (once; kept beside the store for later look-ups)"
            )
        idx = cls(
            x, obs, feature_set=feature_set, pool=pool, ann=found or p, nprobe=nprobe, ef=ef, rerank=rerank, log=log
        )
        idx.ann.digest = digest
        if found is None:
            idx.ann.note = note
            if keep:
                try:
                    idx.ann.save(url, replace_prefix=_ann.index_prefix(feature_set, pool, p))
                except Exception as e:  # noqa: BLE001  a read-only or unreachable side folder: answer, and say so
                    idx.ann.url = None
                    idx.ann.note = f"cannot write {url}: {type(e).__name__}: {e}"
            else:
                idx.ann.note = "keep=False"
        return idx

    # -- search -----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (exact similarities, positions) among the ANN index's ``rerank`` candidates per query; the
        same contract as :meth:`NeighborIndex.search`."""
        q, k, exclude = self._checked(queries, k, exclude)
        depth = min(max(self.rerank, k + (exclude is not None)), self.n)
        sims_out = np.full((len(q), k), np.nan, dtype=np.float32)
        idx_out = np.full((len(q), k), -1, dtype=np.int64)
        for start in range(0, len(q), QUERY_BATCH):
            stop = min(start + QUERY_BATCH, len(q))
            cand = self.ann.candidates(q[start:stop], depth, nprobe=self.nprobe, ef=self.ef)
            ex = exclude[start:stop] if exclude is not None else None
            sims_out[start:stop], idx_out[start:stop] = _ann.rerank(self._x, q[start:stop], cand, k, ex)
        return sims_out, idx_out

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The (unit-length, float32) feature rows at ``positions``."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        return l2_normalize(self._x[positions]) if len(positions) else np.zeros((0, self.dim), np.float32)

    # -- quality ----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The search settings a recall measurement depends on."""
        return self.ann.settings(self.nprobe, self.ef, self.rerank)

    def measure_recall(self, k: int = _ann.RECALL_K, *, sample: int = _ann.RECALL_SAMPLE, seed: int = 0) -> dict:
        """recall@``k`` of this index (with its current settings, after re-ranking) against exact search, over
        ``sample`` indexed cells (each left out of its own answers); recorded with the kept index."""
        import time

        k = int(min(k, self.n - 1))
        if k < 1:
            raise ProbeError("recall needs at least 2 indexed cells")
        rng = np.random.default_rng(seed)
        pos = np.sort(rng.choice(self.n, size=min(int(sample), self.n), replace=False))
        q = self.vectors(pos)
        t0 = time.perf_counter()
        _, found = self.search(q, k, exclude=pos)
        ann_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, truth = _ann.exact_topk(self._x, q, k, exclude=pos)
        exact_s = time.perf_counter() - t0
        entry = {
            "k": k,
            "settings": self.settings(),
            "recall": round(_ann.recall_at_k(found, truth), 4),
            "sample": len(pos),
            "ann_s": round(ann_s, 4),
            "exact_s": round(exact_s, 4),
        }
        self.ann.recall = [r for r in self.ann.recall if (r["k"], r["settings"]) != (k, entry["settings"])] + [entry]
        if self.ann.url:
            try:
                self.ann.write_record()
            except Exception as e:  # noqa: BLE001  the measurement is still reported
                self.ann.note = f"recall not recorded: {type(e).__name__}: {e}"
        return entry

    def describe(self) -> str:
        """One line: the index, how it searches, and its measured recall (for these settings when measured)."""
        st = self.settings()
        knob = f"nprobe {st['nprobe']}" if "nprobe" in st else f"ef {st['ef']}"
        line = f"index: {self.kind}, {self.ann.describe()}; {knob}, {st['rerank']} candidates re-ranked exactly"
        here = [r for r in self.ann.recall if r["settings"] == st]
        if here:
            r = here[-1]
            line += f"; recall@{r['k']} {r['recall']:.3f} against exact search on {r['sample']} indexed cells"
        elif self.ann.recall:
            r = self.ann.recall[-1]
            other = ", ".join(f"{a} {b}" for a, b in r["settings"].items())
            line += f"; recall@{r['k']} {r['recall']:.3f} measured with {other} (--recall measures these settings)"
        else:
            line += "; recall not measured (--recall measures it)"
        return line
