"""What every part of the store shares: its constants and small helpers on Zarr groups and arrays."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from embedcache.store.errors import StoreError

SCHEMA_VERSION = 1
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
LEGACY_SIDE_DIRS = (".locks", ".probes")  # side data that older versions kept inside the Zarr tree
SIDE_SUFFIX = ".embedcache"  # side data (locks, probe caches) lives beside the store, outside its Zarr tree
STORE_DTYPES = ("float16", "float32")  # what feature arrays may be stored as
OUTSIDE_SUBSET = "outside the perturbed subset"  # error text of rows a perturbed set leaves out
DATASET_ATTRS = ("kind", "source", "digest", "n")
FEATURE_SET_ATTRS = ("kind", "key", "chunk_size", "width", "dtype", "fingerprint", "fingerprint_fields", "provenance")
CREATE_WAIT_S = 600.0  # how long a writer waits for another one creating the same dataset


def complete(attrs, required: Sequence[str], kind: str) -> bool:
    return attrs.get("kind") == kind and all(k in attrs for k in required)


def as_group(node: Any) -> zarr.Group:
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{getattr(node, 'path', node)} is a Zarr array where a group belongs")
    return node


def as_array(node: Any) -> zarr.Array:
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{getattr(node, 'path', node)} is a Zarr group where an array belongs")
    return node


def attrs_of(group: zarr.Group) -> dict[str, Any]:
    """A group's attributes as a plain dict (JSON values, typed Any so that each use need not narrow them)."""
    return group.attrs.asdict()


def chunk_exists(arr: zarr.Array, c: int) -> bool:
    """Whether row-chunk ``c`` of ``arr`` has a stored object (Zarr serves missing ones as fill)."""
    coords = (c,) + (0,) * (arr.ndim - 1)
    key = arr.metadata.encode_chunk_key(coords)
    return bool(sync(arr.store.exists(f"{arr.path}/{key}")))


def safe_key(name: str) -> str:
    """A backbone name or feature key as stored (``timm:vit_small`` -> ``timm-vit_small``)."""
    return name.replace(":", "-")


def strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(str)


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def check_name(name: str) -> None:
    if not name or "/" in name or name.startswith((".", "__")):
        raise StoreError(f"bad dataset name {name!r}: use letters, digits, '-', '_' (no '/', no leading '.')")


@contextlib.contextmanager
def quiet_zarr() -> Iterator[None]:
    """Hide zarr's warning about side folders that stores of older versions kept inside the tree
    (``.locks``, ``.probes``) while they are read without being migrated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        yield


def fresh_attrs(group: zarr.Group) -> dict[str, Any]:
    """``group``'s attributes as stored now (another writer may have changed them since it was opened)."""
    return attrs_of(zarr.open_group(store=group.store, path=group.path, mode="r"))
