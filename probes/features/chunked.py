"""Features larger than memory, read from the store in row blocks (:class:`ChunkedRows`).

Above the memory budget (:mod:`probes.features.policy`) a study's features come as a :class:`ChunkedRows`:
the store rows of the cells, read on demand, one block of at most ``block_rows`` rows at a time (float16 ->
float32 per block, every store chunk checked against its checksum as
:meth:`embedcache.store.FeatureSet.to_numpy` does). Store chunks are read in store order, each once per
pass. :class:`SideBySide` joins several backbones' rows without a copy. Two heads fit on such rows with
results equal to their in-memory fits (:mod:`probes.heads.rows`); every head predicts on them block by
block (:func:`predict_blocks`). Other heads refuse them with a :class:`probes.errors.ProbeError` (never a
silent read of everything).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from probes.errors import ProbeError
from probes.features.policy import CACHE_FRACTION, OUT_OF_CORE_PROBES, current_policy, gib


# -- rows read from the store -----------------------------------------------------------------------
class ChunkedRows:
    """Float32 features of some store rows, read from the store block by block, never all at once.

    ``rows`` are store rows (repeats allowed), in the order of the matrix this stands for; ``ids``
    (optional, one per row) name cells in errors. Indexing with positions gives another
    :class:`ChunkedRows`; :meth:`blocks` yields ``(positions, X)`` blocks; :meth:`read` reads chosen
    rows into memory. Converting it to an array (``np.asarray``) is refused: that is the read of
    everything this class is there to avoid (use :meth:`to_numpy` where that is meant). Pickles as
    the store's URL and the set's key (a Dask worker reopens the store).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(
        self,
        feature_set: Any,
        pool: str,
        rows: np.ndarray,
        ids: np.ndarray | None = None,
        block_rows: int | None = None,
        _source: _Source | None = None,
        cache_bytes: int | None = None,
    ):
        self.fs = feature_set
        self.pool = pool
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.ids = None if ids is None else np.asarray(ids)
        if self.ids is not None and len(self.ids) != len(self.rows):
            raise ValueError(f"{len(self.ids)} ids for {len(self.rows)} rows")
        self.width = int(feature_set.array(pool).shape[1])
        self.block_rows = int(block_rows) if block_rows else current_policy().rows_per_block(self.width)
        # what a streamed fit may keep of these rows in memory between passes (StandardizedBlocks)
        self.cache_bytes = int(current_policy().budget * CACHE_FRACTION) if cache_bytes is None else int(cache_bytes)
        self._source = _source if _source is not None else _Source(feature_set, pool)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.width)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 matrix this stands for."""
        return len(self.rows) * self.width * 4

    def __repr__(self) -> str:
        return f"ChunkedRows({self.fs.key}/{self.pool}, {len(self)} x {self.width}, blocks of {self.block_rows})"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise ProbeError(
            f"{len(self)} x {self.width} features ({gib(self.nbytes)}) are read out of core (above the memory "
            f"budget of {gib(current_policy().budget)}); this step needs them in memory: raise --max-memory, "
            f"or use a probe with an out-of-core path ({', '.join(OUT_OF_CORE_PROBES)})"
        )

    def __getitem__(self, index: Any) -> ChunkedRows:
        if isinstance(index, tuple) or np.ndim(index) == 0 and not isinstance(index, slice):
            raise TypeError("ChunkedRows takes a slice, integer positions or a boolean mask (rows only)")
        ids = None if self.ids is None else self.ids[index]
        return ChunkedRows(self.fs, self.pool, self.rows[index], ids, self.block_rows, self._source, self.cache_bytes)

    def take(self, positions: np.ndarray) -> ChunkedRows:
        """The rows at ``positions`` (into this matrix), in that order."""
        return self[np.asarray(positions, dtype=np.int64)]

    # -- reading ------------------------------------------------------------------------------------
    def _read_store(self, store_rows: np.ndarray) -> np.ndarray:
        """Float32 rows of the store (any chunks)."""
        chunk_of = store_rows // int(self.fs.chunk_size)
        if len(chunk_of) and chunk_of.min() == chunk_of.max():
            return self._source.rows(int(chunk_of[0]), store_rows)
        out = np.empty((len(store_rows), self.width), dtype=np.float32)
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self._source.rows(int(c), store_rows[sel])
        return out

    def _check_finite(self, positions: np.ndarray, x: np.ndarray) -> None:
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            where = self.ids[positions[bad]] if self.ids is not None else self.rows[positions[bad]]
            shown = ", ".join(map(str, where[:5])) + (" ..." if len(where) > 5 else "")
            raise ProbeError(
                f"{int(bad.sum())} cell(s) have NaN or inf '{self.pool}' features in '{self.fs.key}' "
                f"(e.g. {shown}); re-extract them (embedcache extract ... --store-dtype float32 if they "
                "overflowed float16) or drop them from the manifest"
            )

    def blocks(self, block_rows: int | None = None, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, X)``: every row once, in blocks of ``block_rows`` rows (default
        :attr:`block_rows`; the last one shorter), in store order (each store chunk read once per
        pass); ``positions`` index this matrix, ``X`` (len(positions), width) float32. ``start``
        skips the first ``start`` blocks (their chunks are not read)."""
        size = int(block_rows or self.block_rows)
        order = np.argsort(self.rows, kind="stable")[start * size :]
        chunk_of = self.rows[order] // int(self.fs.chunk_size)
        cuts = np.flatnonzero(np.diff(chunk_of)) + 1
        pending_pos: list[np.ndarray] = []
        pending_x: list[np.ndarray] = []
        held = 0
        for pos in np.split(order, cuts) if len(order) else []:
            x = self._read_store(self.rows[pos])  # one store chunk
            self._check_finite(pos, x)
            pending_pos.append(pos)
            pending_x.append(x)
            held += len(pos)
            while held >= size:
                P, X = np.concatenate(pending_pos), np.concatenate(pending_x)
                yield P[:size], X[:size]
                pending_pos, pending_x, held = [P[size:]], [X[size:]], len(P) - size
        if held:
            yield np.concatenate(pending_pos), np.concatenate(pending_x)

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` in memory, float32, in that order (for samples and small subsets)."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.rows[positions]
        uniq, inverse = np.unique(rows, return_inverse=True)
        x = self._read_store(uniq)[inverse]
        self._check_finite(positions, x)
        return x

    def to_numpy(self) -> np.ndarray:
        """Every row in memory (explicit: what a caller with room for it asks for)."""
        return self.read(np.arange(len(self)))

    # -- pickling (Dask) ----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        fs = state.pop("fs")
        state.pop("_source")
        url = str(fs.dataset.store.url)
        # a worker elsewhere resolves a relative local path against its own working folder
        state["_where"] = (url if "://" in url else os.path.abspath(url), fs.dataset.name, fs.key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import embedcache

        url, dataset, key = state.pop("_where")
        self.__dict__.update(state)
        self.fs = embedcache.open_store(url).dataset(dataset).feature_set(key)
        self._source = _Source(self.fs, self.pool)


class _Source:
    """The store array one :class:`ChunkedRows` and the readers indexed from it read: the set is
    checked complete once, and each store chunk against its checksum the first time it is read
    (:meth:`embedcache.store.FeatureSet.to_numpy`); later passes read the chunk directly. The last
    chunk read is kept, so that blocks read by position that share a chunk read it once."""

    def __init__(self, fs: Any, pool: str):
        self.fs, self.pool = fs, pool
        try:
            pending = fs.pending_chunks([pool])
            self.array = fs.array(pool)
        except Exception as e:  # StoreError (no such pool), I/O errors
            raise ProbeError(f"cannot read '{fs.key}/{pool}' features: {e}") from e
        if pending:
            raise ProbeError(
                f"'{fs.key}/{pool}' is incomplete ({len(pending)} of {fs.n_chunks} chunks not written); "
                "rerun the same embedcache extract command to finish it"
            )
        self.verified: set[int] = set()
        self._last: tuple[int, np.ndarray] | None = None

    def rows(self, c: int, store_rows: np.ndarray) -> np.ndarray:
        """Float32 ``store_rows`` (all in store chunk ``c``)."""
        span = self.fs.chunk_rows(c)
        if self._last is not None and self._last[0] == c:
            return self._last[1][store_rows - span.start].astype(np.float32)
        try:
            if c in self.verified:
                block = np.asarray(self.array[span])
            else:
                block = np.asarray(self.fs.to_numpy(self.pool, rows=span, dtype=self.array.dtype))
                self.verified.add(c)
        except Exception as e:  # StoreError (damaged chunk) and I/O errors
            raise ProbeError(f"cannot read '{self.fs.key}/{self.pool}' features: {e}") from e
        self._last = (c, block)
        return block[store_rows - span.start].astype(np.float32)


class SideBySide:
    """The same cells' features of several backbones side by side (columns one backbone after the
    other), read block by block: each part is a :class:`ChunkedRows` or an in-memory array, so the
    joined matrix is never held whole. It reads (:meth:`read`), indexes, cuts into :meth:`blocks` and
    pickles like a :class:`ChunkedRows`; the logistic probe streams it (the audit's joint member)."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, parts: list[Any]):
        if not parts:
            raise ValueError("SideBySide needs at least one part")
        n = {len(p) for p in parts}
        if len(n) != 1:
            raise ValueError(f"parts of SideBySide have different row counts {sorted(n)}")
        self.parts = list(parts)
        self.width = sum(int(p.shape[1]) for p in self.parts)
        chunked = [p for p in self.parts if is_chunked(p)]
        self.block_rows = min([p.block_rows for p in chunked] or [current_policy().rows_per_block(self.width)])
        self.cache_bytes = min([p.cache_bytes for p in chunked] or [int(current_policy().budget * CACHE_FRACTION)])
        self.ids = next((p.ids for p in chunked if p.ids is not None), None)
        # store order of the first part read from the store: blocks read its chunks in sequence
        self._order = np.argsort(chunked[0].rows, kind="stable") if chunked else np.arange(len(self))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.parts[0]), self.width)

    def __len__(self) -> int:
        return len(self.parts[0])

    @property
    def nbytes(self) -> int:
        return len(self) * self.width * 4

    def __repr__(self) -> str:
        return f"SideBySide({', '.join(type(p).__name__ for p in self.parts)}; {len(self)} x {self.width})"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise ProbeError(
            f"{len(self)} x {self.width} side-by-side features ({gib(self.nbytes)}) are read block by block; "
            "this step needs them in memory: raise --max-memory"
        )

    def __getitem__(self, index: Any) -> SideBySide:
        if isinstance(index, tuple) or np.ndim(index) == 0 and not isinstance(index, slice):
            raise TypeError("SideBySide takes a slice, integer positions or a boolean mask (rows only)")
        return SideBySide([p[index] for p in self.parts])

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` in memory, float32, every part's columns in turn."""
        positions = np.asarray(positions, dtype=np.int64)
        return np.concatenate(
            [p.read(positions) if is_chunked(p) else np.asarray(p[positions], dtype=np.float32) for p in self.parts],
            axis=1,
        )

    def blocks(self, block_rows: int | None = None, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, X)``: every row once, in blocks of ``block_rows`` rows (default :attr:`block_rows`)."""
        size = int(block_rows or self.block_rows)
        for i in range(start * size, len(self), size):
            pos = self._order[i : i + size]
            yield pos, self.read(pos)

    def to_numpy(self) -> np.ndarray:
        return self.read(np.arange(len(self)))


def side_by_side(parts: list[Any]) -> Any:
    """The features of ``parts`` (the same cells) side by side: ``parts[0]`` itself when alone; an
    in-memory array when every part is in memory and the parts and their joined copy together fit the
    memory budget; else a :class:`SideBySide` read block by block (no copy)."""
    if len(parts) == 1:
        return parts[0]
    nbytes = sum(len(p) * int(p.shape[1]) * 4 for p in parts)
    if any(is_chunked(p) for p in parts) or current_policy().out_of_core(2 * nbytes):
        return SideBySide(parts)
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=1)


def chunked_if_large(fs: Any, pool: str, rows: np.ndarray, ids: np.ndarray | None = None) -> ChunkedRows | None:
    """``rows`` of ``fs`` as a :class:`ChunkedRows` when the policy reads them out of core, else None."""
    width = int(fs.array(pool).shape[1]) if pool in fs.pools else 0
    if not width or not current_policy().out_of_core(len(rows) * width * 4):
        return None
    return ChunkedRows(fs, pool, rows, ids)


def is_chunked(x: Any) -> bool:
    """True for out-of-core rows (:class:`ChunkedRows`, :class:`SideBySide`)."""
    return isinstance(x, (ChunkedRows, SideBySide))


def rowwise(fn: Callable[[np.ndarray], np.ndarray], X: Any) -> np.ndarray:
    """``fn(X)`` for a function of independent rows (``predict``, ``predict_proba``...), applied block
    by block when ``X`` is a :class:`ChunkedRows`; the output rows in ``X``'s order."""
    if not is_chunked(X):
        return np.asarray(fn(X))
    positions, parts = [], []
    for pos, x in X.blocks():
        positions.append(pos)
        parts.append(np.asarray(fn(x)))
    joined = np.concatenate(parts)  # one dtype for every block (labels of any length)
    out = np.empty_like(joined)
    out[np.concatenate(positions)] = joined
    return out


def predict_blocks(est: Any, X: Any) -> np.ndarray:
    """``est.predict(X)``, block by block when ``X`` is a :class:`ChunkedRows`."""
    return rowwise(est.predict, X)


def proba_blocks(est: Any, X: Any) -> np.ndarray:
    """``est.predict_proba(X)``, block by block when ``X`` is a :class:`ChunkedRows`."""
    return rowwise(est.predict_proba, X)
