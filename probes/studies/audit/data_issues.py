"""Data-set issues found on cached features: near-duplicates, leaks across a split, outliers.

What cleanlab's Datalab (``near_duplicate``, ``outlier``) and FiftyOne's brain do, but exact and in
bounded memory: every search is an exhaustive FAISS ``IndexFlatIP`` over L2-normalised rows (cosine
similarity), queries :data:`QUERY_ROWS` at a time; features read out of core
(:class:`probes.features.chunked.ChunkedRows`, :class:`~probes.features.chunked.SideBySide`) are indexed
one database block at a time and give the same answer as in memory.

**Near-duplicates**: :mod:`probes.studies.audit.duplicate_search` (the measurements behind its threshold are there).

**Leaks** (:func:`split_leaks`). A duplicate set with cells in more than one part of a split, and a group
(smear, patient) with cells in more than one part; cells without a part ("") or group ("") take no part.

**Outliers** (:func:`outlier_scores`). Per cell, the mean cosine distance (1 - cosine) to its ``k``
nearest other cells (cleanlab's choice: the mean of k is steadier than the k-th alone, which is reported
too), exact. The cell's own duplicate set is left out of its neighbours: a copied outlier would otherwise
have a neighbour at distance ~0 and look typical; being copied is the duplicate issue's finding, not
evidence that the cell is typical (other cells' copies are not merged: a copied neighbour counts
twice, as it does in the data set a model is trained on). The score is made relative to the cell's
class: ``score = d / median(d over the class)``, since classes differ in how spread they are (a
"normal" red cell sits among thousands, a rare class among few) and a ratio is scale-free ("3.1x its
class median"); classes with fewer than :data:`MIN_CLASS_CELLS` cells, and every cell when no labels
are given (the unconditional variant, also reported as ``global_score``), are measured against all
cells. A cell is flagged when the
robust z of its log distance within the reference, ``log(score) / (1.4826 * MAD(log d))``, exceeds
:data:`OUTLIER_Z` = 3: kNN distances are positive and right-skewed, roughly symmetric in log, so a
median/MAD z is calibrated without being pulled by the outliers themselves; and unlike "above the 99th
percentile" it does not flag a fixed share of every class when the class is clean.

Default :data:`DEFAULT_K` = 20, measured with 40 foreign cells (10 each of BCCD platelets, BCCD white
cells, TECOM neutrophils, BCCD red cells; random Chula labels) among all 22,106 Chula cells: foreign
cells of one kind are each other's nearest neighbours, so a small k hides such a cluster (k = 5: the 10
platelets' median rank by the class score ~4,200, none flagged; k = 10: ~420, 3 flagged; k = 20: ~40,
8 flagged). At k = 20 the class score separates foreign from Chula cells with AUROC 0.984 (0.994 for
the unconditional one) and flags 33 of the 40 (27 unconditional) and 63 of the 22,106 Chula cells (9
unconditional): 0.3 %, among them cells that are not red cells at all (an empty field, a scale bar,
crops padded at the image border).

Cost, in memory, 2 CPU cores, 22,106 x 1280 features: the duplicate search 8-11 s, the outlier scores
(k = 20) 11 s. Out of core each database block is read once per query block (the duplicate search
only pairs a block with itself and the blocks before it).

Rows with NaN/inf features (or all zeros: no direction) are left out of every search and counted
(``excluded_nonfinite``) instead of failing. Every result has per cell a ``score``, a boolean ``flag`` and
a short ``why`` naming cells by their ``ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError
from probes.studies.audit.duplicate_search import (
    DEFAULT_THRESHOLD,
    QUERY_ROWS,
    Duplicates,
    _check_len,
    _ids,
    _labels,
    _Rows,
    duplicate_sets,
    duplicates,
    merge_duplicates,
    near_duplicate_pairs,
    near_duplicates,
    pixel_duplicates,
)

# the near-duplicate names stay importable from here, where the three audits meet
__all__ = [
    "DEFAULT_K",
    "DEFAULT_THRESHOLD",
    "DataIssues",
    "Duplicates",
    "Leaks",
    "Outliers",
    "data_issues",
    "duplicate_sets",
    "duplicates",
    "knn",
    "merge_duplicates",
    "near_duplicate_pairs",
    "near_duplicates",
    "outlier_scores",
    "pixel_duplicates",
    "split_leaks",
]

DEFAULT_K = 20  # neighbours of the outlier score (see the module docstring)
OUTLIER_Z = 3.0  # robust z (log distance, within the class) above which a cell is flagged an outlier
MIN_CLASS_CELLS = 10  # classes with fewer cells are measured against all cells
_MAD_TO_SIGMA = 1.4826


# -- results ------------------------------------------------------------------------------------------
@dataclass
class Leaks:
    """Leaks across a split. ``sets``: duplicate sets whose cells lie in more than one part (``duplicate_set,
    size, parts, counts, cells, cell_parts``); ``groups``: groups in more than one part (``group, size,
    n_parts`` and one count column per part); ``cells``: per cell ``id, part, group, leak_duplicate,
    leak_group, score`` (cells of its set or group in another part), ``flag``, ``why``. ``note`` is "no
    groups" when no cell has a group."""

    sets: pd.DataFrame
    groups: pd.DataFrame
    cells: pd.DataFrame
    note: str = ""


