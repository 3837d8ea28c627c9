"""Metadata records: every group and array of a store is recorded in its parent's attributes, compared on open.

A store's bytes carry checksums (:mod:`.checksums`), but Zarr's own metadata (each node's ``zarr.json``:
dtype, shape, chunking, codecs) is trusted by Zarr as it is. An edited ``data_type`` would serve garbage that
passes a CRC over raw bytes; an edited shape, a deleted ``zarr.json`` would drop data or turn checks off
silently. So a writer records, in the parent's attributes, what it created:

* a feature set records each of its arrays' metadata in its own attributes (``arrays``), and the dataset
  records each feature set's attributes (``feature_sets``);
* a dataset records its cell-table arrays' metadata (``arrays``) and the CRC-32 of each column (``obs_crc``);
  the store's root records each dataset's attributes (``datasets``);
* a label commit records the CRC-32 of its current labels and history columns in the pointer (``crc``).

On open every array is compared with its record (:func:`check_array`); a node whose ``zarr.json`` is missing
but recorded is damage (:class:`MetadataLost`), never an empty group to create over it; ``verify --repair``
writes the lost ``zarr.json`` back from the record (:func:`restore`). Stores written before records existed
open as they are and are reported as unrecorded.
"""

from __future__ import annotations

import json
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from embedcache.store.errors import ChunkDamaged

__all__ = ["MetadataLost", "MetadataAltered", "array_record", "check_array", "restore", "node_exists", "COMPARED"]

# the metadata fields compared with the record (what decides how bytes become values)
COMPARED = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs", "dimension_names")


class MetadataLost(ChunkDamaged):
    """A recorded group or array has lost its ``zarr.json`` (deleted, or unreadable)."""


class MetadataAltered(ChunkDamaged):
    """An array's metadata differs from what its writer recorded (dtype, shape, chunks, codecs...)."""


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def array_record(arr: zarr.Array) -> dict[str, Any]:
    """What a parent records of one array: its full metadata document (enough to write it back)."""
    return _plain(arr.metadata.to_dict())


def check_array(arr: zarr.Array, record: dict[str, Any], where: str, repair: str) -> None:
    """Raise :class:`MetadataAltered` when ``arr``'s metadata differs from ``record`` in a :data:`COMPARED` field."""
    now = array_record(arr)
    diff = [f for f in COMPARED if now.get(f) != record.get(f)]
    if diff:
        f = diff[0]
        raise MetadataAltered(
            f"the metadata of {where} differs from what its writer recorded ({f}: recorded {record.get(f)!r}, "
            f"found {now.get(f)!r}): edited or replaced; {repair}"
        )


def node_exists(group: zarr.Group, path: str) -> bool:
    """Whether ``group/path`` has its ``zarr.json`` (the node exists for Zarr)."""
    key = f"{group.path}/{path}/zarr.json" if group.path else f"{path}/zarr.json"
    return bool(sync(group.store.exists(key)))


def restore(group: zarr.Group, path: str, document: dict[str, Any]) -> None:
    """Write ``document`` as the ``zarr.json`` of ``group/path`` (a group's or an array's metadata)."""
    key = f"{group.path}/{path}/zarr.json" if group.path else f"{path}/zarr.json"
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(document, indent=2).encode())
    sync(group.store.set(key, buf))


def group_document(attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Zarr v3 group's ``zarr.json`` with ``attrs``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": dict(attrs or {})}
