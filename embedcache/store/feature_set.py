"""One feature set of a dataset: pooled features (and cached tail tokens) of one backbone × preprocessing ×
perturbation, written chunk by chunk and checked against checksums on every read.

Layout::

    features/<backbone>/<prep>/<perturbation>/   attrs: kind=feature_set, provenance, fingerprint
      cls, mean        (N, D) float16, chunks (C, D)
      tokens_k<k>      (N, T, D) float16 tail tokens, ~1 MB objects
      ok               (N,) bool      False where the image could not be read
      error            (N,) str       why not ok
      crc_cls, ..., crc_rows  (ceil(N / C),) int64, CRC-32 of each written row-chunk
      done_cls, ...    (ceil(N / C),) bool, one stored object per row-chunk

A row-chunk is written, read back and compared, its checksums recorded, and only then is its
``done_<pool>`` flag set. Each flag is its own object, so a killed run leaves every unfinished chunk
``False`` and a rerun redoes exactly those; writers of different chunks never touch the same object.
Completion is derived from the flags, never stored separately.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from embedcache.faults import checkpoint
from embedcache.store.checksums import crc_problem, crc_rows, crc_values
from embedcache.store.errors import ChunkDamaged, StoreError
from embedcache.store.groups import OUTSIDE_SUBSET, as_array, as_group, attrs_of, chunk_exists, strings
from embedcache.store.locking.base import check_held
from embedcache.store.records import MetadataAltered, MetadataLost, check_array

if TYPE_CHECKING:
    from embedcache.store.dataset import Dataset

__all__ = ["FeatureSet", "TailTokens", "Damage", "tokens_name", "token_subchunk", "TOKENS_PREFIX"]


@dataclass
class Damage:
    """One damaged row-chunk of one array of a feature set."""

    dataset: str
    key: str
    array: str  # a pool name, or "rows" for ok/error
    chunk: int
    rows: tuple[int, int]
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.dataset}/{self.key}/{self.array} chunk {self.chunk} (rows {self.rows[0]}-{self.rows[1] - 1}): "
            f"{self.reason}"
        )


class FeatureSet:
    """Pooled features of one backbone × preprocessing × perturbation for a dataset."""

    def __init__(self, dataset: Dataset, key: str):
        self.dataset = dataset
        self.key = key
        self.group: zarr.Group = as_group(dataset.group["features"][key])
        self.attrs = attrs_of(self.group)
        self.chunk_size: int = int(self.attrs["chunk_size"])
        self.n = dataset.n
        self.n_chunks = -(-self.n // self.chunk_size)
        # what the writer recorded of every array (None: written before records existed)
        self.recorded: dict[str, Any] | None = self.attrs.get("arrays")
        self._checked: dict[str, zarr.Array] = {}
        ok = (self.recorded or {}).get("ok")
        if ok is not None:  # the attributes that cut rows into chunks must agree with the arrays they describe
            shape, chunks = ok["shape"][0], ok["chunk_grid"]["configuration"]["chunk_shape"][0]
            if (shape, chunks) != (self.n, self.chunk_size):
                raise MetadataAltered(
                    f"'{dataset.name}/{key}': its attributes say {self.n} cells in chunks of {self.chunk_size}, its "
                    f"arrays hold {shape} in chunks of {chunks} (the attributes n / chunk_size were edited); "
                    f"run `embedcache verify {dataset.store.url} --repair`"
                )

    @property
    def pools(self) -> list[str]:
        """Pooled feature arrays (``cls``, ``mean``)."""
        return [k for k in self._written_arrays() if not k.startswith(TOKENS_PREFIX)]

    @property
    def token_sets(self) -> list[str]:
        """Cached tail-token arrays, ``tokens_k<k>``: the input of the last k blocks (or stages)."""
        return [k for k in self._written_arrays() if k.startswith(TOKENS_PREFIX)]

    def _written_arrays(self) -> list[str]:
        keys = set(self.recorded) if self.recorded is not None else set(self.group.array_keys())
        return sorted(k for k in keys if f"done_{k}" in keys)

    def tokens(self, k: int) -> TailTokens:
        """A reader of the cached tokens entering the last ``k`` blocks (see :class:`TailTokens`)."""
        name = tokens_name(k)
        if name not in self.token_sets:
            have = ", ".join(str(int(t[len(TOKENS_PREFIX) :])) for t in self.token_sets) or "none"
            raise StoreError(
                f"'{self.key}' has no cached tail tokens for {k} block(s) (has: {have}); run the extract again with "
                f"--tail-blocks {k} (only the tokens are added; cached features are kept)"
            )
        self._check_complete(name)
        return TailTokens(self, name)

    @property
    def has_checksums(self) -> bool:
        """False for sets written before chunk checksums existed (they cannot be verified)."""
        keys = self.recorded if self.recorded is not None else self.group.array_keys()
        return "crc_rows" in keys

    def chunk_rows(self, c: int) -> slice:
        return slice(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))

    def done(self, pool: str) -> np.ndarray:
        """Which row-chunks of ``pool`` are written and verified."""
        return np.asarray(self._array(f"done_{pool}")[:], dtype=bool)

    def done_chunks(self) -> list[int]:
        """Row-chunks that at least one pool has finished."""
        done = np.zeros(self.n_chunks, dtype=bool)
        for pool in self._written_arrays():
            done |= self.done(pool)
        return np.flatnonzero(done).tolist()

    def pending_chunks(self, pools: Sequence[str]) -> list[int]:
        """Row-chunks that some pool in ``pools`` still lacks."""
        pending = np.zeros(self.n_chunks, dtype=bool)
        for pool in pools:
            pending |= ~self.done(pool)
        return np.flatnonzero(pending).tolist()

    def is_complete(self, pools: Sequence[str] | None = None) -> bool:
        return not self.pending_chunks(pools or self.pools)

    def write_chunk(
        self,
        c: int,
        features: dict[str, np.ndarray],
        ok: np.ndarray,
        error: np.ndarray,
        inputs: np.ndarray | None = None,
        pixels: np.ndarray | None = None,
    ) -> None:
        """Write row-chunk ``c``, read it back and compare, record its checksums, and only then
        mark it done. ``inputs``: each cell's input fingerprint (checked when a killed run resumes);
        ``pixels``: each cell's pixel digest (0: not read)."""
        rows = self.chunk_rows(c)
        error = np.asarray(error).astype(str)
        self._array("ok")[rows] = ok
        self._array("error")[rows] = error
        if inputs is not None and self.records_inputs:
            self._array("inputs")[rows] = np.asarray(inputs, dtype=np.int64)
        if pixels is not None and self.records_pixels:
            self._array("pixels")[rows] = np.asarray(pixels, dtype=np.int64)
        for pool, values in features.items():
            self._array(pool)[rows] = values
        checkpoint("chunk:data-written")
        for pool, values in features.items():
            back = np.asarray(self._array(pool)[rows])
            if not np.array_equal(back, values, equal_nan=back.dtype.kind == "f"):
                raise StoreError(
                    f"verification failed for chunk {c} of '{self.key}/{pool}': the store returned other values"
                )
        same = np.array_equal(self._read("ok", rows), ok) and np.array_equal(strings(self._read("error", rows)), error)
        if not same:
            raise StoreError(f"verification failed for chunk {c} of '{self.key}/ok'")
        check_held()  # a writer whose lease was taken over stops before it records checksums or flags
        if self.has_checksums:
            self._array("crc_rows")[c] = crc_rows(ok, error)
            for pool, values in features.items():
                values = np.asarray(values, dtype=self._array(pool).dtype)
                if pool.startswith(TOKENS_PREFIX):
                    sub = self._array(pool).chunks[0]
                    first = rows.start // sub
                    crcs = [crc_values(values[j : j + sub]) for j in range(0, len(values), sub)]
                    self._array(f"crc_{pool}")[first : first + len(crcs)] = np.asarray(crcs, dtype=np.int64)
                else:
                    self._array(f"crc_{pool}")[c] = crc_values(values)
        checkpoint("chunk:checksums-written")
        check_held()
        for pool in features:
            self._array(f"done_{pool}")[c] = True
        checkpoint("chunk:done")

    def clear_done(self, chunks: Sequence[int]) -> None:
        """Mark ``chunks`` unwritten in every pool (the next extract / import redoes them)."""
        for pool in self._written_arrays():
            flags = self._array(f"done_{pool}")
            for c in chunks:
                flags[int(c)] = False

    def array(self, pool: str = "cls") -> zarr.Array:
        if pool not in self.pools:
            raise StoreError(f"'{self.key}' has no '{pool}' features (has: {', '.join(self.pools)})")
        return self._array(pool)

    def _array(self, name: str) -> zarr.Array:
        """Member array ``name``, its metadata compared with the record its writer made (once per object).

        A recorded array whose ``zarr.json`` is gone or unreadable is :class:`MetadataLost`; one whose dtype,
        shape, chunks or codecs differ from the record is :class:`MetadataAltered` (never values served
        through edited metadata)."""
        hit = self._checked.get(name)
        if hit is not None:
            return hit
        record = (self.recorded or {}).get(name)
        where = f"'{self.dataset.name}/{self.key}/{name}'"
        try:
            node = self.group[name]
        except Exception as e:
            if record is not None:
                raise MetadataLost(f"array {where} has lost its metadata ({type(e).__name__}); {self._repair}") from e
            raise StoreError(
                f"'{self.key}' has no array '{name}' (has: {', '.join(sorted(self.group.array_keys()))})"
            ) from e
        arr = as_array(node)
        if record is not None:
            check_array(arr, record, f"array {where}", self._repair)
        self._checked[name] = arr
        return arr

    @property
    def records_inputs(self) -> bool:
        """Whether this set keeps each cell's input fingerprint (sets written before it existed do not)."""
        return "inputs" in (self.recorded or ())

    def input_fingerprints(self, rows: np.ndarray) -> np.ndarray:
        """The input fingerprints recorded for ``rows`` (0: not recorded)."""
        return np.asarray(self._array("inputs").get_orthogonal_selection((np.asarray(rows, dtype=np.int64),)))

    @property
    def records_pixels(self) -> bool:
        """Whether this set keeps each cell's pixel digest (sets written before it existed, imports: no)."""
        return "pixels" in (self.recorded or ())

    def pixel_digests(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The pixel digests recorded for ``rows`` (all rows by default; 0: not recorded or not readable;
        :func:`embedcache.inputs.images.pixel_digest`). A set that records none raises :class:`StoreError`."""
        if not self.records_pixels:
            raise StoreError(
                f"'{self.key}' records no pixel digests (extracted before they were recorded, or imported)"
            )
        arr = self._array("pixels")
        if rows is None:
            return np.asarray(arr[:])
        return np.asarray(arr.get_orthogonal_selection((np.asarray(rows, dtype=np.int64),)))

    def check_metadata(self) -> None:
        """Every recorded array against its record (:class:`MetadataLost` / :class:`MetadataAltered` on damage)."""
        for name in self.recorded or ():
            self._array(name)

    @property
    def _repair(self) -> str:
        return f"run `embedcache verify {self.dataset.store.url} --repair` (it writes the recorded metadata back)"

    def _read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """``group[name][selection]`` as numpy (zarr types reads as a union of scalars and arrays)."""
        return np.asarray(self._array(name)[selection])

    def chunk_problem(self, c: int, name: str) -> str:
        """Why done row-chunk ``c`` of pool ``name`` (or ``"rows"``: ok/error) is damaged, or ''.

        Sets with checksums compare the CRC of what the store returns with the recorded one (a
        deleted chunk reads as fill values, so it is caught unless it held only fill values, in
        which case nothing was lost). Older sets without checksums can only be checked for a
        missing feature chunk among rows that have features."""
        rows = self.chunk_rows(c)
        if not self.has_checksums:
            if name == "rows":
                return ""
            ok = np.asarray(self._array("ok")[rows], dtype=bool)
            return "chunk object missing" if ok.any() and not chunk_exists(self._array(name), c) else ""
        if name.startswith(TOKENS_PREFIX):
            arr = self._array(name)
            sub = arr.chunks[0]
            for j in range(rows.start // sub, -(-rows.stop // sub)):
                span = slice(j * sub, min((j + 1) * sub, self.n))
                reason = crc_problem(int(self._read(f"crc_{name}", j)), crc_values(np.asarray(arr[span])))
                if reason:
                    return f"cells {span.start}-{span.stop - 1}: {reason}"
            return ""
        if name == "rows":
            stored = int(self._read("crc_rows", c))
            actual = crc_rows(np.asarray(self._array("ok")[rows], dtype=bool), strings(self._array("error")[rows]))
        else:
            stored = int(self._read(f"crc_{name}", c))
            actual = crc_values(self._read(name, rows))
        return crc_problem(stored, actual)

    def _damage_message(self, c: int, name: str, reason: str) -> str:
        rows = self.chunk_rows(c)
        return (
            f"chunk {c} (rows {rows.start}-{rows.stop - 1}) of '{self.dataset.name}/{self.key}/{name}' is damaged: "
            f"{reason}; run `embedcache verify {self.dataset.store.url} --repair`, then the same extract (or import) "
            "command recomputes it"
        )

    def damage(self, c: int, arrays: list[str] | None = None) -> list[Damage]:
        """Damage found in done row-chunk ``c`` (each pool, the tokens, then the ok/error rows)."""
        found = []
        rows = self.chunk_rows(c)
        span = (rows.start, rows.stop)
        for name in arrays or [*self.pools, *self.token_sets, "rows"]:
            try:
                reason = self.chunk_problem(c, name)
            except Exception as e:  # noqa: BLE001  an undecodable chunk is damage, reported with its cause
                reason = f"cannot be decoded ({type(e).__name__}: {e})"
            if reason:
                found.append(Damage(self.dataset.name, self.key, name, c, span, reason))
        return found

    def ok(self) -> np.ndarray:
        """Which cells have features (False: unreadable image, non-finite values, or not written)."""
        return self._rows()[0]

    def errors(self) -> pd.Series:
        """Why each cell is not ok ('' where it is)."""
        return pd.Series(self._rows()[1], name="error")

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``ok`` and ``error`` of every cell, each done chunk checked against its checksum."""
        try:
            ok = np.asarray(self._array("ok")[:], dtype=bool)
            error = strings(self._array("error")[:])
        except Exception as e:
            bad = next((c for c in range(self.n_chunks) if _undecodable(self, c)), None)
            if bad is None:
                raise
            raise ChunkDamaged(
                self._damage_message(bad, "ok/error", f"cannot be decoded ({type(e).__name__}: {e})")
            ) from e
        if self.has_checksums:
            crcs = np.asarray(self._array("crc_rows")[:])
            for c in self.done_chunks():
                r = self.chunk_rows(c)
                reason = crc_problem(int(crcs[c]), crc_rows(ok[r], error[r]))
                if reason:
                    raise ChunkDamaged(self._damage_message(c, "ok/error", reason))
        return ok, error

    @property
    def default_pool(self) -> str:
        """The pooling this set was extracted with first (the backbone's default unless ``--pool`` said
        otherwise), else its first stored one."""
        for p in (self.attrs.get("provenance") or {}).get("pools") or []:
            if p in self.pools:
                return str(p)
        if not self.pools:
            raise StoreError(f"'{self.key}' holds no pooled features")
        return self.pools[0]

    def to_numpy(self, pool: str | None = None, rows: np.ndarray | slice | None = None, dtype=np.float32) -> np.ndarray:
        """Features as numpy (``pool`` default: :attr:`default_pool`; only ``rows`` are read when given); refuses
        unfinished chunks and damaged ones (every chunk read is checked against its checksum)."""
        pool = pool or self.default_pool
        self._check_complete(pool)
        arr = self.array(pool)
        if rows is None:
            try:
                block = np.asarray(arr[:])
            except Exception:  # noqa: BLE001  an undecodable chunk somewhere: find it and name it
                block = np.concatenate([self._read_block(c, pool) for c in range(self.n_chunks)])
            for c in range(self.n_chunks):
                self._check_block(c, pool, block[self.chunk_rows(c)])
            return np.asarray(block, dtype=dtype)
        if isinstance(rows, slice):
            rows = np.arange(self.n)[rows]
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        out = np.empty((len(rows), arr.shape[1]), dtype=dtype)
        chunk_of = rows // self.chunk_size
        for c in np.unique(chunk_of):
            span = self.chunk_rows(int(c))
            block = self._read_block(int(c), pool)
            self._check_block(int(c), pool, block)
            sel = chunk_of == c
            out[sel] = block[rows[sel] - span.start]
        return out

    def _read_block(self, c: int, pool: str) -> np.ndarray:
        try:
            return self._read(pool, self.chunk_rows(c))
        except Exception as e:
            raise ChunkDamaged(self._damage_message(c, pool, f"cannot be decoded ({type(e).__name__}: {e})")) from e

    def _check_block(self, c: int, pool: str, block: np.ndarray) -> None:
        if self.has_checksums:
            reason = crc_problem(int(self._read(f"crc_{pool}", c)), crc_values(block))
        else:
            reason = self.chunk_problem(c, pool)
        if reason:
            raise ChunkDamaged(self._damage_message(c, pool, reason))

    def to_dask(self, pool: str | None = None, dtype: Any = np.float32):
        """Features as a lazy dask array chunked like the store (each block checked on compute), as ``dtype``
        (float32 by default: sums of many float16 values overflow float16 to inf / NaN; pass
        ``dtype=None`` for the stored dtype)."""
        import dask.array as da

        pool = pool or self.default_pool
        self._check_complete(pool)
        arr = self.array(pool)
        out_dtype = np.dtype(arr.dtype if dtype is None else dtype)
        blocks = [
            da.from_delayed(
                _delayed_chunk(self, pool, c, out_dtype),
                shape=(self.chunk_rows(c).stop - self.chunk_rows(c).start, arr.shape[1]),
                dtype=out_dtype,
            )
            for c in range(self.n_chunks)
        ]
        return da.concatenate(blocks, axis=0) if blocks else da.from_zarr(arr).astype(out_dtype)

    def _check_complete(self, pool: str) -> None:
        if pool not in self._written_arrays():
            raise StoreError(f"'{self.key}' has no '{pool}' features (has: {', '.join(self.pools)})")
        missing = int((~self.done(pool)).sum())
        if missing:
            raise StoreError(
                f"'{self.key}/{pool}' is incomplete ({missing} of {self.n_chunks} chunks not written); "
                "rerun the same extract command to finish it"
            )

    def missing_chunks(self) -> list[str]:
        """Done feature chunks whose stored objects are gone (a quick check that reads no data:
        a chunk may be absent only when it held nothing but fill values)."""
        out = []
        width = int(self.attrs["width"])
        for pool in self.pools:
            done = self.done(pool)
            crcs = np.asarray(self._array(f"crc_{pool}")[:]) if self.has_checksums else None
            for c in np.flatnonzero(done):
                if chunk_exists(self._array(pool), int(c)):
                    continue
                r = self.chunk_rows(int(c))
                if crcs is not None:
                    empty = crc_values(np.zeros((r.stop - r.start, width), dtype=self._array(pool).dtype))
                    if int(crcs[c]) != empty:
                        out.append(f"{pool} chunk {c}")
                elif np.asarray(self._array("ok")[r], dtype=bool).any():
                    out.append(f"{pool} chunk {c}")
        return out

    def info(self, verify: bool = False) -> dict[str, Any]:
        prov = self.attrs.get("provenance", {})
        pools = {p: f"{int(self.done(p).sum())}/{self.n_chunks} chunks" for p in self.pools}
        if verify:
            damage = [str(d) for c in self.done_chunks() for d in self.damage(c)]
        else:
            damage = [f"{m}: chunk object missing" for m in self.missing_chunks()]
        out: dict[str, Any] = {
            "status": "damaged" if damage else ("complete" if self.is_complete() else "partial"),
            "pools": pools,
            "shape": [self.n, int(self.attrs["width"])],
            "dtype": self.attrs["dtype"],
            "checksums": "per chunk" if self.has_checksums else "none (written by an older embedcache)",
            "tail_tokens": {
                t: {
                    "shape": list(self._array(t).shape),
                    "chunks": f"{int(self.done(t).sum())}/{self.n_chunks} chunks",
                    "bytes_per_cell": 2 * int(np.prod(self._array(t).shape[1:])),
                }
                for t in self.token_sets
            },
            "backbone": prov.get("backbone", {}).get("name"),
            "weights": prov.get("weights", {}),
        }
        if damage:
            out["damage"] = damage
            return out
        ok = self.ok()
        written = self._written_rows()
        out["written_cells"] = int(written.sum())
        out["skipped_cells"] = int((~ok & written & (self.errors().to_numpy() != OUTSIDE_SUBSET)).sum())
        out["rows"] = (prov.get("perturbation") or {}).get("rows", "all")
        return out

    def _written_rows(self) -> np.ndarray:
        rows = np.zeros(self.n, dtype=bool)
        if self.pools:
            for c in np.flatnonzero(self.done(self.pools[0])):
                rows[self.chunk_rows(int(c))] = True
        return rows


class TailTokens:
    """Reads cached tail tokens by rows, each stored sub-chunk checked against its checksum.

    The reader protocol of :mod:`probes.tuning` (``__len__``, ``read(rows)``, ``kind``,
    ``digest``): minibatches are read from the store, so the tokens need not fit in memory."""

    kind = "tokens"

    def __init__(self, fs: FeatureSet, name: str):
        self.fs, self.name = fs, name
        self.array = fs._array(name)
        self.sub = int(self.array.chunks[0])
        self.k = int(name[len(TOKENS_PREFIX) :])

    def __len__(self) -> int:
        return self.fs.n

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def digest(self) -> str:
        """Names these tokens: the feature set's fingerprint, k, and the sub-chunk checksums."""
        crcs = np.asarray(self.fs._array(f"crc_{self.name}")[:])
        return hashlib.sha256(f"{self.fs.attrs['fingerprint']}|{self.name}|".encode() + crcs.tobytes()).hexdigest()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of ``rows`` (float16, one per row asked for, in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = np.unique(rows // self.sub)
        full = np.concatenate([np.arange(b * self.sub, min((b + 1) * self.sub, self.fs.n)) for b in blocks])
        try:
            data = np.asarray(self.array.get_orthogonal_selection((full,) + (slice(None),) * (self.array.ndim - 1)))
        except Exception as e:
            c = int(blocks[0] * self.sub // self.fs.chunk_size)
            raise ChunkDamaged(
                self.fs._damage_message(c, self.name, f"cannot be decoded ({type(e).__name__}: {e})")
            ) from e
        crcs = np.asarray(self.fs._array(f"crc_{self.name}").get_orthogonal_selection((blocks,)))
        at = 0
        for b, stored in zip(blocks, crcs):
            m = min((b + 1) * self.sub, self.fs.n) - b * self.sub
            reason = crc_problem(int(stored), crc_values(data[at : at + m]))
            if reason:
                c = int(b * self.sub // self.fs.chunk_size)
                raise ChunkDamaged(self.fs._damage_message(c, self.name, f"cells {b * self.sub}-: {reason}"))
            at += m
        pos = np.searchsorted(full, rows)
        return data[pos]


TOKENS_PREFIX = "tokens_k"
TOKEN_SUBCHUNK_BYTES = 1 << 20  # ~1 MB per stored token object: random minibatches read little extra


def tokens_name(k: int) -> str:
    """The array name of the tokens entering the last ``k`` blocks."""
    return f"{TOKENS_PREFIX}{int(k)}"


def token_subchunk(chunk_size: int, cell_shape: Sequence[int]) -> int:
    """Cells per stored token object: a divisor of ``chunk_size`` near 1 MB of float16."""
    per_cell = 2 * int(np.prod(cell_shape))
    target = max(1, min(chunk_size, TOKEN_SUBCHUNK_BYTES // max(per_cell, 1)))
    return max(d for d in range(1, target + 1) if chunk_size % d == 0)


def token_dims(ndim: int) -> tuple[str, ...]:
    return ("cell", "token", "feature") if ndim == 2 else ("cell", "channel", "y", "x")[: ndim + 1]


def _delayed_chunk(fs: FeatureSet, pool: str, c: int, dtype: np.dtype):
    import dask

    @dask.delayed(pure=True)
    def load() -> np.ndarray:
        return fs.to_numpy(pool, rows=fs.chunk_rows(c), dtype=dtype)

    return load()


def _undecodable(fs: FeatureSet, c: int) -> bool:
    try:
        fs._array("ok")[fs.chunk_rows(c)]
        fs._array("error")[fs.chunk_rows(c)]
        return False
    except Exception:  # noqa: BLE001
        return True