@dataclass
class Outliers:
    """Outlier scores. ``cells`` (rows in the input's order): ``id, label, knn_distance`` (mean cosine
    distance to the k nearest distinct cells), ``kth_distance, nearest`` (id of the nearest),
    ``reference`` (the median knn_distance it is measured against), ``score`` (knn_distance /
    reference), ``global_score`` (against all cells), ``z`` (robust z of the log distance), ``flag,
    rank`` (1 = most outlying; 0 for excluded cells), ``why``. ``neighbors`` / ``similarities`` (n, k):
    the positions (-1: none) and cosines of each cell's neighbours."""

    cells: pd.DataFrame
    k: int
    z_threshold: float
    neighbors: np.ndarray
    similarities: np.ndarray
    excluded_nonfinite: int = 0
    by_class: bool = True

    def ranking(self) -> pd.DataFrame:
        """The scored cells, most outlying first."""
        return self.cells[self.cells["rank"] > 0].sort_values("rank")


@dataclass
class DataIssues:
    """The three audits of one data set (:func:`data_issues`)."""

    duplicates: Duplicates
    outliers: Outliers | None
    leaks: Leaks | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per cell: ``id`` and ``<issue>_score``, ``<issue>_flag``, ``<issue>_why`` for each issue
        (duplicate, leak, outlier) that was audited."""
        out = pd.DataFrame({"id": self.duplicates.cells["id"]})
        parts: list[tuple[str, pd.DataFrame | None]] = [
            ("duplicate", self.duplicates.cells),
            ("leak", None if self.leaks is None else self.leaks.cells),
            ("outlier", None if self.outliers is None else self.outliers.cells),
        ]
        for name, cells in parts:
            if cells is not None:
                for col in ("score", "flag", "why"):
                    out[f"{name}_{col}"] = cells[col].to_numpy()
        return out


# -- pixel hash ---------------------------------------------------------------------------------------
def _and_list(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def split_leaks(
    duplicate_set: Any,
    parts: Any,
    groups: Any = None,
    ids: Any = None,
) -> Leaks:
    """Leaks of a split: duplicate sets (``duplicate_set`` per cell, -1: none; or a :class:`Duplicates`)
    whose cells lie in more than one part, and groups (``groups`` per cell, "" / None: none) whose cells
    lie in more than one part. ``parts``: each cell's part ("train", "test", any string; "" or None:
    in no part, never a leak). Parts are named in order of size (largest first)."""
    if isinstance(duplicate_set, Duplicates):
        if ids is None:
            ids = duplicate_set.cells["id"].to_numpy()
        duplicate_set = duplicate_set.cells["duplicate_set"].to_numpy()
    sets = _check_len("duplicate_set", duplicate_set, len(duplicate_set)).astype(np.int64)
    n = len(sets)
    part = _labels(parts, n, "parts")
    group = np.full(n, "", dtype=object) if groups is None else _labels(groups, n, "groups")
    names = _ids(ids, n)
    sizes = pd.Series(part[part != ""]).value_counts()
    rank = {p: r for r, p in enumerate(sorted(sizes.index, key=lambda p: (-sizes[p], p)))}
    df = pd.DataFrame({"id": names, "part": part, "group": group, "set": sets})
    df["part_rank"] = df["part"].map(rank).fillna(-1).astype(int)
    placed = df[df["part"] != ""]

    # (a) duplicate sets in more than one part
    in_set = placed[placed["set"] >= 0]
    n_parts = in_set.groupby("set")["part"].nunique()
    leaky_sets = n_parts.index[n_parts > 1].to_numpy(np.int64)
    rows = df[df["set"].isin(leaky_sets)].sort_values(["set", "part_rank", "id"])
    set_table = (
        rows.groupby("set", sort=True)
        .agg(size=("id", "size"), cells=("id", list), cell_parts=("part", list))
        .reset_index()
        .rename(columns={"set": "duplicate_set"})
    )
    span = rows[rows["part"] != ""].groupby(["set", "part_rank", "part"]).size().reset_index(name="count")
    set_parts = span.groupby("set")["part"].agg(list)
    set_counts = (span["part"] + " " + span["count"].astype(str)).groupby(span["set"]).agg(", ".join)
    set_table["parts"] = set_table["duplicate_set"].map(set_parts.map(", ".join))
    set_table["counts"] = set_table["duplicate_set"].map(set_counts)
    set_table = set_table[["duplicate_set", "size", "parts", "counts", "cells", "cell_parts"]]
    set_why = set_parts.map(lambda ps: " spans " + _and_list(ps))

    # (b) groups in more than one part
    note = ""
    grouped = placed[placed["group"] != ""]
    if groups is None or not (group != "").any():
        note = "no groups"
        group_table = pd.DataFrame(columns=["group", "size", "n_parts"])
        group_why = pd.Series(dtype=object)
    else:
        counts = pd.crosstab(grouped["group"], grouped["part"])
        counts = counts[sorted(counts.columns, key=rank.__getitem__)]
        n_parts_g = (counts > 0).sum(axis=1)
        leaky = counts[n_parts_g > 1]
        group_table = leaky.reset_index()
        group_table.columns.name = None
        group_table.insert(1, "size", leaky.sum(axis=1).to_numpy())
        group_table.insert(2, "n_parts", n_parts_g[n_parts_g > 1].to_numpy())
        long = leaky.stack()  # (group, part) -> count, the parts in the columns' order
        long = long[long > 0]
        text = pd.Series(
            long.index.get_level_values(1).astype(str) + " (" + long.astype(str).to_numpy() + ")",
            index=long.index.get_level_values(0),
        )
        joined = text.groupby(level=0, sort=False).agg(lambda t: _and_list(list(t)))
        group_why = ("group " + joined.index.astype(str) + " in " + joined).astype(object)

    leak_dup = df["set"].isin(leaky_sets).to_numpy() & (part != "")
    leak_grp = df["group"].isin(group_why.index).to_numpy() & (part != "") if len(group_why) else np.zeros(n, bool)
    # score: cells sharing this cell's set or group that lie in another part
    other = _linked_elsewhere(df)
    why_set = ("set " + df["set"].astype(str) + df["set"].map(set_why).fillna("").astype(str)).to_numpy(dtype=object)
    why_grp = df["group"].map(group_why).fillna("").astype(str).to_numpy(dtype=object)
    why = np.select([leak_dup & leak_grp, leak_dup, leak_grp], [why_set + "; " + why_grp, why_set, why_grp], "")
    cells = pd.DataFrame(
        {
            "id": names,
            "part": part,
            "group": group,
            "leak_duplicate": leak_dup,
            "leak_group": leak_grp,
            "score": np.where(leak_dup | leak_grp, other, 0),
            "flag": leak_dup | leak_grp,
            "why": why,
        }
    )
    return Leaks(set_table.reset_index(drop=True), group_table.reset_index(drop=True), cells, note)


def _linked_elsewhere(df: pd.DataFrame) -> np.ndarray:
    """Per cell: cells of its duplicate set or its group (union) that lie in another part (placed only)."""
    placed = df["part"] != ""
    s_key = np.where((df["set"] >= 0) & placed, df["set"].astype(str), "")
    g_key = np.where((df["group"] != "") & placed, df["group"].astype(str), "")
    # |set ∪ group| - |(set ∪ group) ∩ own part|, each by inclusion-exclusion over counts
    k = pd.DataFrame({"s": s_key, "g": g_key, "p": df["part"].to_numpy()})

    def count(cols: list[str], mask: np.ndarray) -> np.ndarray:
        c = k.groupby(cols)["p"].transform("size").to_numpy()
        return np.where(mask, c, 0)

    has_s, has_g = s_key != "", g_key != ""
    total = count(["s"], has_s) + count(["g"], has_g) - count(["s", "g"], has_s & has_g)
    here = count(["s", "p"], has_s) + count(["g", "p"], has_g) - count(["s", "g", "p"], has_s & has_g)
    return (total - here).astype(np.int64)


# -- outliers -------------------------------------------------------------------------------------------
def knn(
    X: Any,
    k: int = DEFAULT_K,
    duplicate_set: Any = None,
    *,
    query_rows: int = QUERY_ROWS,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact cosine ``k`` nearest neighbours of every cell among the other usable cells, leaving out the
    cell itself and the cells of its duplicate set (``duplicate_set``, -1: none): ``(similarities (n, k)
    float32, positions (n, k) int64, excluded_nonfinite)``, best first, ties to the lower position; rows
    of excluded cells (and answers missing when a large set leaves fewer than k cells) are NaN / -1."""
    from probes.search.exact import merge_topk
    from probes.search.vectors import RESCORE_EXTRA, rescored_topk

    rows = _Rows(X, block_rows)
    n = rows.n
    sets = np.full(n, -1, np.int64) if duplicate_set is None else _check_len("duplicate_set", duplicate_set, n)
    sets = sets.astype(np.int64)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ProbeError(f"k must be a positive integer, got {k!r}")
    valid = rows.valid
    usable = int(valid.sum())
    if k > usable - 1:
        raise ProbeError(
            f"k={k} is too large: {usable} cells with usable features allow at most k={max(usable - 1, 0)}"
            + (f" ({n - usable} excluded for NaN/inf or all-zero features)" if usable < n else "")
        )
    own = np.ones(n, np.int64)  # cells each query leaves out: itself, or its whole duplicate set
    inset = (sets >= 0) & valid
    own[inset] = np.bincount(sets[inset])[sets[inset]]
    sims = np.full((n, k), np.nan, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int64)
    for pa, xa in rows.blocks():
        for s in range(0, len(pa), query_rows):
            q, qp = xa[s : s + query_rows], pa[s : s + query_rows]
            best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
            best_i = np.full((len(q), 0), -1, dtype=np.int64)
            for pb, xb in rows.blocks() if rows.chunked else [(pa, xa)]:
                if not len(pb):
                    continue
                kb = min(k + int(own[qp].max()) + RESCORE_EXTRA, len(pb))
                _, local = rows.index(xb).search(q, kb)
                cand = pb[np.maximum(local, 0)]
                same = (cand == qp[:, None]) | ((sets[cand] == sets[qp][:, None]) & (sets[qp][:, None] >= 0))
                local = np.where((local < 0) | same, -1, local)
                D, I = rescored_topk(q, xb, local, k, labels=pb[np.maximum(local, 0)])  # noqa: E741
                best_s, best_i = merge_topk(best_s, best_i, D, I, k)
            found = np.isfinite(best_s) & (best_i >= 0)
            sims[qp, : best_s.shape[1]] = np.where(found, best_s, np.nan)
            idx[qp, : best_i.shape[1]] = np.where(found, best_i, -1)
    return sims, idx, rows.excluded


