"""Reading cells and features for probe studies, through the embedcache store API only.

:func:`open_cells` opens one or more backbones' feature sets of one dataset and keeps the
cells every study may use: the image was readable for *every* backbone (``ok``) and the cell
has a label. Features are read later, only for the rows a study samples
(:meth:`Cells.features`), as float32, and checked to be finite.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError


@dataclass
class Cells:
    """The usable cells of one dataset and the feature sets (one per backbone) to read.

    ``obs`` holds only usable cells, in store order, with the store row in column ``row``.
    ``excluded`` counts the cells left out and why (per backbone for ``not_ok``).
    """

    store_url: str
    dataset: str
    pool: str  # the pooling of every backbone (``cls``), or per backbone (``timm:a=cls,timm:b=mean``)
    backbones: list[str]
    feature_sets: dict[str, Any]  # backbone name -> embedcache FeatureSet
    obs: pd.DataFrame
    n_total: int
    excluded: dict[str, int] = field(default_factory=dict)
    pools: dict[str, str] = field(default_factory=dict)  # backbone name -> its pooling

    def pool_of(self, backbone: str) -> str:
        """The pooling read for ``backbone``."""
        return self.pools.get(backbone, self.pool)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """The usable cells' labels (str); read once (a study asks for them per split)."""
        labels = self.obs["label"].to_numpy(dtype=str)
        labels.flags.writeable = False  # shared by every caller
        return labels

    def feature_key(self, backbone: str) -> str:
        return self.feature_sets[backbone].key

    def features(self, backbone: str, positions: np.ndarray, feature_set: Any | None = None) -> Any:
        """Float32 features of the usable cells at ``positions`` (indices into ``obs``).

        Only those rows are read from the store, from ``backbone``'s feature set or from
        ``feature_set`` (e.g. a perturbed one of the same dataset). Non-finite values raise
        :class:`ProbeError` naming the cells. Above the memory budget (:mod:`probes.features.policy`:
        ``--max-memory``, ``--out-of-core``) nothing is read here: the rows come as a
        :class:`probes.features.chunked.ChunkedRows`, read (and checked) block by block by the fits.
        """
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.obs["row"].to_numpy()[positions]
        fs = feature_set if feature_set is not None else self.feature_sets[backbone]
        pool = self.pool_of(backbone)
        from probes.features.chunked import chunked_if_large

        lazy = chunked_if_large(fs, pool, rows, self.obs["id"].to_numpy()[positions])
        if lazy is not None:
            return lazy
        uniq, inverse = np.unique(rows, return_inverse=True)
        try:
            x = fs.to_numpy(pool, rows=uniq)
        except Exception as e:  # StoreError (incomplete set, missing pool) and I/O errors
            raise ProbeError(f"cannot read '{fs.key}/{pool}' features: {e}") from e
        x = x[inverse]
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            ids = self.obs["id"].to_numpy()[positions[bad]]
            shown = ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")
            raise ProbeError(
                f"{int(bad.sum())} cell(s) have NaN or inf '{pool}' features in '{fs.key}' "
                f"(e.g. {shown}); re-extract them (embedcache extract ... --store-dtype float32 if they "
                "overflowed float16) or drop them from the manifest"
            )
        return x

    def features_of_all(self, positions: np.ndarray) -> dict[str, Any]:
        """:meth:`features` of every backbone, for a study that holds them all at once (the audit): under the
        ``auto`` policy their *sum* is held against the memory budget, and when it is over, every backbone's
        rows are read out of core."""
        from probes.features.policy import current_policy, memory_policy

        policy = current_policy()
        widths = [int(self.feature_sets[b].array(self.pool_of(b)).shape[1]) for b in self.backbones]
        total = sum(widths) * len(positions) * 4
        if policy.mode == "auto" and len(self.backbones) > 1 and policy.out_of_core(total):
            with memory_policy("always", policy.max_memory, policy.block_rows):
                return {b: self.features(b, positions) for b in self.backbones}
        return {b: self.features(b, positions) for b in self.backbones}

    def exclusion_lines(self) -> list[str]:
        """Human-readable lines on what was left out, and on labels that are one number spelt several ways
        (``1``, ``01``, ``1.0``: studied as distinct classes, as stored)."""
        from embedcache.inputs.sources import label_collisions

        out = []
        for k, v in self.excluded.items():
            if v:
                out.append(f"{v} of {self.n_total} cells excluded: {exclusion_reason(k)}")
        return out + label_collisions(self.labels.tolist())


def exclusion_reason(key: str) -> str:
    """Words for a key of :attr:`Cells.excluded` (``not_ok:<backbone>``, ``no_label``)."""
    if key.startswith("not_ok:"):
        return f"not ok in {key[len('not_ok:') :]} (unreadable image or NaN/inf features; embedcache info)"
    return key.replace("_", " ")


def require_complete(fs: Any, pool: str, backbone: str | None = None) -> None:
    """Refuse a feature set that lacks ``pool`` or has unwritten chunks of it, saying what to run."""
    if pool not in fs.pools:
        has = fs.pools[0] if fs.pools else "cls"
        use = f"--pool {backbone}={has}" if backbone else f"--pool {has}"
        raise ProbeError(
            f"'{fs.key}' has no '{pool}' features (has: {', '.join(fs.pools)}); "
            f"use {use} or re-extract with --pool {pool}"
        )
    pending = fs.pending_chunks([pool])
    if pending:
        raise ProbeError(
            f"'{fs.key}/{pool}' is incomplete ({len(pending)} of {fs.n_chunks} chunks not written); "
            "rerun the same embedcache extract command to finish it"
        )


