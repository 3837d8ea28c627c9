"""One dataset of a store: its cell table (``obs``), label corrections and feature sets.

Layout::

    <dataset>/                         attrs: kind=dataset, source, digest, n
      obs/  id path label split domain group      (1-D string arrays, one row per cell)
      labels/                          corrections, one atomic pointer (:mod:`embedcache.store.labels`)
      features/<backbone>/<prep>/<perturbation>/  feature sets (:mod:`embedcache.store.feature_set`)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from embedcache.faults import checkpoint
from embedcache.inputs.sources import OBS_COLUMNS, cell_list_digest
from embedcache.store import labels as _labels
from embedcache.store.checksums import MISSING_CRC, crc_problem, crc_values
from embedcache.store.errors import ChunkDamaged, FeatureSetConflict, StoreError
from embedcache.store.feature_set import FeatureSet, token_dims, token_subchunk
from embedcache.store.groups import (
    COMPRESSOR,
    CREATE_WAIT_S,
    FEATURE_SET_ATTRS,
    as_array,
    as_group,
    attrs_of,
    complete,
    digest,
    fresh_attrs,
    quiet_zarr,
    safe_key,
    strings,
)
from embedcache.store.records import MetadataLost, array_record, check_array, node_exists

if TYPE_CHECKING:
    from embedcache.store.store import Store

__all__ = ["Dataset"]


class Dataset:
    """One set of cells: its table (``obs``) and its feature sets."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.group: zarr.Group = as_group(store.root[name])
        self.attrs = attrs_of(self.group)
        self.n: int = int(self.attrs["n"])

    @property
    def obs(self) -> pd.DataFrame:
        """The cell table: id, path, label (current, after corrections), split, domain, group,
        and ``label_original`` (as extracted; never overwritten).

        Every column is checked against the metadata and CRC-32 its writer recorded, and the ids and paths
        against the dataset's digest: an altered, swapped or lost cell-table value is an error, never cells
        attached to other cells' features."""
        g = self.group["obs"]
        records, crcs = self.attrs.get("arrays") or {}, self.attrs.get("obs_crc") or {}
        cols = {}
        for c in OBS_COLUMNS:
            where = f"the cell-table column '{self.name}/obs/{c}'"
            try:
                arr = as_array(g[c])
            except Exception as e:
                raise MetadataLost(f"{where} has lost its metadata ({type(e).__name__}); {self._repair}") from e
            if c in records:
                check_array(arr, records[c], where, self._repair)
            try:
                values = strings(arr[:])
            except Exception as e:
                raise ChunkDamaged(f"{where} cannot be decoded ({type(e).__name__}: {e}); {self._repair}") from e
            if len(values) != self.n:
                raise ChunkDamaged(f"{where} has {len(values)} values for the dataset's {self.n} cells")
            if c in crcs:
                problem = crc_problem(int(crcs[c]), crc_values(values))
                if problem:
                    raise ChunkDamaged(f"{where}: {problem}; the values written at extraction are lost")
            cols[c] = values
        if cell_list_digest(cols["id"].tolist(), cols["path"].tolist()) != self.attrs["digest"]:
            raise ChunkDamaged(
                f"the cells of dataset '{self.name}' (ids and paths) do not match its recorded digest: rows were "
                "swapped or edited, which would attach cells to other cells' features"
            )
        df = pd.DataFrame(cols)
        df["label_original"] = df["label"]
        current = _labels.read_current(self.group, self.n)
        if current is not None:
            df["label"] = current
        return df

    @property
    def _repair(self) -> str:
        return f"run `embedcache verify {self.store.url} --repair`"

    def label_history(self) -> pd.DataFrame:
        """Every applied label correction, oldest first: id, old, new, time, source, note."""
        return _labels.read_history(self.group, check=True)

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
            return self.store.reopen("a").dataset(self.name).apply_corrections(corr, source=source)
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
        with quiet_zarr():
            return sorted(
                path
                for path, node in feats.members(max_depth=None)
                if isinstance(node, zarr.Group) and complete(node.attrs, FEATURE_SET_ATTRS, "feature_set")
            )

    def feature_set(self, key: str) -> FeatureSet:
        if key not in self.feature_keys():
            raise StoreError(
                f"no feature set '{key}' in dataset '{self.name}' (has: {', '.join(self.feature_keys()) or 'none'})"
            )
        return FeatureSet(self, key)

    def find_feature_set(self, backbone: str, *, needs: Callable[[FeatureSet], str | None] | None = None) -> FeatureSet:
        """The feature set for a backbone name (``timm:test_vit``), a key prefix (``timm-test_vit@random/160-bicubic``)
        or a full key. A name picks its clean set; perturbed sets (``extract --perturb``) are for robustness and
        are only picked by their full key.

        Several clean sets (different preprocessing or weights): ``needs`` (a study's requirements: a clean set
        -> what it lacks, or None when it has everything, e.g. perturbed sets beside it, a pooling, tail tokens)
        keeps those that hold what the study needs; exactly one is picked, several are an error naming the keys
        that select each, none an error saying what each lacks."""
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
                f"run: embedcache extract --model {typed} ... (in Python: embedcache.extract({typed!r}, ...))"
            )
        if len(clean) > 1:
            lacking: dict[str, str] = {}
            if needs is not None:
                lacking = {k: lack for k in clean if (lack := needs(FeatureSet(self, k))) is not None}
                fit = [k for k in clean if k not in lacking]
                if len(fit) == 1:
                    return FeatureSet(self, fit[0])
                if not fit:
                    each = "; ".join(f"{k[: -len('/clean')]}: {lacking[k]}" for k in clean)
                    raise StoreError(
                        f"'{typed}' has {len(clean)} clean feature sets in dataset '{self.name}' and none holds what "
                        f"the study needs ({each})"
                    )
                clean = fit
            choices = ", ".join(k[: -len("/clean")] for k in clean)
            why = "different preprocessing or weights" + (
                ", each with what the study needs" if needs is not None else ""
            )
            first = clean[0][: -len("/clean")]
            raise StoreError(
                f"'{typed}' has {len(clean)} clean feature sets in dataset '{self.name}' ({why}: {choices}); "
                f"select one by its backbone/preprocessing: model={first!r} / --model {first}"
            )
        if len(matches) == 1:
            return FeatureSet(self, matches[0])
        raise StoreError(
            f"'{typed}' has only perturbed feature sets in dataset '{self.name}' ({', '.join(matches)}); "
            f"extract its clean set (embedcache.extract({typed!r}, ...) / embedcache extract --model {typed} ..., "
            "without perturb) or give a full key"
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
        fp_digest = digest(fingerprint)
        feats = self.group["features"]
        if key in self.feature_keys():
            fs = FeatureSet(self, key)
            if fs.attrs["fingerprint"] != fp_digest:
                theirs, ours = fs.attrs.get("fingerprint_fields", {}), fingerprint
                diff = {
                    k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)
                }
                raise FeatureSetConflict(
                    f"feature set '{key}' exists but was made differently: "
                    + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                )
            if all(p in fs._written_arrays() for p in [*pools, *(tokens or {})]):
                return fs  # nothing to create: a read-only store can still serve a cache hit
            g, chunk_size, fresh = fs.group, fs.chunk_size, False  # an existing set keeps its chunking
        else:
            self._refuse_to_overwrite(key)
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
                    compressors=COMPRESSOR,
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
                    compressors=COMPRESSOR,
                    fill_value=0,
                    dimension_names=token_dims(len(cell_shape)),
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
            g.create_array(  # per cell: a fingerprint of its input (file size and mtime), checked on resume
                "inputs", shape=(n,), dtype="int64", chunks=(chunk_size,), fill_value=0, dimension_names=("cell",)
            )
            g.create_array(  # per cell: a digest of its decoded pixels (exact duplicates without reading images)
                "pixels", shape=(n,), dtype="int64", chunks=(chunk_size,), fill_value=0, dimension_names=("cell",)
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
            attrs = {
                "kind": "feature_set",
                "key": key,
                "chunk_size": chunk_size,
                "width": width,
                "dtype": dtype,
                "fingerprint": fp_digest,
                "fingerprint_fields": fingerprint,
                "provenance": provenance,
                "arrays": {name: array_record(a) for name, a in g.arrays()},  # compared on open
            }
            g.update_attributes(attrs)
        else:  # an existing set gained arrays (tokens, a pooling): its record grows with them
            attrs = {**attrs_of(g), "arrays": {name: array_record(a) for name, a in g.arrays()}}
            g.update_attributes({"arrays": attrs["arrays"]})
        self.record_feature_set(key, attrs)
        return FeatureSet(self, key)

    def record_feature_set(self, key: str, attrs: dict[str, Any]) -> None:
        """Record feature set ``key``'s attributes in this dataset's (and the dataset's in the store root's), so
        that a lost ``zarr.json`` is damage to repair, never a set to create afresh."""
        with self.store.lock(f"structure-{self.name}", wait=CREATE_WAIT_S):
            fresh = fresh_attrs(self.group)
            records = dict(fresh.get("feature_sets") or {})
            records[key] = attrs
            self.group.update_attributes({"feature_sets": records})
            self.attrs = {**fresh, "feature_sets": records}
        self.store.record_dataset(self.name, {k: v for k, v in self.attrs.items() if k != "feature_sets"})

    def lost_feature_sets(self) -> list[str]:
        """Feature sets this dataset records whose ``zarr.json`` is gone or unreadable (damage)."""
        present = set(self.feature_keys())
        return sorted(k for k in (self.attrs.get("feature_sets") or {}) if k not in present)

    def _refuse_to_overwrite(self, key: str) -> None:
        """Never create a feature set over one whose metadata is lost: damage to repair, not a fresh start."""
        if key in (self.attrs.get("feature_sets") or {}):
            raise MetadataLost(
                f"feature set '{self.name}/{key}' in {self.store.url} has lost its metadata (zarr.json gone or "
                f"unreadable) but is recorded: {self._repair} (it writes the recorded metadata back), then rerun"
            )
        feats = as_group(self.group["features"])
        if not node_exists(feats, key):
            return
        try:
            g = as_group(feats[key])
        except Exception:  # noqa: BLE001  unreadable: treat as data
            g = None
        if g is not None:
            for name in g.array_keys():
                if name.startswith("done_") and np.asarray(g[name][:]).any():
                    raise MetadataLost(
                        f"feature set '{self.name}/{key}' has no attributes but holds written chunks: refusing to "
                        f"create it afresh over them; {self._repair}"
                    )

    def info(self, verify: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "source": self.attrs.get("source"), "feature_sets": {}}
        try:
            obs = self.obs
        except StoreError as e:
            out["damage"] = [str(e)]
            return out
        if (obs["label"] != "").any():
            out["classes"] = int(obs.loc[obs["label"] != "", "label"].nunique())
        out["label_corrections"] = len(self.label_history())
        for key in self.feature_keys():
            try:
                out["feature_sets"][key] = FeatureSet(self, key).info(verify=verify)
            except StoreError as e:
                out["feature_sets"][key] = {"status": "damaged", "damage": [str(e)]}
        lost = self.lost_feature_sets()
        if lost:
            out["lost"] = [f"{key} (feature set): metadata lost; run embedcache verify --repair" for key in lost]
        return out