def _robust(logd: np.ndarray) -> tuple[float, float]:
    """(median, MAD-sigma) of log distances; the spread floored so a degenerate class flags nothing odd."""
    med = float(np.median(logd))
    mad = float(np.median(np.abs(logd - med))) * _MAD_TO_SIGMA
    return med, max(mad, 1e-6)


def outlier_scores(
    X: Any,
    labels: Any = None,
    ids: Any = None,
    k: int = DEFAULT_K,
    duplicate_set: Any = None,
    *,
    z: float = OUTLIER_Z,
    min_class_cells: int = MIN_CLASS_CELLS,
    query_rows: int = QUERY_ROWS,
    block_rows: int | None = None,
) -> Outliers:
    """Outlier score of every cell (see the module docstring): the mean cosine distance to its ``k``
    nearest distinct cells (its duplicate set, from ``duplicate_set`` or a :class:`Duplicates`, left
    out) divided by the median of that distance over its class (``labels``; None: over all cells),
    flagged where the robust z of the log distance exceeds ``z``; with ``rank`` (1 = most outlying)."""
    n = len(X)
    if isinstance(duplicate_set, Duplicates):
        if ids is None:
            ids = duplicate_set.cells["id"].to_numpy()
        duplicate_set = duplicate_set.cells["duplicate_set"].to_numpy()
    names = _ids(ids, n)
    label = None if labels is None else _labels(labels, n, "labels")
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
        raise ProbeError(f"z must be a positive number, got {z!r}")
    sims, idx, excluded = knn(X, k, duplicate_set, query_rows=query_rows, block_rows=block_rows)
    dist = np.clip(1.0 - sims.astype(np.float64), 0.0, 2.0)
    scored = ~np.isnan(dist[:, 0])
    knn_d = np.full(n, np.nan)
    knn_d[scored] = np.nanmean(dist[scored], axis=1)
    kth = dist[:, k - 1]
    logd = np.log(np.maximum(knn_d, 1e-12))

    # reference: all cells; per class where the class has enough scored cells
    g_med, g_mad = _robust(logd[scored]) if scored.any() else (0.0, 1.0)
    ref_log = np.full(n, g_med)
    spread = np.full(n, g_mad)
    against = np.full(n, "all cells", dtype=object)
    if label is not None:
        frame = pd.DataFrame({"c": label[scored], "l": logd[scored]})
        stats = frame.groupby("c")["l"].agg(["size", "median"])
        stats["mad"] = frame.assign(a=lambda f: (f["l"] - f["c"].map(stats["median"])).abs()).groupby("c")["a"].median()
        stats = stats[stats["size"] >= min_class_cells]
        own = pd.Series(label).isin(stats.index).to_numpy() & scored
        ref_log[own] = pd.Series(label[own]).map(stats["median"]).to_numpy()
        spread[own] = np.maximum(pd.Series(label[own]).map(stats["mad"]).to_numpy() * _MAD_TO_SIGMA, 1e-6)
        against[own] = "class: " + pd.Series(label[own]).astype(str).to_numpy()
        small = ~own & scored
        against[small] = "all cells; class " + pd.Series(label[small]).astype(str).to_numpy() + " too small"
    score = np.exp(logd - ref_log)
    robust_z = (logd - ref_log) / spread
    score[~scored], robust_z[~scored] = np.nan, np.nan
    flag = scored & (robust_z > z)
    order = np.lexsort((np.arange(n), -np.nan_to_num(score, nan=-np.inf)))
    rank = np.zeros(n, dtype=np.int64)
    rank[order[: int(scored.sum())]] = np.arange(1, int(scored.sum()) + 1)
    by_class = np.char.startswith(against.astype(str), "class:")
    versus = np.where(by_class, "its class median (" + against + ")", "the median of all cells")
    versus = np.where(by_class | (against == "all cells"), versus, versus + " (" + against + ")")
    ratio = pd.Series(score).map(lambda v: f"{v:.1f}").to_numpy(dtype=object)
    why = np.where(flag, f"mean distance to its {k} nearest cells " + ratio + "x " + versus, "")
    why = np.where(scored, why, "features not finite: excluded")
    nearest = np.where(idx[:, 0] >= 0, names[np.maximum(idx[:, 0], 0)], "")
    cells = pd.DataFrame(
        {
            "id": names,
            "label": label if label is not None else "",
            "knn_distance": knn_d,
            "kth_distance": kth,
            "nearest": nearest,
            "reference": np.exp(ref_log),
            "score": score,
            "global_score": np.exp(logd - g_med),
            "z": robust_z,
            "flag": flag,
            "rank": rank,
            "why": why,
        }
    )
    cells.loc[~scored, ["reference", "global_score"]] = np.nan
    return Outliers(cells, int(k), float(z), idx, sims, excluded, by_class=label is not None)


