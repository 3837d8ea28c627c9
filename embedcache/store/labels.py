"""Label corrections as transactions.

Layout under a dataset::

    labels/                      attrs: kind=labels, version=V   (the one pointer)
      v<V>/current               (N,) str   every cell's current label
      v<V>/history/<column>      (H,) str   id, old, new, time, source, note; oldest first

A commit writes the whole new state as ``v<V+1>`` beside the old one, reads it back, and only
then moves the pointer with one metadata write (atomic: a temporary file renamed over
``zarr.json`` on local disk, one PUT on object stores). A process killed at any moment
therefore leaves either the old labels and history or the new ones, never a mixture; leftover
versions are garbage that the next commit deletes. Stores written before this layout
(``labels/current`` and ``labels/history`` without a version) are read as they are and
converted by their next commit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import zarr

from embedcache.faults import checkpoint
from embedcache.store.checksums import crc_problem, crc_values
from embedcache.store.errors import ChunkDamaged

HISTORY_COLUMNS = ("id", "old", "new", "time", "source", "note")


def _strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(str)


def _group(parent: zarr.Group, name: str) -> zarr.Group:
    node = parent[name]
    if not isinstance(node, zarr.Group):
        raise RuntimeError(f"label store: '{node.path}' is a Zarr array where a group belongs")
    return node


def _version(labels: zarr.Group) -> int | None:
    """The committed version number, or None when no transactional commit was made yet."""
    version: Any = labels.attrs.get("version")  # JSON attribute; written as an int by ``commit``
    return None if version is None else int(version)


def _labels_group(dataset_group: zarr.Group) -> zarr.Group | None:
    return _group(dataset_group, "labels") if "labels" in dataset_group else None


def _state_group(labels: zarr.Group) -> zarr.Group | None:
    """The group holding the committed state: ``v<version>``, or the old layout's root."""
    version = _version(labels)
    if version is not None:
        return _group(labels, f"v{version}")
    if "current" in labels:
        return labels  # layout of stores written before transactions
    return None


def read_current(dataset_group: zarr.Group, n: int | None = None) -> np.ndarray | None:
    """Current labels of every cell (``n`` of them, when given), or None when no correction was ever committed;
    checked against the CRC-32 the commit recorded."""
    labels = _labels_group(dataset_group)
    state = None if labels is None else _state_group(labels)
    if state is None:
        return None
    assert labels is not None
    current = _read(state, "current", labels)
    if n is not None and len(current) != n:
        raise ChunkDamaged(
            f"the current labels ({labels.path}) hold {len(current)} values for {n} cells: the label store is damaged; "
            "the original labels are intact in obs/label"
        )
    _check_crc(labels, "current", current)
    return current


def _read(state: zarr.Group, name: str, labels: zarr.Group) -> np.ndarray:
    try:
        return _strings(state[name][:])
    except Exception as e:
        raise ChunkDamaged(
            f"label store '{labels.path}/{name}' cannot be read ({type(e).__name__}: {e}); the original labels are "
            "intact in obs/label"
        ) from e


def _check_crc(labels: zarr.Group, name: str, values: np.ndarray) -> None:
    recorded: Any = (labels.attrs.get("crc") or {}).get(name)
    if recorded is None:
        return  # committed before label checksums existed
    problem = crc_problem(int(recorded), crc_values(values))
    if problem:
        raise ChunkDamaged(
            f"label store '{labels.path}' {name}: {problem}; the original labels are intact in obs/label"
        )


def read_history(dataset_group: zarr.Group, check: bool = True) -> pd.DataFrame:
    """Every committed correction, oldest first (each column checked against the CRC-32 the commit recorded)."""
    labels = _labels_group(dataset_group)
    state = None if labels is None else _state_group(labels)
    if state is None or "history" not in state:
        return pd.DataFrame(columns=list(HISTORY_COLUMNS))
    assert labels is not None
    h = _group(state, "history")
    cols = {c: _read(h, c, labels) if c in h else np.array([], dtype=str) for c in HISTORY_COLUMNS}
    if check:
        for c, values in cols.items():
            _check_crc(labels, f"history/{c}", values)
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:  # only the old layout can get here: its history was appended column by column
        n = min(lengths)
        warnings.warn(
            f"label history columns have different lengths {sorted(lengths)} (an interrupted write by an older "
            f"embedcache); keeping the {n} complete entries",
            stacklevel=2,
        )
        cols = {c: v[:n] for c, v in cols.items()}
    return pd.DataFrame(cols)


def commit(dataset_group: zarr.Group, current: np.ndarray, entries: Mapping[str, np.ndarray]) -> None:
    """Write ``current`` labels and the history extended by ``entries`` as one transaction."""
    n = len(current)
    history = read_history(dataset_group, check=False)  # a damaged history is caught on read, not re-committed
    new_history = {c: np.concatenate([history[c].to_numpy(dtype=str), _strings(entries[c])]) for c in HISTORY_COLUMNS}
    labels = dataset_group.require_group("labels")
    old_version = _version(labels)
    version = 1 + max([old_version or 0] + [int(k[1:]) for k in labels.group_keys() if k[1:].isdigit()])
    state = labels.create_group(f"v{version}", overwrite=True)
    checkpoint("relabel:version-created")
    cur = state.create_array(
        "current", shape=(n,), dtype=str, chunks=(max(1, min(n, 65536)),), dimension_names=("cell",)
    )
    cur[:] = _strings(current)
    checkpoint("relabel:current-written")
    hist = state.require_group("history")
    for col, values in new_history.items():
        a = hist.create_array(
            col, shape=(len(values),), dtype=str, chunks=(max(1, min(len(values), 65536)),), dimension_names=("entry",)
        )
        if len(values):
            a[:] = values
        checkpoint("relabel:history-column")
    if not np.array_equal(_strings(cur[:]), _strings(current)) or any(
        not np.array_equal(_strings(hist[c][:]), v) for c, v in new_history.items()
    ):
        raise RuntimeError("label commit: the store returned other values than were written; nothing was switched")
    checkpoint("relabel:before-switch")
    crc = {"current": crc_values(_strings(current)), **{f"history/{c}": crc_values(v) for c, v in new_history.items()}}
    labels.update_attributes({"kind": "labels", "version": version, "crc": crc})  # the one atomic step
    checkpoint("relabel:after-switch")
    remove_leftovers(dataset_group)


def remove_leftovers(dataset_group: zarr.Group) -> None:
    """Delete versions other than the committed one (a killed commit's, or the one it replaced)."""
    labels = _labels_group(dataset_group)
    version = None if labels is None else _version(labels)
    if labels is None or version is None:
        return  # nothing committed in this layout yet: an old-layout state stays readable
    for key in list(labels.group_keys()):
        if key != f"v{version}":
            del labels[key]  # older versions and the old layout's history group
    for key in list(labels.array_keys()):
        del labels[key]  # the old layout's current labels
