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
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from embedcache.faults import checkpoint
from embedcache.inputs.sources import OBS_COLUMNS, CellSource
from embedcache.store import labels as _labels
from embedcache.store.locking.flock import LockBusy, file_lock, memory_lock, remove_stale
from embedcache.store.locking.lease import LeaseBusy, check_held, lease
from embedcache.store.locking.lease import guarantee as lease_guarantee
from embedcache.store.verify import MISSING_CRC, crc_rows, crc_values

SCHEMA_VERSION = 1
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
LEGACY_SIDE_DIRS = (".locks", ".probes")  # side data that older versions kept inside the Zarr tree
SIDE_SUFFIX = ".embedcache"  # side data (locks, probe caches) lives beside the store, outside its Zarr tree
STORE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as
OUTSIDE_SUBSET = "outside the perturbed subset"  # error text of rows a perturbed set leaves out
DATASET_ATTRS = ("kind", "source", "digest", "n")
FEATURE_SET_ATTRS = ("kind", "key", "chunk_size", "width", "dtype", "fingerprint", "fingerprint_fields", "provenance")
CREATE_WAIT_S = 600.0  # how long a writer waits for another one creating the same dataset


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


class ChunkDamaged(StoreError):
    """A written row-chunk is missing, truncated or altered (its checksum does not match)."""


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
        self.url = url
        self.mode = mode
        path = url[len("file://") :] if url.startswith("file://") else url
        self._path = path
        local = None if "://" in path else Path(path)
        try:
            if mode != "r" and not _store_exists(path, local):
                with self._lock("store-create", wait=CREATE_WAIT_S):  # two writers creating one store
                    if local is not None:
                        _refuse_foreign_folder(local)
                    self.root = zarr.open_group(path, mode="a")
                    self._check_schema()
            else:
                self.root = zarr.open_group(path, mode="r" if mode == "r" else "a")
                self._check_schema()
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no embedcache store at {url}") from e
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
        """Names of the (completely written) datasets in the store."""
        with _quiet_zarr():
            return sorted(k for k in self.root.group_keys() if _complete(self.root[k].attrs, DATASET_ATTRS, "dataset"))

    def incomplete_groups(self) -> list[str]:
        """Datasets and feature sets whose creation was interrupted (attributes not written);
        the next extract or import into them redoes the creation."""
        out = []
        with _quiet_zarr():
            for name in sorted(self.root.group_keys()):
                g = _as_group(self.root[name])
                if not _complete(g.attrs, DATASET_ATTRS, "dataset"):
                    if g.attrs.get("kind") == "dataset" or "obs" in g:
                        out.append(f"{name} (dataset)")
                    continue
                if "features" not in g:
                    continue
                for path, node in g["features"].members(max_depth=None):
                    if isinstance(node, zarr.Group) and ("ok" in node or node.attrs.get("kind") == "feature_set"):
                        if not _complete(node.attrs, FEATURE_SET_ATTRS, "feature_set"):
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
        _check_name(name)
        digest = source.digest()
        if name in self.datasets():  # the common case, and the only one a read-only store allows
            return self._matching(Dataset(self, name), source, digest)
        with self.lock(f"dataset-{name}", wait=CREATE_WAIT_S):
            if name in self.datasets():
                return self._matching(Dataset(self, name), source, digest)
            # absent, or an interrupted creation (no attributes): write it afresh
            g = self.root.create_group(name, overwrite=True)
            obs = g.create_group("obs")
            n = len(source)
            for col in OBS_COLUMNS:
                a = obs.create_array(
                    col, shape=(n,), dtype=str, chunks=(max(1, min(n, 65536)),), dimension_names=("cell",)
                )
                a[:] = source.table[col].to_numpy(dtype=str)
            g.create_group("features")
            checkpoint("dataset:obs-written")
            # attributes last, in one write: a dataset without them is an unfinished creation
            g.update_attributes(
                {"kind": "dataset", "source": {"kind": source.kind, "origin": source.origin}, "digest": digest, "n": n}
            )
            return Dataset(self, name)

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

        Local stores use ``flock`` in the side folder (released by the OS even on SIGKILL);
        ``memory://`` stores use an in-process lock; other fsspec stores (``s3://``...) a lease object
        with expiry in the side folder (:mod:`embedcache.store.locking.lease`). :meth:`write_guarantee` says which.
        """
        with self._lock(name, wait=wait):
            yield

    @contextlib.contextmanager
    def _lock(self, name: str, *, wait: float) -> Iterator[None]:
        what = f"'{name}' in {self.url}"
        try:
            if "://" not in self._path:
                with file_lock(Path(side_url(self._path, "locks")), name, wait=wait, what=what):
                    yield
            elif self._path.startswith("memory://"):
                with memory_lock(f"{self._path}::{name}", wait=wait, what=what):
                    yield
            else:
                with lease(side_url(self._path, "leases"), name, wait=wait, what=what):
                    yield
        except (LockBusy, LeaseBusy) as e:
            raise StoreBusyError(
                f"{e}; wait for it to finish (a rerun then resumes or is a cache hit), or write elsewhere"
            ) from None

    def write_guarantee(self) -> dict[str, str]:
        """How writers of this store are kept apart: ``mechanism`` (``flock``, ``in-process lock``,
        ``lease-with-expiry``, ``best-effort lease``) and ``text`` (what it guarantees and what not)."""
        if "://" not in self._path:
            return {
                "mechanism": "flock",
                "text": (
                    f"one writer per feature set (and per store/dataset creation): flock on files in "
                    f"{side_url(self._path, 'locks')}, released by the OS when a writer dies (SIGKILL too). "
                    "Not protected: a network file system without working flock (some NFSv3, SMB or FUSE mounts)"
                ),
            }
        if self._path.startswith("memory://"):
            return {"mechanism": "in-process lock", "text": "one process only: a memory:// store lives in it"}
        return lease_guarantee(self._path)

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


def _complete(attrs, required: Sequence[str], kind: str) -> bool:
    return attrs.get("kind") == kind and all(k in attrs for k in required)


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


class Dataset:
    """One set of cells: its table (``obs``) and its feature sets."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.group: zarr.Group = _as_group(store.root[name])
        self.attrs = _attrs(self.group)
        self.n: int = int(self.attrs["n"])

    @property
    def obs(self) -> pd.DataFrame:
        """The cell table: id, path, label (current, after corrections), split, domain, group,
        and ``label_original`` (as extracted; never overwritten)."""
        g = self.group["obs"]
        df = pd.DataFrame({c: _strings(g[c][:]) for c in OBS_COLUMNS})
        df["label_original"] = df["label"]
        current = _labels.read_current(self.group)
        if current is not None:
            df["label"] = current
        return df

    def label_history(self) -> pd.DataFrame:
        """Every applied label correction, oldest first: id, old, new, time, source, note."""
        return _labels.read_history(self.group)

    def apply_corrections(self, corrections: pd.DataFrame | str | os.PathLike, source: str | None = None) -> int:
        """Apply reviewed label corrections (columns ``id`` and ``new_label``, optional ``note``).

        The original labels stay in ``obs/label``; the current labels and an append-only
        history live under ``labels/`` and change together in one atomic step
        (:mod:`embedcache.store.labels`): a killed run leaves the old state or the new one, and
        rerunning the same corrections converges. Unknown ids or empty labels are a clear
        error and nothing is written. Returns the number of labels that changed.
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
        with self.store.lock(f"labels-{self.name}", wait=60):
            obs = self.obs
            index = pd.Series(np.arange(len(obs)), index=obs["id"])
            unknown = sorted(set(corr["id"]) - set(index.index))
            if unknown:
                raise StoreError(
                    f"{len(unknown)} correction ids are not cells of '{self.name}': {', '.join(map(repr, unknown[:5]))}"
                )
            empty = corr["new_label"].str.strip() == ""
            if empty.any():
                raise StoreError(f"correction row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}: new_label is empty")
            current = obs["label"].to_numpy(dtype=object).copy()
            rows = index[corr["id"]].to_numpy()
            new = corr["new_label"].str.strip().to_numpy(dtype=object)
            changed = current[rows] != new
            if not changed.any():
                _labels.remove_leftovers(self.group)  # a killed earlier commit may have left a version
                return 0
            old = current[rows][changed]
            current[rows[changed]] = new[changed]
            k = int(changed.sum())
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            note = corr["note"].to_numpy(dtype=object)[changed] if "note" in corr.columns else np.full(k, "")
            entries = {
                "id": corr["id"].to_numpy(dtype=object)[changed],
                "old": old,
                "new": new[changed],
                "time": np.full(k, stamp),
                "source": np.full(k, source or "python"),
                "note": note,
            }
            _labels.commit(self.group, current.astype(str), entries)
            return k

    def feature_keys(self) -> list[str]:
        """Keys of all (completely created) feature sets, e.g. ``uni/224-bicubic/clean``."""
        feats = self.group["features"]
        with _quiet_zarr():
            return sorted(
                path
                for path, node in feats.members(max_depth=None)
                if isinstance(node, zarr.Group) and _complete(node.attrs, FEATURE_SET_ATTRS, "feature_set")
            )

    def feature_set(self, key: str) -> FeatureSet:
        if key not in self.feature_keys():
            raise StoreError(
                f"no feature set '{key}' in dataset '{self.name}' (has: {', '.join(self.feature_keys()) or 'none'})"
            )
        return FeatureSet(self, key)

    def find_feature_set(self, backbone: str) -> FeatureSet:
        """The feature set for a backbone name (``timm:test_vit``), a key prefix (``timm-test_vit@random/160-bicubic``)
        or a full key. A name picks its clean set; perturbed sets (``extract --perturb``) are for robustness and
        are only picked by their full key. Several clean sets (different preprocessing or weights) are an error
        naming the keys that select each."""
        keys = self.feature_keys()
        typed = backbone
        backbone = safe_key(backbone).strip("/")
        if backbone in keys:
            return FeatureSet(self, backbone)
        if "/" in backbone:  # a key prefix: backbone/preprocessing
            matches = [k for k in keys if k.startswith(backbone + "/")]
        else:
            matches = [k for k in keys if k.split("/")[0] == backbone or k.split("/")[0].split("@")[0] == backbone]
        clean = [k for k in matches if k.endswith("/clean")]
        if len(clean) == 1:
            return FeatureSet(self, clean[0])
        if not matches:
            raise StoreError(
                f"no features for '{typed}' in dataset '{self.name}' (has: {', '.join(keys) or 'none'}); "
                f"run: embedcache extract --model {typed} ..."
            )
        if len(clean) > 1:
            choices = ", ".join(k[: -len("/clean")] for k in clean)
            raise StoreError(
                f"'{typed}' has {len(clean)} clean feature sets in dataset '{self.name}' (different preprocessing or "
                f"weights: {choices}); select one with --model <one of these> (backbone/preprocessing, e.g. "
                f"--model {clean[0][: -len('/clean')]})"
            )
        if len(matches) == 1:
            return FeatureSet(self, matches[0])
        raise StoreError(
            f"'{typed}' has only perturbed feature sets in dataset '{self.name}' ({', '.join(matches)}); "
            f"extract its clean set (embedcache extract --model {typed} ... without --perturb) or give a full key"
        )

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
        tokens: Mapping[str, tuple[int, ...]] | None = None,
    ) -> FeatureSet:
        """Create the feature set, or check that an existing one was made the same way.

        ``tokens`` maps ``tokens_k<k>`` to the shape of one cell's cached tail tokens, e.g.
        ``(197, 1024)``; they are stored float16, in sub-chunks of a few cells (random minibatch
        reads stay cheap) with a checksum per sub-chunk, and one done flag per row-chunk.

        Call it holding the feature set's lock. A group left without attributes by a killed
        creation is created afresh; its attributes are written last, in one step."""
        digest = _digest(fingerprint)
        feats = self.group["features"]
        if key in self.feature_keys():
            fs = FeatureSet(self, key)
            if fs.attrs["fingerprint"] != digest:
                theirs, ours = fs.attrs.get("fingerprint_fields", {}), fingerprint
                diff = {
                    k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)
                }
                raise FeatureSetConflict(
                    f"feature set '{key}' exists but was made differently: "
                    + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                )
            if all(p in fs.group.array_keys() for p in [*pools, *(tokens or {})]):
                return fs  # nothing to create: a read-only store can still serve a cache hit
            g, chunk_size, fresh = fs.group, fs.chunk_size, False  # an existing set keeps its chunking
        else:
            with self.store.lock(f"structure-{self.name}", wait=CREATE_WAIT_S):  # parent groups are shared
                g = feats.create_group(key, overwrite=True)
            fresh = True
        n = self.n
        n_chunks = -(-n // chunk_size)
        for pool in pools:
            if pool not in g.array_keys():
                g.create_array(
                    pool,
                    shape=(n, width),
                    dtype=dtype,
                    chunks=(chunk_size, width),
                    compressors=_COMPRESSOR,
                    fill_value=0,
                    dimension_names=("cell", "feature"),
                )
                g.create_array(
                    f"crc_{pool}",
                    shape=(n_chunks,),
                    dtype="int64",
                    chunks=(1,),
                    fill_value=MISSING_CRC,
                    compressors=None,
                    dimension_names=("chunk",),
                )
                g.create_array(
                    f"done_{pool}",
                    shape=(n_chunks,),
                    dtype=bool,
                    chunks=(1,),
                    fill_value=False,
                    compressors=None,
                    dimension_names=("chunk",),
                )
        for name, cell_shape in (tokens or {}).items():
            if name not in g.array_keys():
                sub = token_subchunk(chunk_size, cell_shape)
                g.create_array(
                    name,
                    shape=(n, *cell_shape),
                    dtype="float16",
                    chunks=(sub, *cell_shape),
                    compressors=_COMPRESSOR,
                    fill_value=0,
                    dimension_names=_token_dims(len(cell_shape)),
                )
                g.create_array(
                    f"crc_{name}",
                    shape=(-(-n // sub),),
                    dtype="int64",
                    chunks=(chunk_size // sub,),
                    fill_value=MISSING_CRC,
                    compressors=None,
                    dimension_names=("subchunk",),
                )
                g.create_array(
                    f"done_{name}",
                    shape=(n_chunks,),
                    dtype=bool,
                    chunks=(1,),
                    fill_value=False,
                    compressors=None,
                    dimension_names=("chunk",),
                )
        if fresh:
            g.create_array(
                "ok", shape=(n,), dtype=bool, chunks=(chunk_size,), fill_value=False, dimension_names=("cell",)
            )
            g.create_array("error", shape=(n,), dtype=str, chunks=(chunk_size,), dimension_names=("cell",))
            g.create_array(
                "crc_rows",
                shape=(n_chunks,),
                dtype="int64",
                chunks=(1,),
                fill_value=MISSING_CRC,
                compressors=None,
                dimension_names=("chunk",),
            )
            checkpoint("feature-set:arrays-created")
            g.update_attributes(
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

    def info(self, verify: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "source": self.attrs.get("source"), "feature_sets": {}}
        obs = self.obs
        if (obs["label"] != "").any():
            out["classes"] = int(obs.loc[obs["label"] != "", "label"].nunique())
        out["label_corrections"] = len(self.label_history())
        for key in self.feature_keys():
            out["feature_sets"][key] = FeatureSet(self, key).info(verify=verify)
        return out


class FeatureSet:
    """Pooled features of one backbone × preprocessing × perturbation for a dataset."""

    def __init__(self, dataset: Dataset, key: str):
        self.dataset = dataset
        self.key = key
        self.group: zarr.Group = _as_group(dataset.group["features"][key])
        self.attrs = _attrs(self.group)
        self.chunk_size: int = int(self.attrs["chunk_size"])
        self.n = dataset.n
        self.n_chunks = -(-self.n // self.chunk_size)

    @property
    def pools(self) -> list[str]:
        """Pooled feature arrays (``cls``, ``mean``)."""
        return [k for k in self._written_arrays() if not k.startswith(TOKENS_PREFIX)]

    @property
    def token_sets(self) -> list[str]:
        """Cached tail-token arrays, ``tokens_k<k>``: the input of the last k blocks (or stages)."""
        return [k for k in self._written_arrays() if k.startswith(TOKENS_PREFIX)]

    def _written_arrays(self) -> list[str]:
        keys = set(self.group.array_keys())
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
        return "crc_rows" in self.group.array_keys()

    def chunk_rows(self, c: int) -> slice:
        return slice(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))

    def done(self, pool: str) -> np.ndarray:
        """Which row-chunks of ``pool`` are written and verified."""
        return np.asarray(self.group[f"done_{pool}"][:], dtype=bool)

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

    def write_chunk(self, c: int, features: dict[str, np.ndarray], ok: np.ndarray, error: np.ndarray) -> None:
        """Write row-chunk ``c``, read it back and compare, record its checksums, and only then
        mark it done."""
        rows = self.chunk_rows(c)
        error = np.asarray(error).astype(str)
        self.group["ok"][rows] = ok
        self.group["error"][rows] = error
        for pool, values in features.items():
            self.group[pool][rows] = values
        checkpoint("chunk:data-written")
        for pool, values in features.items():
            back = np.asarray(self.group[pool][rows])
            if not np.array_equal(back, values, equal_nan=back.dtype.kind == "f"):
                raise StoreError(
                    f"verification failed for chunk {c} of '{self.key}/{pool}': the store returned other values"
                )
        same = np.array_equal(self._read("ok", rows), ok) and np.array_equal(_strings(self._read("error", rows)), error)
        if not same:
            raise StoreError(f"verification failed for chunk {c} of '{self.key}/ok'")
        check_held()  # a writer whose lease was taken over stops before it records checksums or flags
        if self.has_checksums:
            self.group["crc_rows"][c] = crc_rows(ok, error)
            for pool, values in features.items():
                values = np.asarray(values, dtype=self.group[pool].dtype)
                if pool.startswith(TOKENS_PREFIX):
                    sub = self.group[pool].chunks[0]
                    first = rows.start // sub
                    crcs = [crc_values(values[j : j + sub]) for j in range(0, len(values), sub)]
                    self.group[f"crc_{pool}"][first : first + len(crcs)] = np.asarray(crcs, dtype=np.int64)
                else:
                    self.group[f"crc_{pool}"][c] = crc_values(values)
        checkpoint("chunk:checksums-written")
        check_held()
        for pool in features:
            self.group[f"done_{pool}"][c] = True
        checkpoint("chunk:done")

    def clear_done(self, chunks: Sequence[int]) -> None:
        """Mark ``chunks`` unwritten in every pool (the next extract / import redoes them)."""
        for pool in self._written_arrays():
            flags = self.group[f"done_{pool}"]
            for c in chunks:
                flags[int(c)] = False

    def array(self, pool: str = "cls") -> zarr.Array:
        if pool not in self.pools:
            raise StoreError(f"'{self.key}' has no '{pool}' features (has: {', '.join(self.pools)})")
        return self._array(pool)

    def _array(self, name: str) -> zarr.Array:
        """Member array ``name`` (zarr types a group's members as ``Array | Group``)."""
        return _as_array(self.group[name])

    def _read(self, name: str, selection: Any = slice(None)) -> np.ndarray:
        """``group[name][selection]`` as numpy (zarr types reads as a union of scalars and arrays)."""
        return np.asarray(self.group[name][selection])

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
            ok = np.asarray(self.group["ok"][rows], dtype=bool)
            return "chunk object missing" if ok.any() and not _chunk_exists(self._array(name), c) else ""
        if name.startswith(TOKENS_PREFIX):
            arr = self._array(name)
            sub = arr.chunks[0]
            for j in range(rows.start // sub, -(-rows.stop // sub)):
                span = slice(j * sub, min((j + 1) * sub, self.n))
                reason = _crc_problem(int(self._read(f"crc_{name}", j)), crc_values(np.asarray(arr[span])))
                if reason:
                    return f"cells {span.start}-{span.stop - 1}: {reason}"
            return ""
        if name == "rows":
            stored = int(self._read("crc_rows", c))
            actual = crc_rows(np.asarray(self.group["ok"][rows], dtype=bool), _strings(self.group["error"][rows]))
        else:
            stored = int(self._read(f"crc_{name}", c))
            actual = crc_values(self._read(name, rows))
        return _crc_problem(stored, actual)

    def _damage_message(self, c: int, name: str, reason: str) -> str:
        rows = self.chunk_rows(c)
        return (
            f"chunk {c} (rows {rows.start}-{rows.stop - 1}) of '{self.dataset.name}/{self.key}/{name}' is damaged: "
            f"{reason}; run `embedcache verify {self.dataset.store.url} --repair`, then the same extract (or import) "
            "command recomputes it"
        )

    def ok(self) -> np.ndarray:
        """Which cells have features (False: unreadable image, non-finite values, or not written)."""
        return self._rows()[0]

    def errors(self) -> pd.Series:
        """Why each cell is not ok ('' where it is)."""
        return pd.Series(self._rows()[1], name="error")

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``ok`` and ``error`` of every cell, each done chunk checked against its checksum."""
        try:
            ok = np.asarray(self.group["ok"][:], dtype=bool)
            error = _strings(self.group["error"][:])
        except Exception as e:  # noqa: BLE001
            bad = next((c for c in range(self.n_chunks) if _undecodable(self, c)), None)
            if bad is None:
                raise
            raise ChunkDamaged(
                self._damage_message(bad, "ok/error", f"cannot be decoded ({type(e).__name__}: {e})")
            ) from e
        if self.has_checksums:
            crcs = np.asarray(self.group["crc_rows"][:])
            for c in self.done_chunks():
                r = self.chunk_rows(c)
                reason = _crc_problem(int(crcs[c]), crc_rows(ok[r], error[r]))
                if reason:
                    raise ChunkDamaged(self._damage_message(c, "ok/error", reason))
        return ok, error

    def to_numpy(self, pool: str = "cls", rows: np.ndarray | slice | None = None, dtype=np.float32) -> np.ndarray:
        """Features as numpy (only ``rows`` are read when given); refuses unfinished chunks and
        damaged ones (every chunk read is checked against its checksum)."""
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
        except Exception as e:  # noqa: BLE001  undecodable bytes: name the chunk, keep the cause
            raise ChunkDamaged(self._damage_message(c, pool, f"cannot be decoded ({type(e).__name__}: {e})")) from e

    def _check_block(self, c: int, pool: str, block: np.ndarray) -> None:
        if self.has_checksums:
            reason = _crc_problem(int(self._read(f"crc_{pool}", c)), crc_values(block))
        else:
            reason = self.chunk_problem(c, pool)
        if reason:
            raise ChunkDamaged(self._damage_message(c, pool, reason))

    def to_dask(self, pool: str = "cls"):
        """Features as a lazy dask array chunked like the store (each block checked on compute)."""
        import dask.array as da

        self._check_complete(pool)
        arr = self.array(pool)
        blocks = [
            da.from_delayed(
                _delayed_chunk(self, pool, c),
                shape=(self.chunk_rows(c).stop - self.chunk_rows(c).start, arr.shape[1]),
                dtype=arr.dtype,
            )
            for c in range(self.n_chunks)
        ]
        return da.concatenate(blocks, axis=0) if blocks else da.from_zarr(arr)

    def _check_complete(self, pool: str) -> None:
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
            crcs = np.asarray(self.group[f"crc_{pool}"][:]) if self.has_checksums else None
            for c in np.flatnonzero(done):
                if _chunk_exists(self._array(pool), int(c)):
                    continue
                r = self.chunk_rows(int(c))
                if crcs is not None:
                    empty = crc_values(np.zeros((r.stop - r.start, width), dtype=self.group[pool].dtype))
                    if int(crcs[c]) != empty:
                        out.append(f"{pool} chunk {c}")
                elif np.asarray(self.group["ok"][r], dtype=bool).any():
                    out.append(f"{pool} chunk {c}")
        return out

    def info(self, verify: bool = False) -> dict[str, Any]:
        prov = self.attrs.get("provenance", {})
        pools = {p: f"{int(self.done(p).sum())}/{self.n_chunks} chunks" for p in self.pools}
        if verify:
            from embedcache.store.verify import check_chunk

            damage = [str(d) for c in self.done_chunks() for d in check_chunk(self, c)]
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
                    "shape": list(self.group[t].shape),
                    "chunks": f"{int(self.done(t).sum())}/{self.n_chunks} chunks",
                    "bytes_per_cell": 2 * int(np.prod(self.group[t].shape[1:])),
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
        crcs = np.asarray(self.fs.group[f"crc_{self.name}"][:])
        return hashlib.sha256(f"{self.fs.attrs['fingerprint']}|{self.name}|".encode() + crcs.tobytes()).hexdigest()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Tokens of ``rows`` (float16, one per row asked for, in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = np.unique(rows // self.sub)
        full = np.concatenate([np.arange(b * self.sub, min((b + 1) * self.sub, self.fs.n)) for b in blocks])
        try:
            data = np.asarray(self.array.get_orthogonal_selection((full,) + (slice(None),) * (self.array.ndim - 1)))
        except Exception as e:  # noqa: BLE001  undecodable bytes: name the row-chunk
            c = int(blocks[0] * self.sub // self.fs.chunk_size)
            raise ChunkDamaged(
                self.fs._damage_message(c, self.name, f"cannot be decoded ({type(e).__name__}: {e})")
            ) from e
        crcs = np.asarray(self.fs._array(f"crc_{self.name}").get_orthogonal_selection((blocks,)))
        at = 0
        for b, stored in zip(blocks, crcs):
            m = min((b + 1) * self.sub, self.fs.n) - b * self.sub
            reason = _crc_problem(int(stored), crc_values(data[at : at + m]))
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


def _token_dims(ndim: int) -> tuple[str, ...]:
    return ("cell", "token", "feature") if ndim == 2 else ("cell", "channel", "y", "x")[: ndim + 1]


def _delayed_chunk(fs: FeatureSet, pool: str, c: int):
    import dask

    @dask.delayed(pure=True)
    def load() -> np.ndarray:
        return fs.to_numpy(pool, rows=fs.chunk_rows(c), dtype=fs.group[pool].dtype)

    return load()


def _as_group(node: Any) -> zarr.Group:
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{getattr(node, 'path', node)} is a Zarr array where a group belongs")
    return node


def _as_array(node: Any) -> zarr.Array:
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{getattr(node, 'path', node)} is a Zarr group where an array belongs")
    return node


def _attrs(group: zarr.Group) -> dict[str, Any]:
    """A group's attributes as a plain dict (JSON values, typed Any so that each use need not narrow them)."""
    return group.attrs.asdict()


def _undecodable(fs: FeatureSet, c: int) -> bool:
    try:
        fs.group["ok"][fs.chunk_rows(c)]
        fs.group["error"][fs.chunk_rows(c)]
        return False
    except Exception:  # noqa: BLE001
        return True


def _crc_problem(stored: int, actual: int) -> str:
    if stored == MISSING_CRC:
        return "no checksum recorded for a chunk marked done"
    if stored != actual:
        return f"checksum mismatch (recorded {stored:08x}, read {actual:08x}): altered, truncated or deleted"
    return ""


def _chunk_exists(arr: zarr.Array, c: int) -> bool:
    """Whether row-chunk ``c`` of ``arr`` has a stored object (Zarr serves missing ones as fill)."""
    coords = (c,) + (0,) * (arr.ndim - 1)
    key = arr.metadata.encode_chunk_key(coords)
    return bool(sync(arr.store.exists(f"{arr.path}/{key}")))


def safe_key(name: str) -> str:
    """A backbone name or feature key as stored (``timm:vit_small`` -> ``timm-vit_small``)."""
    return name.replace(":", "-")


def _strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(str)


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith((".", "__")):
        raise StoreError(f"bad dataset name {name!r}: use letters, digits, '-', '_' (no '/', no leading '.')")


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Hide zarr's warning about side folders that stores of older versions kept inside the tree
    (``.locks``, ``.probes``) while they are read without being migrated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        yield


__all__ = [
    "open_store",
    "Store",
    "Dataset",
    "FeatureSet",
    "StoreError",
    "StoreBusyError",
    "FeatureSetConflict",
    "ChunkDamaged",
    "TailTokens",
    "safe_key",
    "side_url",
    "tokens_name",
]
