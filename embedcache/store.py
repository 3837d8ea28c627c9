"""The Zarr v3 feature cache.

Layout (one store, many datasets, backbones and perturbations)::

    cache.zarr/                          attrs: schema_version
      <dataset>/                         attrs: kind=dataset, source, digest, n
        obs/  id path label split domain group      (1-D string arrays, one row per cell)
        features/<backbone>/<prep>/<perturbation>/  attrs: kind=feature_set, provenance, fingerprint
          cls, mean        (N, D) float16, chunks (C, D)
          ok               (N,) bool      False where the image could not be read
          error            (N,) str       why not ok
          done_cls, ...    (ceil(N / C),) bool, one stored object per row-chunk

A row-chunk is written, read back and compared, and only then is its ``done_<pool>``
flag set. Each flag is its own object, so a killed run leaves every unfinished chunk
``False`` and a rerun redoes exactly those; writers of different chunks never touch
the same object. Completion is derived from the flags, never stored separately.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from .sources import OBS_COLUMNS, CellSource

SCHEMA_VERSION = 1
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
_LOCKS_DIR = ".locks"
STORE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as
OUTSIDE_SUBSET = "outside the perturbed subset"  # error text of rows a perturbed set leaves out
_memory_locks: dict[str, threading.Lock] = {}
_memory_locks_guard = threading.Lock()


@dataclass
class WriteResult:
    """What writing one feature set did (``extract``, ``import_features``)."""

    store: str
    dataset: str
    key: str
    n_cells: int
    cache_hit: bool  # the set was complete already: nothing written
    chunks_written: int = 0


class StoreError(RuntimeError):
    """The store cannot be used as asked (missing, wrong schema, conflicting contents)."""


class StoreBusyError(StoreError):
    """Another process is writing the same feature set."""


class FeatureSetConflict(StoreError):
    """A feature set of that key exists but was made differently."""


def open_store(url: str | os.PathLike, mode: str = "r") -> "Store":
    """Open a store at a local path or fsspec URL (``file://``, ``memory://``, ``s3://``...).

    ``mode="r"`` reads an existing store; ``mode="a"`` creates it when missing.
    """
    return Store(str(url), mode)


class Store:
    """A feature cache holding one or more datasets."""

    def __init__(self, url: str, mode: str = "r"):
        self.url = url
        self.mode = mode
        if url.startswith("file://"):
            url = url[len("file://") :]  # a local store: atomic writes and flock locking
        try:
            self.root = zarr.open_group(url, mode="r" if mode == "r" else "a")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no embedcache store at {url}") from e
        version = self.root.attrs.get("schema_version")
        if version is None:
            if mode == "r":
                raise StoreError(f"{url} is a Zarr group but not an embedcache store (no schema_version)")
            if list(self.root.keys()):
                raise StoreError(f"{url} holds other Zarr data; refusing to turn it into an embedcache store")
            self.root.attrs.update({"schema_version": SCHEMA_VERSION, "created_by": "embedcache"})
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{url} has store schema {version}; this embedcache reads schema {SCHEMA_VERSION}")

    # -- datasets ---------------------------------------------------------------------------
    def datasets(self) -> list[str]:
        """Names of the datasets in the store."""
        with _quiet_zarr():
            return sorted(k for k in self.root.group_keys() if self.root[k].attrs.get("kind") == "dataset")

    def dataset(self, name: str | None = None) -> "Dataset":
        """A dataset by name (the only one when ``name`` is None)."""
        names = self.datasets()
        if name is None:
            if len(names) != 1:
                raise StoreError(f"{self.url} holds {len(names)} datasets ({', '.join(names)}); name one")
            name = names[0]
        if name not in names:
            raise StoreError(f"no dataset '{name}' in {self.url} (has: {', '.join(names) or 'none'})")
        return Dataset(self, name)

    def require_dataset(self, source: CellSource, name: str | None = None) -> "Dataset":
        """The dataset for ``source``, written on first use; its cell list must match after."""
        name = name or source.name
        _check_name(name)
        digest = source.digest()
        with self.lock(f"dataset-{name}"):
            if name in self.datasets():
                ds = Dataset(self, name)
                if ds.attrs["digest"] != digest:
                    raise StoreError(
                        f"dataset '{name}' in {self.url} has a different cell list ({ds.n} cells) than "
                        f"{source.origin} ({len(source)} cells); give another --dataset name to store it beside"
                    )
                return ds
            g = self.root.require_group(name)
            obs = g.require_group("obs")
            n = len(source)
            for col in OBS_COLUMNS:
                a = obs.create_array(col, shape=(n,), dtype=str, chunks=(min(n, 65536),), overwrite=True)
                a[:] = source.table[col].to_numpy(dtype=str)
            g.require_group("features")
            # attrs last: a dataset without them is an unfinished write and gets rewritten
            g.attrs.update(
                {"kind": "dataset", "source": {"kind": source.kind, "origin": source.origin}, "digest": digest, "n": n}
            )
            return Dataset(self, name)

    # -- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive, non-blocking lock called ``name`` on this store.

        Local stores use ``flock`` (released by the OS even on SIGKILL); ``memory://``
        stores use an in-process lock. Other fsspec stores are not locked: concurrent
        writers there only repeat identical chunk writes.
        """
        local = self.local_path()
        if local is not None:
            lock_dir = local / _LOCKS_DIR
            lock_dir.mkdir(exist_ok=True)
            path = lock_dir / (hashlib.sha1(name.encode()).hexdigest()[:16] + ".lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                    raise StoreBusyError(
                        f"another embedcache process is writing '{name}' in {self.url} ({holder}); "
                        "wait for it to finish (a rerun then resumes or is a cache hit), or write elsewhere"
                    ) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
                yield
            finally:
                os.close(fd)  # closing releases the flock
        elif self.url.startswith("memory://"):
            with _memory_locks_guard:
                lk = _memory_locks.setdefault(f"{self.url}::{name}", threading.Lock())
            if not lk.acquire(blocking=False):
                raise StoreBusyError(f"'{name}' in {self.url} is being written by another thread")
            try:
                yield
            finally:
                lk.release()
        else:
            yield

    def local_path(self) -> Path | None:
        """The store's directory when it is on the local file system."""
        store = self.root.store
        if isinstance(store, zarr.storage.LocalStore):
            return Path(store.root)
        return None

    def info(self) -> dict[str, Any]:
        """A summary of every dataset and feature set, for ``embedcache info``."""
        out: dict[str, Any] = {"url": self.url, "schema_version": SCHEMA_VERSION, "datasets": {}}
        for name in self.datasets():
            ds = self.dataset(name)
            out["datasets"][name] = ds.info()
        return out


class Dataset:
    """One set of cells: its table (``obs``) and its feature sets."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.group = store.root[name]
        self.attrs = self.group.attrs.asdict()
        self.n: int = int(self.attrs["n"])

    @property
    def obs(self) -> pd.DataFrame:
        """The cell table: id, path, label (current, after corrections), split, domain, group,
        and ``label_original`` (as extracted; never overwritten)."""
        g = self.group["obs"]
        df = pd.DataFrame({c: _strings(g[c][:]) for c in OBS_COLUMNS})
        df["label_original"] = df["label"]
        if "labels" in self.group and "current" in self.group["labels"]:
            df["label"] = _strings(self.group["labels"]["current"][:])
        return df

    def label_history(self) -> pd.DataFrame:
        """Every applied label correction, oldest first: id, old, new, time, source, note."""
        if "labels" not in self.group or "history" not in self.group["labels"]:
            return pd.DataFrame(columns=list(_HISTORY_COLUMNS))
        h = self.group["labels"]["history"]
        return pd.DataFrame({c: _strings(h[c][:]) for c in _HISTORY_COLUMNS})

    def apply_corrections(self, corrections: pd.DataFrame | str | os.PathLike, source: str | None = None) -> int:
        """Apply reviewed label corrections (columns ``id`` and ``new_label``, optional ``note``).

        The original labels stay in ``obs/label``; the current labels and an append-only
        history live under ``labels/``. Unknown ids or empty labels are a clear error and
        nothing is written. Returns the number of labels that changed.
        """
        if not isinstance(corrections, pd.DataFrame):
            source = source or str(corrections)
            corrections = pd.read_csv(corrections, dtype=str, keep_default_na=False)
        missing = [c for c in ("id", "new_label") if c not in corrections.columns]
        if missing:
            raise StoreError(f"corrections need columns id and new_label (missing: {', '.join(missing)})")
        corr = corrections.astype(str)
        if self.store.mode == "r":
            return open_store(self.store.url, "a").dataset(self.name).apply_corrections(corr, source=source)
        with self.store.lock(f"labels-{self.name}"):
            obs = self.obs
            index = pd.Series(np.arange(len(obs)), index=obs["id"])
            unknown = sorted(set(corr["id"]) - set(index.index))
            if unknown:
                raise StoreError(f"{len(unknown)} correction ids are not cells of '{self.name}': {', '.join(unknown[:5])}")
            empty = corr["new_label"].str.strip() == ""
            if empty.any():
                raise StoreError(f"correction row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}: new_label is empty")
            current = obs["label"].to_numpy(dtype=object).copy()
            rows = index[corr["id"]].to_numpy()
            new = corr["new_label"].str.strip().to_numpy(dtype=object)
            changed = current[rows] != new
            if not changed.any():
                return 0
            old = current[rows][changed]
            current[rows[changed]] = new[changed]
            labels = self.group.require_group("labels")
            if "current" not in labels:
                labels.create_array("current", shape=(self.n,), dtype=str, chunks=(min(self.n, 65536),))
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            note = corr["note"].to_numpy(dtype=object)[changed] if "note" in corr.columns else np.full(int(changed.sum()), "")
            entries = {
                "id": corr["id"].to_numpy(dtype=object)[changed],
                "old": old,
                "new": new[changed],
                "time": np.full(int(changed.sum()), stamp),
                "source": np.full(int(changed.sum()), source or "python"),
                "note": note,
            }
            hist = labels.require_group("history")
            for col, values in entries.items():  # history first: a killed run leaves labels unchanged
                values = np.asarray(values, dtype=str)
                if col not in hist:
                    hist.create_array(col, shape=(0,), dtype=str, chunks=(4096,))
                a = hist[col]
                start = a.shape[0]
                a.resize((start + len(values),))
                a[start:] = values
            labels["current"][:] = current.astype(str)
            return int(changed.sum())

    def feature_keys(self) -> list[str]:
        """Keys of all feature sets, e.g. ``uni/224-bicubic/clean``."""
        feats = self.group["features"]
        with _quiet_zarr():
            return sorted(
                path
                for path, node in feats.members(max_depth=None)
                if isinstance(node, zarr.Group) and node.attrs.get("kind") == "feature_set"
            )

    def feature_set(self, key: str) -> "FeatureSet":
        if key not in self.feature_keys():
            raise StoreError(
                f"no feature set '{key}' in dataset '{self.name}' (has: {', '.join(self.feature_keys()) or 'none'})"
            )
        return FeatureSet(self, key)

    def find_feature_set(self, backbone: str) -> "FeatureSet":
        """The feature set for a backbone name or a full key (clean, if several)."""
        keys = self.feature_keys()
        backbone = safe_key(backbone)
        if backbone in keys:
            return FeatureSet(self, backbone)
        matches = [k for k in keys if k.split("/")[0] == backbone or k.split("/")[0].split("@")[0] == backbone]
        clean = [k for k in matches if k.endswith("/clean")]
        if len(clean) == 1:
            return FeatureSet(self, clean[0])
        if len(matches) == 1:
            return FeatureSet(self, matches[0])
        if not matches:
            raise StoreError(
                f"no features for '{backbone}' in dataset '{self.name}' (has: {', '.join(keys) or 'none'}); "
                f"run: embedcache extract --model {backbone} ..."
            )
        raise StoreError(f"'{backbone}' matches several feature sets ({', '.join(matches)}); give the full key")

    def require_feature_set(
        self,
        key: str,
        *,
        width: int,
        pools: Sequence[str],
        chunk_size: int,
        dtype: str,
        provenance: dict[str, Any],
        fingerprint: dict[str, Any],
    ) -> "FeatureSet":
        """Create the feature set, or check that an existing one was made the same way."""
        digest = _digest(fingerprint)
        feats = self.group["features"]
        if key in self.feature_keys():
            fs = FeatureSet(self, key)
            if fs.attrs["fingerprint"] != digest:
                theirs, ours = fs.attrs.get("fingerprint_fields", {}), fingerprint
                diff = {k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
                raise FeatureSetConflict(
                    f"feature set '{key}' exists but was made differently: "
                    + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                )
            g = fs.group
            if fs.chunk_size != chunk_size:
                chunk_size = fs.chunk_size  # an existing set keeps its chunking
        else:
            # a group left without attrs by a killed run is an unfinished creation: start it afresh
            g = feats.create_group(key, overwrite=True)
        n = self.n
        n_chunks = -(-n // chunk_size)
        for pool in pools:
            if pool not in g.array_keys():
                g.create_array(
                    pool, shape=(n, width), dtype=dtype, chunks=(chunk_size, width), compressors=_COMPRESSOR, fill_value=0
                )
                g.create_array(f"done_{pool}", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False, compressors=None)
        if "ok" not in g.array_keys():
            g.create_array("ok", shape=(n,), dtype=bool, chunks=(chunk_size,), fill_value=False)
            g.create_array("error", shape=(n,), dtype=str, chunks=(chunk_size,))
        if g.attrs.get("kind") != "feature_set":
            g.attrs.update(
                {
                    "kind": "feature_set",
                    "key": key,
                    "chunk_size": chunk_size,
                    "width": width,
                    "dtype": dtype,
                    "fingerprint": digest,
                    "fingerprint_fields": fingerprint,
                    "provenance": provenance,
                }
            )
        return FeatureSet(self, key)

    def info(self) -> dict[str, Any]:
        out = {"n": self.n, "source": self.attrs.get("source"), "feature_sets": {}}
        obs = self.obs
        if (obs["label"] != "").any():
            out["classes"] = int(obs.loc[obs["label"] != "", "label"].nunique())
        for key in self.feature_keys():
            out["feature_sets"][key] = FeatureSet(self, key).info()
        return out


class FeatureSet:
    """Pooled features of one backbone × preprocessing × perturbation for a dataset."""

    def __init__(self, dataset: Dataset, key: str):
        self.dataset = dataset
        self.key = key
        self.group = dataset.group["features"][key]
        self.attrs = self.group.attrs.asdict()
        self.chunk_size: int = int(self.attrs["chunk_size"])
        self.n = dataset.n
        self.n_chunks = -(-self.n // self.chunk_size)

    @property
    def pools(self) -> list[str]:
        return sorted(k for k in self.group.array_keys() if f"done_{k}" in self.group.array_keys())

    def chunk_rows(self, c: int) -> slice:
        return slice(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))

    def done(self, pool: str) -> np.ndarray:
        """Which row-chunks of ``pool`` are written and verified."""
        return np.asarray(self.group[f"done_{pool}"][:], dtype=bool)

    def pending_chunks(self, pools: Sequence[str]) -> list[int]:
        """Row-chunks that some pool in ``pools`` still lacks."""
        pending = np.zeros(self.n_chunks, dtype=bool)
        for pool in pools:
            pending |= ~self.done(pool)
        return np.flatnonzero(pending).tolist()

    def is_complete(self, pools: Sequence[str] | None = None) -> bool:
        return not self.pending_chunks(pools or self.pools)

    def write_chunk(self, c: int, features: dict[str, np.ndarray], ok: np.ndarray, error: np.ndarray) -> None:
        """Write row-chunk ``c``, read it back, and only then mark it done."""
        rows = self.chunk_rows(c)
        self.group["ok"][rows] = ok
        self.group["error"][rows] = error
        for pool, values in features.items():
            self.group[pool][rows] = values
        for pool, values in features.items():
            back = self.group[pool][rows]
            if not np.array_equal(back, values):
                raise StoreError(f"verification failed for chunk {c} of '{self.key}/{pool}': the store returned other values")
        if not np.array_equal(self.group["ok"][rows], ok):
            raise StoreError(f"verification failed for chunk {c} of '{self.key}/ok'")
        for pool in features:
            self.group[f"done_{pool}"][c] = True

    def array(self, pool: str = "cls") -> zarr.Array:
        if pool not in self.pools:
            raise StoreError(f"'{self.key}' has no '{pool}' features (has: {', '.join(self.pools)})")
        return self.group[pool]

    def ok(self) -> np.ndarray:
        return np.asarray(self.group["ok"][:], dtype=bool)

    def errors(self) -> pd.Series:
        return pd.Series(np.asarray(self.group["error"][:], dtype=object).astype(str), name="error")

    def to_numpy(self, pool: str = "cls", rows: np.ndarray | slice | None = None, dtype=np.float32) -> np.ndarray:
        """Features as numpy (only ``rows`` are read when given); refuses unfinished chunks."""
        self._check_complete(pool)
        arr = self.array(pool)
        if rows is None:
            return np.asarray(arr[:], dtype=dtype)
        if isinstance(rows, slice):
            return np.asarray(arr[rows], dtype=dtype)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return np.asarray(arr.get_orthogonal_selection((rows, slice(None))), dtype=dtype)

    def to_dask(self, pool: str = "cls"):
        """Features as a lazy dask array chunked like the store."""
        import dask.array as da

        self._check_complete(pool)
        return da.from_zarr(self.array(pool))

    def _check_complete(self, pool: str) -> None:
        missing = int((~self.done(pool)).sum())
        if missing:
            raise StoreError(
                f"'{self.key}/{pool}' is incomplete ({missing} of {self.n_chunks} chunks not written); "
                "rerun the same extract command to finish it"
            )

    def info(self) -> dict[str, Any]:
        ok = self.ok()
        prov = self.attrs.get("provenance", {})
        pools = {p: f"{int(self.done(p).sum())}/{self.n_chunks} chunks" for p in self.pools}
        return {
            "status": "complete" if self.is_complete() else "partial",
            "pools": pools,
            "shape": [self.n, int(self.attrs["width"])],
            "dtype": self.attrs["dtype"],
            "written_cells": int(sum(self.chunk_rows(c).stop - self.chunk_rows(c).start for c in np.flatnonzero(self.done(self.pools[0])))) if self.pools else 0,
            "skipped_cells": int((~ok & self._written_rows() & (self.errors().to_numpy() != OUTSIDE_SUBSET)).sum()),
            "rows": (prov.get("perturbation") or {}).get("rows", "all"),
            "backbone": prov.get("backbone", {}).get("name"),
            "weights": prov.get("weights", {}),
        }

    def _written_rows(self) -> np.ndarray:
        rows = np.zeros(self.n, dtype=bool)
        if self.pools:
            for c in np.flatnonzero(self.done(self.pools[0])):
                rows[self.chunk_rows(c)] = True
        return rows


def safe_key(name: str) -> str:
    """A backbone name or feature key as stored (``timm:vit_small`` -> ``timm-vit_small``)."""
    return name.replace(":", "-")


_HISTORY_COLUMNS = ("id", "old", "new", "time", "source", "note")


def _strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(str)


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith((".", "__")):
        raise StoreError(f"bad dataset name {name!r}: use letters, digits, '-', '_' (no '/', no leading '.')")


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Hide zarr's warning about our ``.locks`` folder when listing members."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        yield


__all__ = ["open_store", "Store", "Dataset", "FeatureSet", "StoreError", "StoreBusyError", "FeatureSetConflict", "safe_key"]