def parse_names(value: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (stripped, order kept, duplicates dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return out


def parse_pool(pool: str | None, backbones: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """``--pool`` -> (the pooling for backbones not named, {backbone: pooling}).

    ``None`` or ``""``: each backbone's default; ``"mean"``: every backbone;
    ``"timm:test_resnet=mean,cls"``: mean for that backbone, cls for the others;
    ``"timm:a=cls,timm:b=mean"``: per backbone, the others at their default.
    """
    from embedcache.store import safe_key

    default: str | None = None
    named: dict[str, str] = {}
    by_key = {safe_key(b): b for b in backbones}
    for item in parse_names(pool or ""):
        name, eq, value = item.rpartition("=")
        if not eq:
            if default is not None and default != value:
                raise ProbeError(
                    f"--pool '{pool}' gives two poolings for all backbones ({default}, {value}); "
                    "name the backbone of each, e.g. --pool timm:test_resnet=mean,cls"
                )
            default = value
            continue
        if not value:
            raise ProbeError(f"--pool '{item}' names no pooling: write BACKBONE=cls or BACKBONE=mean")
        match = by_key.get(safe_key(name.strip()))
        if match is None:
            raise ProbeError(
                f"--pool names '{name.strip()}', which is not among --model ({', '.join(backbones)}); "
                "write BACKBONE=POOL with a backbone as given to --model"
            )
        named[match] = value.strip()
    return default, named


def default_pool(fs: Any) -> str:
    """A feature set's default pooling: the first one it was extracted with (the backbone's default unless
    ``extract --pool`` said otherwise), else its first stored pooling."""
    prov = fs.attrs.get("provenance", {}) if hasattr(fs, "attrs") else {}
    for p in prov.get("pools") or []:
        if p in fs.pools:
            return str(p)
    return fs.pools[0] if fs.pools else "cls"


def _needs(pool: str | None, needs: Callable[[Any], str | None] | None) -> Callable[[Any], str | None]:
    """What a clean feature set lacks for a study: the pooling asked for, then the study's own ``needs``."""

    def lacks(fs: Any) -> str | None:
        if pool is not None and pool not in fs.pools:
            return f"no '{pool}' pooling (has {', '.join(fs.pools) or 'none'})"
        return needs(fs) if needs is not None else None

    return lacks


def open_cells(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    dataset: str | None = None,
    pool: str | None = None,
    labelled: bool = True,
    needs: Callable[[Any], str | None] | None = None,
) -> Cells:
    """Open the feature sets of ``model`` (one name, a comma list or a list) in ``store``.

    ``model`` takes the names ``embedcache extract --model`` took (``uni``, ``timm:vit_small``)
    or full feature keys (``uni/224-bicubic/clean``). ``pool``: ``None`` (each backbone's default
    pooling), one pooling for all, or per backbone (:func:`parse_pool`). Reads the cell table and the ``ok``
    flags, never the features. The cells kept were readable for every backbone and, with
    ``labelled`` (studies), carry a label; ``labelled=False`` keeps unlabelled cells too
    (neighbour search in a store extracted with ``--no-labels``).

    A name with several clean feature sets resolves to the one holding what the study needs: the pooling asked
    for, and whatever ``needs`` (a clean feature set -> what it lacks, or None) asks (robustness: the perturbed
    sets beside it); it stays ambiguous only when several hold it
    (:meth:`embedcache.store.Dataset.find_feature_set`).
    """
    import embedcache
    from embedcache.store import Store

    backbones = parse_names(model)
    if not backbones:
        raise ProbeError("no model given: name at least one backbone, e.g. model='uni' / --model uni")
    try:
        st = store if isinstance(store, Store) else embedcache.open_store(store)
        ds = st.dataset(dataset)
    except Exception as e:
        raise ProbeError(str(e)) from e
    common, named = parse_pool(pool, backbones)
    feature_sets = {}
    pools: dict[str, str] = {}
    for name in backbones:
        try:
            fs = ds.find_feature_set(name, needs=_needs(named.get(name) or common, needs))
        except Exception as e:
            raise ProbeError(str(e)) from e
        pools[name] = named.get(name) or common or default_pool(fs)
        require_complete(fs, pools[name], name)
        feature_sets[name] = fs
    distinct = set(pools.values())
    pool_text = distinct.pop() if len(distinct) == 1 else ",".join(f"{b}={p}" for b, p in pools.items())
    obs = ds.obs
    n = len(obs)
    keep = np.ones(n, dtype=bool)
    excluded: dict[str, int] = {}
    for name, fs in feature_sets.items():
        ok = fs.ok()
        excluded[f"not_ok:{name}"] = int((~ok).sum())
        keep &= ok
    if labelled:
        has_label = obs["label"].str.strip().ne("").to_numpy()
        if not has_label.any():
            raise ProbeError(
                f"dataset '{ds.name}' has no labels (obs.label is empty for all {n} cells); "
                "re-extract from a manifest with a label column (embedcache extract --label-column NAME)"
            )
        excluded["no_label"] = int((keep & ~has_label).sum())
        keep &= has_label
    if not keep.any():
        what = "unreadable or unlabelled" if labelled else "unreadable"
        raise ProbeError(f"no usable cells in dataset '{ds.name}' ({', '.join(backbones)}): every cell is {what}")
    table = obs.loc[keep].copy()
    table.insert(0, "row", np.flatnonzero(keep))
    table = table.reset_index(drop=True)
    return Cells(
        store_url=st.url,
        dataset=ds.name,
        pool=pool_text,
        backbones=backbones,
        feature_sets=feature_sets,
        obs=table,
        n_total=n,
        excluded=excluded,
        pools=pools,
    )
