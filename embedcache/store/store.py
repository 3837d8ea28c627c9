"""The Zarr v3 feature cache.

Layout (one store, many datasets, backbones and perturbations)::

    cache.zarr/                          attrs: schema_version
      <dataset>/                         attrs: kind=dataset, source, digest, n
        obs/  id path label split domain group      (1-D string arrays, one row per cell)
        labels/                          corrections, one atomic pointer (see embedcache.store.labels)
        features/<backbone>/<prep>/<perturbation>/  attrs: kind=feature_set, provenance, fingerprint
          cls, mean        (N, D) float16, chunks (C, D)
          ok               (N,) bool      False where the image could not be read
          error            (N,) str       why not ok
          crc_cls, ..., crc_rows  (ceil(N / C),) int64, CRC-32 of each written row-chunk
          done_cls, ...    (ceil(N / C),) bool, one stored object per row-chunk
    cache.zarr.embedcache/               side data, outside the Zarr tree: locks/ (or leases/ on S3), probes/

A row-chunk is written, read back and compared, its checksums recorded, and only then is its
``done_<pool>`` flag set. Each flag is its own object, so a killed run leaves every unfinished
chunk ``False`` and a rerun redoes exactly those; writers of different chunks never touch the
same object. Completion is derived from the flags, never stored separately. Reading a done
chunk checks its checksum (:mod:`embedcache.store.verify`): damage is an error, never data.

A group's attributes are written in one metadata write, last: a group without them is an
interrupted creation, listed by :meth:`Store.incomplete_groups` and redone by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from embedcache.faults import checkpoint
from embedcache.inputs.sources import OBS_COLUMNS, CellSource
from embedcache.inputs.urls import refuse_credentials
from embedcache.store.checksums import crc_values
from embedcache.store.dataset import Dataset
from embedcache.store.errors import StoreBusyError, StoreError
from embedcache.store.groups import (
    CREATE_WAIT_S,
    DATASET_ATTRS,
    FEATURE_SET_ATTRS,
    LEGACY_SIDE_DIRS,
    SCHEMA_VERSION,
    SIDE_SUFFIX,
    as_group,
    check_name,
    complete,
    fresh_attrs,
    quiet_zarr,
)
from embedcache.store.locking.base import LockBusy, WriterLock
from embedcache.store.locking.flock import FlockLock, MemoryLock, remove_stale
from embedcache.store.locking.lease import LeaseLock
from embedcache.store.records import MetadataLost, array_record, node_exists

__all__ = ["open_store", "Store", "WriteResult", "side_url", "writer_lock_for", "refuse_inside_store", "store_holding"]


@dataclass
class WriteResult:
    """What writing one feature set did (``extract``, ``import_features``)."""

    store: str
    dataset: str
    key: str
    n_cells: int
    cache_hit: bool  # the set was complete already: nothing written
    chunks_written: int = 0


def open_store(url: str | os.PathLike, mode: str = "r") -> Store:
    """Open a store at a local path or fsspec URL (``file://``, ``memory://``, ``s3://``...).

    ``mode="r"`` reads an existing store; ``mode="a"`` creates it when missing.
    """
    return Store(str(url), mode)


def side_url(store_url: str | os.PathLike, *parts: str) -> str:
    """Where a store keeps files that are not Zarr data (locks, the audit's out-of-fold cache).

    They live in a sibling folder, ``<store>.embedcache/<parts...>``, so that plain zarr, xarray and
    dask walk the store without meeting foreign objects. Works for local paths and fsspec URLs.
    """
    base = str(store_url).rstrip("/") + SIDE_SUFFIX
    return "/".join([base, *parts])


class Store:
    """A feature cache holding one or more datasets."""

    def __init__(self, url: str, mode: str = "r"):
        refuse_credentials(url, "store", StoreError)  # before fsspec or botocore can print it
        self.url = url
        self.mode = mode
        path = url[len("file://") :] if url.startswith("file://") else url
        self._path = path
        local = None if "://" in path else Path(path)
        self.locks: WriterLock = writer_lock_for(path)
        try:
            if mode != "r" and not _store_exists(path, local):
                with self.lock("store-create", wait=CREATE_WAIT_S):  # two writers creating one store
                    if local is not None:
                        _refuse_foreign_folder(local)
                    self.root = zarr.open_group(path, mode="a")
                    self._check_schema()
            else:
                self.root = zarr.open_group(path, mode="r" if mode == "r" else "a")
                self._check_schema()
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no embedcache store at {url}") from e
        except ValueError as e:  # JSONDecodeError: a truncated or edited root zarr.json
            raise StoreError(
                f"the store's root metadata ({url}/zarr.json) cannot be read ({type(e).__name__}: {e}): truncated or "
                f"edited; run `embedcache verify {url} --repair` (it rebuilds it from the datasets' own metadata)"
            ) from e
        if local is not None and mode != "r":
            self._move_legacy_side_data(local)

    def _check_schema(self) -> None:
        version = self.root.attrs.get("schema_version")
        if version is None:
            if self.mode == "r":
                raise StoreError(f"{self.url} is a Zarr group but not an embedcache store (no schema_version)")
            if list(self.root.keys()):
                raise StoreError(f"{self.url} holds other Zarr data; refusing to turn it into an embedcache store")
            self.root.update_attributes({"schema_version": SCHEMA_VERSION, "created_by": "embedcache"})
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.url} has store schema {version}; this embedcache reads schema {SCHEMA_VERSION}")

    # -- datasets ---------------------------------------------------------------------------
    def datasets(self) -> list[str]:
        """Names of the (completely written, readable) datasets in the store."""
        return sorted(name for name, g in self._groups() if complete(g.attrs, DATASET_ATTRS, "dataset"))

    def _groups(self) -> list[tuple[str, zarr.Group]]:
        """The root's child groups that can be read (an unreadable zarr.json is reported by :meth:`lost_datasets`)."""
        out = []
        with quiet_zarr():
            for name in self._child_names():
                try:
                    node = self.root[name]
                except Exception:  # noqa: BLE001  a truncated or edited zarr.json
                    continue
                if isinstance(node, zarr.Group):
                    out.append((name, node))
        return out

    def _child_names(self) -> list[str]:
        """Every name under the root (listing the store, not parsing the children's metadata)."""

        async def names() -> list[str]:
            return [n async for n in self.root.store.list_dir(self.root.path)]

        return sorted(n for n in sync(names()) if n != "zarr.json" and not n.startswith("."))

    @property
    def records(self) -> dict[str, Any]:
        """What the root records of each dataset (its attributes; :mod:`embedcache.store.records`)."""
        records: Any = self.root.attrs.get("datasets") or {}
        return dict(records)

    def lost_datasets(self) -> list[str]:
        """Datasets the root records whose metadata (``zarr.json``) is gone or unreadable: damage, which
        ``embedcache verify --repair`` rebuilds from the record (never a dataset to create afresh)."""
        present = set(self.datasets())
        return sorted(name for name in self.records if name not in present)

    def record_dataset(self, name: str, attrs: dict[str, Any]) -> None:
        """Record ``attrs`` of dataset ``name`` in the root's attributes (under the store's attributes lock:
        writers of other datasets update the same record)."""
        with self.lock("store-attributes", wait=CREATE_WAIT_S):
            fresh = fresh_attrs(self.root)  # the newest record, not this object's copy
            records = dict(fresh.get("datasets") or {})
            records[name] = attrs
            self.root.update_attributes({"datasets": records})

    def incomplete_groups(self) -> list[str]:
        """Datasets and feature sets whose creation was interrupted (attributes not written);
        the next extract or import into them redoes the creation."""
        out = []
        with quiet_zarr():
            for name, g in self._groups():
                if not complete(g.attrs, DATASET_ATTRS, "dataset"):
                    if g.attrs.get("kind") == "dataset" or "obs" in g:
                        out.append(f"{name} (dataset)")
                    continue
                if "features" not in g:
                    continue
                for path, node in g["features"].members(max_depth=None):
                    if isinstance(node, zarr.Group) and ("ok" in node or node.attrs.get("kind") == "feature_set"):
                        if not complete(node.attrs, FEATURE_SET_ATTRS, "feature_set"):
                            out.append(f"{name}/{path} (feature set)")
        return out

    def dataset(self, name: str | None = None) -> Dataset:
        """A dataset by name (the only one when ``name`` is None)."""
        names = self.datasets()
        if name is None:
            if len(names) != 1:
                raise StoreError(f"{self.url} holds {len(names)} datasets ({', '.join(names)}); name one")
            name = names[0]
        if name not in names:
            raise StoreError(f"no dataset '{name}' in {self.url} (has: {', '.join(names) or 'none'})")
        return Dataset(self, name)

    def require_dataset(self, source: CellSource, name: str | None = None) -> Dataset:
        """The dataset for ``source``, written on first use; its cell list must match after.

        Two writers starting together on a new dataset cooperate: the second waits for the
        first to finish writing the cell table, then checks it like any later writer."""
        name = name or source.name
        check_name(name)
        digest = source.digest()
        if name in self.datasets():  # the common case, and the only one a read-only store allows
            return self._matching(Dataset(self, name), source, digest)
        with self.lock(f"dataset-{name}", wait=CREATE_WAIT_S):
            if name in self.datasets():
                return self._matching(Dataset(self, name), source, digest)
            self._refuse_to_overwrite(name)
            # absent, or an interrupted creation (no attributes, no features): write it afresh
            g = self.root.create_group(name, overwrite=True)
            obs = g.create_group("obs")
            n = len(source)
            arrays, crcs = {}, {}
            for col in OBS_COLUMNS:
                a = obs.create_array(
                    col, shape=(n,), dtype=str, chunks=(max(1, min(n, 65536)),), dimension_names=("cell",)
                )
                values = source.table[col].to_numpy(dtype=str)
                a[:] = values
                arrays[col], crcs[col] = array_record(a), crc_values(values)
            g.create_group("features")
            checkpoint("dataset:obs-written")
            # attributes last, in one write: a dataset without them is an unfinished creation
            attrs = {
                "kind": "dataset",
                "source": {"kind": source.kind, "origin": source.origin},
                "digest": digest,
                "n": n,
                "arrays": arrays,  # the cell table's metadata and checksums, compared on read
                "obs_crc": crcs,
            }
            g.update_attributes(attrs)
            self.record_dataset(name, attrs)
            return Dataset(self, name)

    def _refuse_to_overwrite(self, name: str) -> None:
        """A dataset whose metadata is lost but whose data is there is damage to repair, never a group to
        create afresh over it (which would delete its feature sets and label history)."""
        if name in self.records:
            raise MetadataLost(
                f"dataset '{name}' in {self.url} has lost its metadata (its zarr.json is gone or unreadable) but its "
                f"data is recorded: run `embedcache verify {self.url} --repair` (it writes the recorded metadata "
                "back), then rerun; nothing was written"
            )
        try:
            g = self.root[name] if node_exists(self.root, name) else None
        except Exception:  # noqa: BLE001  an unreadable zarr.json: its data is what matters here
            g = None
        if g is None and _has_keys(self.root, name):
            raise MetadataLost(
                f"'{name}' in {self.url} holds data but no readable zarr.json (a dataset whose metadata is lost, "
                f"written before metadata records): refusing to create a dataset over it; restore its zarr.json or "
                "give another --dataset name"
            )
        if isinstance(g, zarr.Group) and "features" in g:
            for _, node in as_group(g["features"]).members(max_depth=None):
                if isinstance(node, zarr.Array) and node.basename.startswith("done_") and np.asarray(node[:]).any():
                    raise MetadataLost(
                        f"dataset '{name}' in {self.url} has no attributes but holds written features: refusing to "
                        "create it afresh over them; restore its zarr.json (embedcache verify --repair)"
                    )

    def _matching(self, ds: Dataset, source: CellSource, digest: str) -> Dataset:
        if ds.attrs["digest"] != digest and ds.attrs["digest"] not in source.accepted_digests():
            raise StoreError(
                f"dataset '{ds.name}' in {self.url} has a different cell list ({ds.n} cells) than "
                f"{source.origin} ({len(source)} cells); give another --dataset name to store it beside"
            )
        return ds

    # -- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the exclusive lock ``name`` on this store, waiting up to ``wait`` seconds
        (0: refuse at once with the holder named).

        The backend is chosen once, by the store's URL (:func:`writer_lock_for`): ``flock`` in the side folder
        on local disk, an in-process lock for ``memory://``, a lease with expiry on other fsspec stores
        (``s3://``...). :meth:`write_guarantee` says which, and what it guarantees."""
        what = f"'{name}' in {self.url}"
        held = False
        try:
            with self.locks.hold(name, wait=wait, what=what):
                held = True
                yield
        except LockBusy as e:
            if held:  # lost while held (LockLost): the holder's own message says what happened
                raise
            raise StoreBusyError(
                f"{e}; wait for it to finish (a rerun then resumes or is a cache hit), or write elsewhere"
            ) from None

    def write_guarantee(self) -> dict[str, str]:
        """How writers of this store are kept apart: ``mechanism`` (``flock``, ``in-process lock``,
        ``lease-with-expiry``, ``best-effort lease``) and ``text`` (what it guarantees and what not)."""
        return self.locks.describe()

    def reopen(self, mode: str) -> Store:
        """This store opened again in ``mode`` (``"a"`` to write a store opened read-only)."""
        return Store(self.url, mode)

    def local_path(self) -> Path | None:
        """The store's directory when it is on the local file system."""
        store = self.root.store
        if isinstance(store, zarr.storage.LocalStore):
            return Path(store.root)
        return None

    def side_url(self, *parts: str) -> str:
        """Where this store keeps side data (see :func:`side_url`)."""
        return side_url(self._path, *parts)

    def _move_legacy_side_data(self, local: Path) -> None:
        """Older stores kept ``.locks`` and ``.probes`` inside the Zarr tree (zarr warns about
        them); move them to the side folder. A read-only store is left as it is."""
        for name in LEGACY_SIDE_DIRS:
            old = local / name
            if not old.is_dir():
                continue
            try:
                if name == ".locks":
                    remove_stale(old)
                    continue
                new = Path(side_url(local, name.lstrip(".")))
                new.mkdir(parents=True, exist_ok=True)
                for f in old.iterdir():
                    if not (new / f.name).exists():
                        f.replace(new / f.name)
                with contextlib.suppress(OSError):
                    old.rmdir()
            except OSError:
                pass  # read-only or busy: the compatible readers still find the old place

    def info(self, verify: bool = False) -> dict[str, Any]:
        """A summary of every dataset and feature set, for ``embedcache info`` (``verify``: check
        every chunk's checksum too)."""
        out: dict[str, Any] = {
            "url": self.url,
            "schema_version": SCHEMA_VERSION,
            "write_guarantee": self.write_guarantee(),
            "datasets": {},
        }
        incomplete = self.incomplete_groups()
        if incomplete:
            out["incomplete"] = incomplete
        lost = self.lost_datasets()
        if lost:
            out["lost"] = [f"{name} (dataset): metadata lost; run embedcache verify --repair" for name in lost]
        for name in self.datasets():
            out["datasets"][name] = self.dataset(name).info(verify=verify)
        return out


def _store_exists(path: str, local: Path | None) -> bool:
    """Whether a Zarr group is at ``path`` already (one metadata check, local or fsspec)."""
    if local is not None:
        return (local / "zarr.json").exists()
    import fsspec

    fs, root = fsspec.url_to_fs(path)
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def _refuse_foreign_folder(path: Path) -> None:
    """A folder that exists, is not empty and is no Zarr group is someone else's: never write into it."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} exists and is a file, not an embedcache store")
    if path.is_dir() and not (path / "zarr.json").exists():
        contents = sorted(p.name for p in path.iterdir())
        if contents:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise StoreError(
                f"{path} exists and is not a Zarr store (it holds {shown}); refusing to write a store into it: "
                "give a new path, e.g. cache.zarr"
            )


def writer_lock_for(path: str) -> WriterLock:
    """The writer-lock backend of the store at ``path``: flock on local disk, in-process for ``memory://``,
    a lease (conditional writes on S3, best effort elsewhere) on other fsspec URLs."""
    if "://" not in path:
        return FlockLock(Path(side_url(path, "locks")))
    if path.startswith("memory://"):
        return MemoryLock(path)
    return LeaseLock(side_url(path, "leases"), path)


def _has_keys(group: zarr.Group, name: str) -> bool:
    """Whether anything is stored under ``group/name`` (chunks, arrays), with or without its ``zarr.json``."""
    prefix = f"{group.path}/{name}/" if group.path else f"{name}/"

    async def first() -> bool:
        async for _ in group.store.list_prefix(prefix):
            return True
        return False

    return bool(sync(first()))


def store_holding(path: str | os.PathLike) -> Path | None:
    """The embedcache store (or its side folder's store) that local ``path`` lies in, or is; None when it lies
    in none. What is written there would be written into the Zarr tree (or over its metadata)."""
    p = Path(path).expanduser().resolve()
    for folder in (p, *p.parents):
        owner = folder.with_name(folder.name[: -len(SIDE_SUFFIX)]) if folder.name.endswith(SIDE_SUFFIX) else None
        if owner is not None and (owner / "zarr.json").exists():
            return owner
        meta = folder / "zarr.json"
        if meta.is_file():
            try:
                attrs = json.loads(meta.read_text()).get("attributes", {})
            except (OSError, ValueError):
                continue
            if "schema_version" in attrs and attrs.get("created_by") == "embedcache":
                return folder
    return None


def refuse_inside_store(path: str | os.PathLike, what: str) -> None:
    """A :class:`StoreError` when ``path`` (a local output) lies inside an embedcache store."""
    if "://" in str(path):
        return
    found = store_holding(path)
    if found is not None:
        raise StoreError(
            f"{what} {path} lies inside the embedcache store {found}: writing there would put foreign files into "
            "its Zarr tree (or over its metadata); give a path outside the store"
        )
