"""``verify``: check a whole store (metadata, cell tables, labels, every done row-chunk) and repair it.

``verify`` first compares every group's and array's metadata with the records their writers made
(:mod:`embedcache.store.records`): a lost or edited ``zarr.json`` is damage. It then reads every dataset's cell
table and labels (checked against their CRC-32 and the cell-list digest) and checks every done chunk of every
feature set (:meth:`FeatureSet.damage`). With ``repair=True`` it writes lost or edited metadata back from the
records, and clears the ``done`` flags of damaged chunks so that the same extract (or import) command
recomputes exactly those chunks. Values lost from a cell table or label store cannot be recomputed by
embedcache: they are reported, with what still holds them (the source manifest, ``obs/label``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from embedcache.inputs.sources import cell_list_digest
from embedcache.store.errors import StoreError
from embedcache.store.feature_set import Damage
from embedcache.store.groups import SCHEMA_VERSION, as_array, as_group, attrs_of, fresh_attrs, strings
from embedcache.store.records import MetadataAltered, check_array, group_document, restore
from embedcache.store.store import Store, open_store

__all__ = ["verify", "VerifyReport", "Damage"]


@dataclass
class VerifyReport:
    """What :func:`verify` found (and repaired)."""

    store: str
    chunks_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # feature sets written without checksums
    incomplete_groups: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # lost or edited metadata, damaged cell tables / labels
    restored: list[str] = field(default_factory=list)  # metadata written back from the records (repair)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.metadata

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "chunks_checked": self.chunks_checked,
            "damaged": [d.__dict__ | {"rows": list(d.rows)} for d in self.damaged],
            "unverifiable": self.unverifiable,
            "incomplete_groups": self.incomplete_groups,
            "metadata": self.metadata,
            "restored": self.restored,
            "repaired": self.repaired,
        }


def verify(store: str, *, repair: bool = False) -> VerifyReport:
    """Check the store's metadata against its records, every cell table and label store, and every done
    row-chunk; ``repair`` writes lost or edited metadata back from the records and clears the done flags of
    damaged chunks so that rerunning the same extract / import recomputes them."""
    restored_root = []
    try:
        st = open_store(store, mode="a" if repair else "r")
    except StoreError as e:
        if not (repair and "root metadata" in str(e)):
            raise
        _restore_root(str(store))  # rebuilt from the datasets' own attributes
        restored_root = ["the store's root metadata (rebuilt from its datasets' own attributes)"]
        st = open_store(store, mode="a")
    report = VerifyReport(st.url, incomplete_groups=st.incomplete_groups(), restored=restored_root)
    _metadata(st, report, repair)
    if report.restored:
        st = open_store(store, mode="a")  # what was written back opens now
    for name in st.datasets():
        ds = st.dataset(name)
        try:
            _ = ds.obs  # the cell table and current labels, against their checksums and digest
            ds.label_history()
        except StoreError as e:
            report.metadata.append(str(e))
        for key in ds.feature_keys():
            try:
                fs = ds.feature_set(key)
                fs.check_metadata()
            except StoreError as e:
                report.metadata.append(str(e))
                continue
            if not fs.has_checksums:
                report.unverifiable.append(f"{name}/{key}")
            damaged: list[Damage] = []
            for c in fs.done_chunks():
                report.chunks_checked += 1
                damaged += fs.damage(c)
            report.damaged += damaged
            if repair and damaged:
                fs.clear_done(sorted({d.chunk for d in damaged}))
    report.repaired = repair and (bool(report.damaged) or bool(report.restored))
    return report


def _metadata(st: Store, report: VerifyReport, repair: bool) -> None:
    """Lost or edited metadata of datasets, cell tables and feature sets, compared with their records;
    written back from the records with ``repair``."""
    root = st.root
    for name in st.lost_datasets():
        report.metadata.append(f"dataset '{name}': its metadata (zarr.json) is lost or unreadable; it is recorded")
        if repair:
            attrs = dict(st.records[name])
            attrs["feature_sets"] = _present_feature_sets(root, name)
            restore(root, name, group_document(attrs))
            report.restored.append(f"dataset '{name}'")
    for name in st.incomplete_groups():
        if not name.endswith("(dataset)"):
            continue
        ds_name = name.split(" ")[0]
        if ds_name in st.records or not _holds_features(root, ds_name):
            continue  # recorded (above), or a creation the rerun redoes
        report.metadata.append(f"dataset '{ds_name}': attributes lost or half written, and it holds written features")
        if repair:
            rebuilt = _rebuild_dataset_attrs(root, ds_name)
            if rebuilt is not None:
                restore(root, ds_name, group_document(rebuilt))
                report.restored.append(f"dataset '{ds_name}' (attributes rebuilt from its cell table)")
    for name in st.datasets():
        ds_attrs = fresh_attrs(as_group(root[name]))
        _restore_groups(root, f"{name}/obs", report, repair)
        _restore_groups(root, f"{name}/features", report, repair)
        for col, record in (ds_attrs.get("arrays") or {}).items():
            _restore_array(root, f"{name}/obs/{col}", record, report, repair)
        for key, fs_attrs in (ds_attrs.get("feature_sets") or {}).items():
            path = f"{name}/features/{key}"
            if not _readable(root, path):
                report.metadata.append(f"feature set '{name}/{key}': its metadata (zarr.json) is lost or unreadable")
                if repair:
                    _restore_groups(root, path.rsplit("/", 1)[0], report, repair)
                    restore(root, path, group_document(fs_attrs))
                    report.restored.append(f"feature set '{name}/{key}'")
            for arr, record in (fs_attrs.get("arrays") or {}).items():
                _restore_array(root, f"{path}/{arr}", record, report, repair)


def _readable(root: zarr.Group, path: str) -> bool:
    try:
        root[path]
        return True
    except Exception:  # noqa: BLE001  missing or unreadable zarr.json
        return False


def _restore_groups(root: zarr.Group, path: str, report: VerifyReport, repair: bool) -> None:
    """Every group on ``path`` exists (an intermediate group's lost zarr.json is written back, without attrs)."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if not _readable(root, sub):
            report.metadata.append(f"group '{sub}': its metadata (zarr.json) is lost")
            if repair:
                restore(root, sub, group_document())
                report.restored.append(f"group '{sub}'")


def _restore_array(root: zarr.Group, path: str, record: dict[str, Any], report: VerifyReport, repair: bool) -> None:
    """An array whose zarr.json is lost or differs from its record: reported; written back with ``repair``."""
    try:
        arr = as_array(root[path])
        check_array(arr, record, f"array '{path}'", "")
        return
    except MetadataAltered as e:
        report.metadata.append(str(e).rstrip("; "))
    except Exception:  # noqa: BLE001  missing or unreadable
        report.metadata.append(f"array '{path}': its metadata (zarr.json) is lost or unreadable")
    if repair:
        restore(root, path, record)
        report.restored.append(f"array '{path}'")


def _present_feature_sets(root: zarr.Group, name: str) -> dict[str, Any]:
    """The attributes of every readable feature set of dataset ``name`` (to rebuild its record)."""
    out: dict[str, Any] = {}
    try:
        feats = as_group(root[f"{name}/features"])
    except Exception:  # noqa: BLE001
        return out
    for path, node in feats.members(max_depth=None):
        if isinstance(node, zarr.Group) and node.attrs.get("kind") == "feature_set":
            out[path] = attrs_of(node)
    return out


def _holds_features(root: zarr.Group, name: str) -> bool:
    return bool(_present_feature_sets(root, name))


def _rebuild_dataset_attrs(root: zarr.Group, name: str) -> dict[str, Any] | None:
    """Attributes of an unrecorded dataset, rebuilt from its cell table (n, digest); None when it cannot be."""
    try:
        obs = as_group(root[f"{name}/obs"])
        ids, paths = strings(obs["id"][:]).tolist(), strings(obs["path"][:]).tolist()
    except Exception:  # noqa: BLE001  the cell table itself is gone: nothing to rebuild from
        return None
    return {
        "kind": "dataset",
        "source": {"kind": "unknown", "origin": "attributes rebuilt by embedcache verify --repair"},
        "digest": cell_list_digest(ids, paths),
        "n": len(ids),
        "feature_sets": _present_feature_sets(root, name),
    }


def _restore_root(store: str) -> None:
    """Write a store's unreadable root ``zarr.json`` back: the schema, and each readable dataset's attributes as
    the root's record of it."""
    path = store[len("file://") :] if store.startswith("file://") else store
    storage = zarr.storage.LocalStore(path) if "://" not in path else zarr.storage.FsspecStore.from_url(path)

    async def names() -> list[str]:
        return [n async for n in storage.list_dir("")]

    records: dict[str, Any] = {}
    for name in sync(names()):
        if name == "zarr.json" or name.startswith("."):
            continue
        try:
            attrs = attrs_of(as_group(zarr.open_group(storage, path=name, mode="r")))
        except Exception:  # noqa: BLE001  not a readable group: left for the rest of verify
            continue
        if attrs.get("kind") == "dataset":
            records[name] = {k: v for k, v in attrs.items() if k != "feature_sets"}
    document = group_document({"schema_version": SCHEMA_VERSION, "created_by": "embedcache", "datasets": records})
    sync(
        storage.set("zarr.json", default_buffer_prototype().buffer.from_bytes(json.dumps(document, indent=2).encode()))
    )
