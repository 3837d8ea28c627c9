"""Bring your own features: embeddings computed elsewhere, written into a store as a feature set.

The imported set sits beside extracted ones (key ``<backbone>/imported/clean``) and is read by
every study exactly like them. It is written the same way: chunk by chunk, each chunk read back
and compared before its ``done`` flag is set, so a killed import resumes and an identical second
import is a cache hit. Rows with NaN/inf values are recorded as not ok (and excluded and counted
by the studies), as unreadable images are by ``extract``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .sources import OBS_COLUMNS, CellSource, SourceError, _table
from .store import STORE_DTYPES, FeatureSet, StoreError, WriteResult, open_store, safe_key

NON_FINITE = "non-finite feature values (NaN or inf)"


@dataclass
class ImportResult(WriteResult):
    """What :func:`import_features` did."""

    not_ok: int = 0  # rows recorded as not ok (non-finite values)


def import_features(
    out: str | os.PathLike,
    features: np.ndarray | Mapping[str, np.ndarray],
    cells: pd.DataFrame | str | os.PathLike | None = None,
    *,
    backbone: str,
    labels: Sequence[Any] | np.ndarray | None = None,
    dataset: str = "cells",
    store_dtype: str = "float16",
    chunk_size: int = 1024,
    source: str = "",
) -> ImportResult:
    """Write ``features`` (N, D) (or ``{pool: (N, D)}``, default pool ``cls``) for ``backbone``
    into the store ``out``, dataset ``dataset``.

    ``cells``: a table (or a CSV/Parquet path) with one row per feature row, in the same order,
    and any of the columns ``id, path, label, split, domain, group``; without it (or without
    ``id``) cells are numbered ``000000, 000001, ...``. ``labels`` sets or replaces the label
    column. A dataset that already exists must list the same cells (ids and paths). ``source``
    is a free-text note of where the features come from, kept in the provenance.
    """
    pools = _pools(features)
    n, width = next(iter(pools.values())).shape
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    table = _cells_table(cells, labels, n)
    stored = {p: _cast(a, store_dtype, p) for p, a in pools.items()}
    ok = np.ones(n, dtype=bool)
    for a in pools.values():
        ok &= np.isfinite(a).all(axis=1)
    digest = _features_digest(pools)
    key = f"{safe_key(backbone)}/imported/clean"
    store = open_store(out, mode="a")
    origin = str(Path(cells).resolve()) if isinstance(cells, (str, os.PathLike)) else "<memory>"
    ds = store.require_dataset(CellSource(dataset, "features", origin, table), name=dataset)
    with store.lock(f"features::{ds.name}::{key}"):
        fs = ds.require_feature_set(
            key,
            width=int(width),
            pools=list(pools),
            chunk_size=chunk_size,
            dtype=store_dtype,
            provenance=_provenance(backbone, list(pools), store_dtype, digest, source),
            fingerprint={"backbone": backbone, "imported_sha256": digest, "store_dtype": store_dtype},
        )
        pending = fs.pending_chunks(list(pools))
        result = ImportResult(store.url, ds.name, key, n, cache_hit=not pending, not_ok=int((~ok).sum()))
        error = np.where(ok, "", NON_FINITE)
        for c in pending:
            rows = fs.chunk_rows(c)
            values = {p: np.where(ok[rows, None], a[rows], 0).astype(store_dtype) for p, a in stored.items()}
            fs.write_chunk(c, values, ok[rows], error[rows])
            result.chunks_written += 1
    return result


def _pools(features: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    pools = dict(features) if isinstance(features, Mapping) else {"cls": features}
    if not pools:
        raise ValueError("no features given")
    shapes = set()
    for p, a in pools.items():
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"features for pool '{p}' must be a non-empty (N, D) array, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"features for pool '{p}' must be floating point, got {a.dtype}")
        pools[p] = a
        shapes.add(a.shape)
    if len(shapes) != 1:
        raise ValueError(f"every pool needs the same (N, D) shape, got {sorted(shapes)}")
    return pools


def _cells_table(cells, labels, n: int) -> pd.DataFrame:
    if isinstance(cells, (str, os.PathLike)):
        path = Path(cells)
        if not path.exists():
            raise SourceError(f"cell table not found: {path}")
        if path.suffix.lower() in (".parquet", ".pq"):
            cells = pd.read_parquet(path)
        else:
            cells = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = pd.DataFrame(index=range(n)) if cells is None else cells.reset_index(drop=True)
    if len(df) != n:
        raise SourceError(f"{n} feature rows but {len(df)} cells in the table")
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise SourceError(f"{n} feature rows but {len(labels)} labels")
        df = df.assign(label=labels)
    cols = {c: (df[c].astype(str).tolist() if c in df.columns else None) for c in OBS_COLUMNS}
    ids = cols["id"] or [f"{i:06d}" for i in range(n)]
    if len(set(ids)) != n:
        raise SourceError("cell ids must be unique")
    return _table(
        ids,
        cols["path"] or [""] * n,
        cols["label"] or [""] * n,
        split=cols["split"],
        domain=cols["domain"],
        group=cols["group"],
    )


def _cast(a: np.ndarray, dtype: str, pool: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(dtype)
    overflow = np.isfinite(a) & ~np.isfinite(out)
    if overflow.any():
        row = int(np.flatnonzero(overflow.any(axis=1))[0])
        biggest = float(np.abs(a[row][np.isfinite(a[row])]).max())
        raise ValueError(
            f"pool '{pool}': row {row} has values beyond the {dtype} range (max |x| {biggest:.3g}); "
            f"import with store_dtype='float32'"
        )
    return out


def _features_digest(pools: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in sorted(pools):
        a = np.ascontiguousarray(pools[p])
        h.update(f"{p}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def _provenance(backbone: str, pools: list[str], store_dtype: str, digest: str, source: str) -> dict[str, Any]:
    from . import __version__

    return {
        "backbone": {"name": backbone},
        "weights": {"source": "imported"},
        "imported": {"source": source, "features_sha256": digest},
        "pools": pools,
        "store_dtype": store_dtype,
        "versions": {"embedcache": __version__, "numpy": np.__version__},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def check_embeddable(fs: FeatureSet) -> None:
    """Raise :class:`StoreError` when ``fs`` holds imported features (no known model to embed with)."""
    if fs.attrs.get("provenance", {}).get("weights", {}).get("source") == "imported":
        raise StoreError(
            f"'{fs.key}' holds imported features: embedcache does not know the model that made them, so it "
            f"cannot embed new images the same way; embed them with that model and compare the vectors"
        )
