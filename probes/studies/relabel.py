"""Reviewed label corrections into the store: :func:`relabel`, a thin call of
:meth:`embedcache.store.Dataset.apply_corrections` (which owns the label history and its safety)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from probes.errors import ProbeError
from probes.sampling import sort_labels


def relabel(
    store: Any,
    corrections: str | os.PathLike | pd.DataFrame,
    *,
    dataset: str | None = None,
    source: str | None = None,
    allow_new_labels: bool = False,
) -> int:
    """Apply reviewed corrections (CSV or table with ``id, new_label[, note]``) to the store's labels.

    History is kept and the original labels never change
    (:meth:`embedcache.store.Dataset.apply_corrections`); every later study and audit reads the
    new labels. A label no cell carries yet (a typo, usually) is refused unless
    ``allow_new_labels``; an id listed twice is refused. Returns how many labels changed.
    """
    import embedcache
    from embedcache.store import Store

    if not isinstance(corrections, pd.DataFrame):
        path = Path(corrections)
        if not path.is_file():
            raise ProbeError(f"corrections file not found: {corrections}")
        source = source or str(corrections)
        try:
            corrections = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ProbeError(f"cannot read corrections {corrections}: {e}") from e
    missing = [c for c in ("id", "new_label") if c not in corrections.columns]
    if missing:
        raise ProbeError(
            f"corrections need the columns id and new_label (missing: {', '.join(missing)}; "
            f"has: {', '.join(map(str, corrections.columns))})"
        )
    corr = corrections.astype(str)
    corr = corr.assign(id=corr["id"].str.strip(), new_label=corr["new_label"].str.strip())
    dup = corr["id"][corr["id"].duplicated()].unique()
    if len(dup):
        raise ProbeError(f"{len(dup)} id(s) appear more than once in the corrections: {', '.join(dup[:5])}")
    try:
        st = (
            store
            if isinstance(store, Store) and store.mode != "r"
            else embedcache.open_store(store.url if isinstance(store, Store) else store, "r")
        )
        ds = st.dataset(dataset)
        if not allow_new_labels:
            obs = ds.obs
            known = set(obs["label"]) | set(obs["label_original"])
            new = sorted(set(corr["new_label"]) - known - {""})
            if new:
                raise ProbeError(
                    f"new label(s) no cell carries: {', '.join(new[:5])} "
                    f"(known: {', '.join(sort_labels(known - {''}))}); "
                    "fix the typo, or pass --allow-new-labels to introduce a class"
                )
        return ds.apply_corrections(corr, source=source)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(str(e)) from e