# -- all three --------------------------------------------------------------------------------------------
def data_issues(
    X: Any,
    ids: Any = None,
    *,
    labels: Any = None,
    parts: Any = None,
    groups: Any = None,
    hashes: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    k: int | None = DEFAULT_K,
    z: float = OUTLIER_Z,
    query_rows: int = QUERY_ROWS,
    block_rows: int | None = None,
) -> DataIssues:
    """Duplicates (features, and pixels when ``hashes`` are given), leaks (when ``parts`` are given) and
    outliers (``k`` neighbours, None: skipped; the duplicate sets left out of each cell's neighbours)."""
    dup = duplicates(X, ids, hashes, threshold, query_rows=query_rows, block_rows=block_rows)
    names = dup.cells["id"].to_numpy()
    notes = []
    if dup.excluded_nonfinite:
        notes.append(f"{dup.excluded_nonfinite} cell(s) with NaN/inf or all-zero features excluded")
    leaks = None if parts is None else split_leaks(dup, parts, groups, names)
    if leaks is not None and leaks.note:
        notes.append(leaks.note)
    out = None
    if k is not None:
        sets = dup.cells["duplicate_set"].to_numpy()
        out = outlier_scores(X, labels, names, k, sets, z=z, query_rows=query_rows, block_rows=block_rows)
    return DataIssues(dup, out, leaks, notes)
