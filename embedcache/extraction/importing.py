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

from embedcache.inputs.images import is_url
from embedcache.inputs.sources import OBS_COLUMNS, CellSource, SourceError, _table
from embedcache.store import FeatureSet, StoreError, WriteResult, open_store, safe_key
from embedcache.store.groups import STORE_DTYPES

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
    dataset: str | None = None,
    store_dtype: str = "float16",
    chunk_size: int = 1024,
    source: str = "",
) -> ImportResult:
    """Write ``features`` (N, D) (or ``{pool: (N, D)}``, default pool ``cls``) for ``backbone``
    into the store ``out``, dataset ``dataset`` (default: the store's only dataset, beside the
    extracted cells; ``cells`` in a new store).

    ``cells``: a table (or a CSV/Parquet path) with one row per feature row and any of the
    columns ``id, path, label, split, domain, group``; without it (or without ``id``) cells are
    numbered ``000000, 000001, ...``. ``labels`` sets or replaces the label column. Into a
    dataset that already exists the rows are matched on ``id`` (on ``path`` when the table has
    paths but no ids): the same cells in another order are reordered to the dataset's order,
    other cells are an error saying which differ; the dataset's own cell table (labels, splits)
    is kept. ``source`` is a free-text note of where the features come from, kept in the provenance.
    """
    pools = _pools(features)
    n, width = next(iter(pools.values())).shape
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    table = _cells_table(cells, labels, n)
    store = open_store(out, mode="a")
    origin = str(Path(cells).resolve()) if isinstance(cells, (str, os.PathLike)) else "<memory>"
    dataset = dataset or _default_dataset(store)
    if dataset in store.datasets():
        ds = store.dataset(dataset)
        order = match_cells(ds.obs, table, origin, ds.name, by=_match_column(cells))
        if order is not None:
            pools = {p: np.asarray(a)[order] for p, a in pools.items()}
    else:
        ds = store.require_dataset(CellSource(dataset, "features", origin, table), name=dataset)
    stored = {p: _cast(a, store_dtype, p) for p, a in pools.items()}
    ok = np.ones(n, dtype=bool)
    for a in pools.values():
        ok &= np.isfinite(a).all(axis=1)
    digest = _features_digest(pools)
    key = f"{safe_key(backbone)}/imported/clean"
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


def _default_dataset(store: Any) -> str:
    """The store's only dataset; ``cells`` in an empty store; several datasets: name one."""
    names = store.datasets()
    if len(names) == 1:
        return str(names[0])
    if not names:
        return "cells"
    raise StoreError(f"{store.url} holds {len(names)} datasets ({', '.join(names)}); name one with --dataset")


def _match_column(cells: Any) -> str:
    """``id`` unless the cell table has paths but no ids (then ``path``)."""
    if cells is None:
        return "id"
    if isinstance(cells, (str, os.PathLike)):
        path = Path(cells)
        header = pd.read_parquet(path).columns if path.suffix.lower() in (".parquet", ".pq") else None
        if header is None:
            header = pd.read_csv(path, dtype=str, nrows=0).columns
        cols = {str(c).strip() for c in header}
    else:
        cols = {str(c).strip() for c in cells.columns}
    return "path" if "id" not in cols and "path" in cols else "id"


def match_cells(obs: pd.DataFrame, table: pd.DataFrame, origin: str, name: str, by: str = "id") -> np.ndarray | None:
    """Match an imported cell table to a dataset's ``obs`` on column ``by``: ``None`` when the rows are the
    same cells in the same order, the row order putting them in the dataset's order when they are a
    permutation; otherwise a :class:`StoreError` saying what differs."""
    have = obs[by].to_numpy(dtype=str)
    given = table[by].to_numpy(dtype=str)
    if by == "path":  # compare resolved paths: the dataset stores them absolute (URLs as they are)
        have = np.asarray([p if is_url(p) else os.path.normpath(p) for p in have])
        given = np.asarray([os.path.normpath(os.path.abspath(p)) if p and not is_url(p) else p for p in given])
    if len(have) == len(given) and (have == given).all():
        return None
    where = {v: i for i, v in enumerate(given)}
    missing = [v for v in have if v not in where]
    extra = sorted(set(given) - set(have))
    if not missing and not extra and len(given) == len(have):
        return np.asarray([where[v] for v in have], dtype=np.int64)

    def some(values: Sequence[str]) -> str:
        return ", ".join(values[:3]) + (" ..." if len(values) > 3 else "")

    parts = [f"{len(missing)} of the dataset's {by}s are not in it (e.g. {some(missing)})"] if missing else []
    if extra:
        parts.append(f"{len(extra)} of its {by}s are not in the dataset (e.g. {some(extra)})")
    if not parts:  # same sets, different lengths: repeated values
        parts.append(f"it has {len(given)} rows for the dataset's {len(have)} cells")
    hint = "" if by == "id" else " (the cell table has no id column: matched on path)"
    raise StoreError(
        f"dataset '{name}' has a different cell list ({len(have)} cells) than {origin} ({len(given)} cells), "
        f"matched by {by}{hint}: {'; '.join(parts)}. Give the same cells (any order), or import into another "
        "dataset with --dataset NAME"
    )


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
    from embedcache import __version__

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


def load_features(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """``.npy`` -> one (N, D) array (memory-mapped); ``.npz`` -> ``{pool: (N, D)}``, one array per pool."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features file not found: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    raise ValueError(f"{path.name}: features must be a .npy (N, D) array or a .npz with one (N, D) array per pool")


def import_features_file(
    out: str | os.PathLike,
    features: str | os.PathLike,
    cells: str | os.PathLike | Any | None = None,
    *,
    backbone: str,
    labels: Sequence[Any] | np.ndarray | None = None,
    dataset: str | None = None,
    store_dtype: str = "float16",
    chunk_size: int = 1024,
) -> ImportResult:
    """:func:`import_features` of the arrays in the file ``features`` (see :func:`load_features`);
    the file's absolute path is kept in the provenance."""
    feats = load_features(features)
    return import_features(
        out,
        feats,
        cells,
        backbone=backbone,
        labels=labels,
        dataset=dataset,
        store_dtype=store_dtype,
        chunk_size=chunk_size,
        source=str(Path(features).resolve()),
    )
