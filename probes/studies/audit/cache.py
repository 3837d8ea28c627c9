"""The audit's out-of-fold cache: a Parquet file, one row per model x cell, keyed by
:data:`KEY_COLUMNS`, read before and updated after an audit (beside the store by default).

Each model's rows carry a CRC-32 of its probabilities, folds, cell ids and classes (``crc``): an entry whose
values no longer match it (edited, damaged), or that has none (written before checksums), is not reused but
refitted, with a warning naming it."""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from probes.errors import ProbeError
from probes.studies.audit.folds import OOF

KEY_COLUMNS = [
    "backbone",
    "feature_key",
    "feature_digest",
    "pool",
    "probe",
    "probe_impl",
    "seed",
    "folds",
    "scheme",
    "label_digest",
]
LEGACY_DIR = ".probes"  # where stores made before side data moved out kept the cache (inside the Zarr tree)


def _fs(path: str | os.PathLike):
    import fsspec.core

    return fsspec.core.url_to_fs(str(path))


def read_oof_cache(path: str | os.PathLike | None, ids: Sequence[str] | np.ndarray) -> dict[tuple, OOF]:
    """Every model in the cache file whose cells are exactly ``ids`` (in order), by key tuple."""
    if path is None:
        return {}
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    if not fs.isfile(p):
        return {}
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise ProbeError(f"the out-of-fold cache {path} cannot be read ({e}); delete it or pass another --cache") from e
    if not set(KEY_COLUMNS) <= set(table.column_names):
        return {}  # written by an older version: recomputed and replaced
    keys = table.select(KEY_COLUMNS).to_pandas()
    out: dict[tuple, OOF] = {}
    ids = np.asarray(ids, dtype=str)
    has_crc = "crc" in table.column_names
    for key, rows in keys.groupby(KEY_COLUMNS, sort=False).indices.items():
        if len(rows) != len(ids):
            continue
        sub = table.take(rows)
        if not np.array_equal(sub.column("id").to_numpy(zero_copy_only=False).astype(str), ids):
            continue
        classes = json.loads(sub.column("classes")[0].as_py())
        proba = sub.column("proba").combine_chunks().flatten().to_numpy().reshape(len(rows), len(classes))
        k = {c: (v.item() if hasattr(v, "item") else v) for c, v in zip(KEY_COLUMNS, key)}
        fold = sub.column("fold").to_numpy()
        proba32 = proba.astype(np.float32)
        recorded = int(sub.column("crc")[0].as_py()) if has_crc else None
        if recorded != entry_crc(proba32, fold, ids, classes):
            why = "has no checksum (written by an older embedcache)" if recorded is None else "fails its checksum"
            warnings.warn(
                f"the out-of-fold cache {path}: the entry of {k['backbone']} / {k['probe']} / seed {k['seed']} {why}: "
                "it is refitted, not reused",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        out[tuple(k[c] for c in KEY_COLUMNS)] = OOF(k, classes, proba32, fold)
    return out


def entry_crc(proba: np.ndarray, fold: np.ndarray, ids: np.ndarray, classes: Sequence[str]) -> int:
    """CRC-32 of one model's cache entry: its float32 probabilities, folds, cell ids and classes."""
    from embedcache.store.checksums import crc_values

    parts = (
        crc_values(np.ascontiguousarray(proba, dtype=np.float32)),
        crc_values(np.asarray(fold, dtype=np.int64)),
        crc_values(np.asarray(ids, dtype=str)),
        crc_values(np.asarray(list(classes), dtype=str)),
    )
    return zlib.crc32(":".join(map(str, parts)).encode())


def write_oof_cache(path: str | os.PathLike, oofs: Sequence[OOF], ids: Sequence[str] | np.ndarray) -> str:
    """Write ``oofs`` into the cache file (local path or fsspec URL), keeping every other model.

    Earlier rows of the same model (same key but for ``label_digest``: e.g. before a relabel)
    are replaced. Local files are replaced atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = _fs(path)
    model_cols = [c for c in KEY_COLUMNS if c != "label_digest"]
    new = {tuple(str(o.key[c]) for c in model_cols) for o in oofs}
    parts = []
    if fs.isfile(p):
        try:
            with fs.open(p, "rb") as f:
                old = pq.read_table(f)
        except Exception:  # noqa: BLE001  an unreadable cache is rebuilt (read_oof_cache already said so)
            old = None
        if old is not None and set(KEY_COLUMNS) <= set(old.column_names):
            mk = old.select(model_cols).to_pandas().astype(str)
            stale = np.array([tuple(r) in new for r in mk.itertuples(index=False)], dtype=bool)
            if (~stale).any():
                parts.append(old.filter(pa.array(~stale)))
    ids = np.asarray(ids, dtype=str)
    for o in oofs:
        n, c = o.proba.shape
        cols = {k: pa.array([o.key[k]] * n) for k in KEY_COLUMNS}
        cols["seed"] = pa.array([int(o.key["seed"])] * n, pa.int64())
        cols["folds"] = pa.array([int(o.key["folds"])] * n, pa.int64())
        cols.update(
            crc=pa.array([entry_crc(o.proba, o.fold, ids, o.classes)] * n, pa.int64()),
            id=pa.array(ids),
            fold=pa.array(o.fold.astype(np.int64)),
            classes=pa.array([json.dumps(o.classes)] * n),
            proba=pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)), pa.array(o.proba.astype(np.float32).ravel())
            ),
        )
        parts.append(pa.table(cols))
    schema = parts[-1].schema
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in parts])
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{p}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    else:
        with fs.open(p, "wb") as f:
            pq.write_table(table, f)
    return str(path)


def write_cache(
    cache: str | os.PathLike,
    oofs: Sequence[OOF],
    ids: Sequence[str] | np.ndarray,
    lock: Callable[[], Any] | None = None,
) -> str:
    """Write the cache, holding ``lock()`` when given (retried while another audit writes)."""
    from embedcache.store import StoreBusyError

    try:
        if lock is None:
            return write_oof_cache(cache, oofs, ids)
        for attempt in range(120):
            try:
                with lock():
                    return write_oof_cache(cache, oofs, ids)
            except StoreBusyError:
                if attempt == 119:
                    raise
                time.sleep(0.5)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(f"cannot write the out-of-fold cache {cache}: {e}; pass --cache FILE elsewhere") from e
    raise AssertionError("unreachable")  # pragma: no cover


def check_writable(cache: str) -> None:
    """Fail early, with what to do, when the out-of-fold cache cannot be written."""
    fs, p = _fs(cache)
    parent = p.rsplit("/", 1)[0] if "/" in p else "."
    try:
        fs.makedirs(parent, exist_ok=True)
    except Exception as e:
        raise ProbeError(
            f"cannot write the out-of-fold cache {cache} ({e}); pass --cache FILE elsewhere or --no-cache"
        ) from e
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem) and not os.access(parent, os.W_OK):
        raise ProbeError(
            f"cannot write the out-of-fold cache {cache} (folder not writable); "
            "pass --cache FILE elsewhere or --no-cache"
        )


def default_cache(store_url: str, dataset: str) -> str:
    """Where a store's audits keep out-of-fold probabilities: beside the store, outside its Zarr tree
    (:func:`embedcache.store.store.side_url`: ``<store>.embedcache/probes/audit-oof-<dataset>.parquet``)."""
    from embedcache.store import side_url

    return side_url(store_url, "probes", f"audit-oof-{dataset}.parquet")


def legacy_cache(store_url: str, dataset: str) -> str:
    """Where stores made by earlier versions kept it: ``<store>/.probes/audit-oof-<dataset>.parquet``."""
    return f"{str(store_url).rstrip('/')}/{LEGACY_DIR}/audit-oof-{dataset}.parquet"


def cache_to_read(path: str, legacy: str | None) -> str:
    """``path``, or the ``legacy`` file when only that one exists (it is read; new fits go to ``path``)."""
    if legacy is None:
        return path
    fs, p = _fs(path)
    if fs.isfile(p):
        return path
    lfs, lp = _fs(legacy)
    return legacy if lfs.isfile(lp) else path


def adopt_legacy(path: str, legacy: str) -> None:
    """Copy the ``legacy`` cache to ``path`` (before new models are added there), so its models carry over."""
    fs, p = _fs(path)
    lfs, lp = _fs(legacy)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with lfs.open(lp, "rb") as src, fs.open(p, "wb") as dst:
        dst.write(src.read())
