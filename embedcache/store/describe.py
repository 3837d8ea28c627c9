"""What ``embedcache info`` shows: :meth:`Store.info` plus each feature set's full provenance, its
perturbed-cell count and each dataset's label-correction count, in one JSON-ready dict."""

from __future__ import annotations

import os
from typing import Any

from embedcache.store.store import open_store

__all__ = ["describe", "provenance_line"]


def describe(store: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """The store's summary with, per feature set, ``provenance`` (all of it: backbone, weights,
    preprocessing, perturbation, pools, compute device and dtype, versions, time) and, for a perturbed
    set, ``perturbed_cells`` (rows holding perturbed features); per dataset ``label_corrections`` (how many)
    and ``label_history`` (every applied correction, oldest first: id, old, new, time, source, note)."""
    st = open_store(store)
    summary = st.info(verify=verify)
    for name, ds_info in summary["datasets"].items():
        ds = st.dataset(name)
        history = ds.label_history()
        ds_info["label_corrections"] = len(history)
        ds_info["label_history"] = history.astype(str).to_dict("records")
        for key, fs_info in ds_info["feature_sets"].items():
            fs = ds.feature_set(key)
            prov = fs.attrs.get("provenance", {})
            fs_info["provenance"] = prov
            if prov.get("perturbation") and "damage" not in fs_info:
                fs_info["perturbed_cells"] = int(fs.ok().sum())
    return summary


def provenance_line(prov: dict[str, Any]) -> str:
    """One line of the provenance for a table: preprocessing, compute, versions and time."""
    prep = prov.get("preprocessing") or {}
    parts = []
    if prep:
        parts.append(f"{prep.get('size')} px {prep.get('interpolation')} {prep.get('fit', '')}".strip())
    if prov.get("working_size"):
        where = prov.get("working_size_from")
        parts.append(f"working size {prov['working_size']}" + (f" ({where})" if where else ""))
    comp = prov.get("compute") or {}
    if comp:
        parts.append(f"{comp.get('device')} {comp.get('device_name', '')} {comp.get('dtype', '')}".strip())
    versions = prov.get("versions") or {}
    if versions:
        parts.append(" ".join(f"{k} {v}" for k, v in versions.items()))
    when = prov.get("created") or prov.get("time")
    if when:
        parts.append(str(when))
    if prov.get("source"):
        parts.append(f"source {prov['source']}")
    return "; ".join(parts) or "-"
