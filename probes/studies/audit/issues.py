"""The data-set side of ``probes audit``: which issues to look for, the split leaks are judged against, and the
per-cell issue table (``issues.csv``) that joins them with the label audit.

The searches themselves are :mod:`probes.studies.audit.data_issues`; this module feeds them a store's cells:
the first backbone's features, the pixel digests extraction recorded (exact duplicates without reading an
image), the split the user names and the store's ``group`` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError

ISSUES = ("label", "duplicate", "leak", "outlier")
LEAK_SPLITS = ("auto", "column", "group", "stratified")
LEAK_SEED = 42  # the group / stratified split leaks are judged against: seed and test share as the studies'
LEAK_TEST_SIZE = 0.2


def parse_issues(value: str | Sequence[str]) -> list[str]:
    """``label,duplicate,leak,outlier`` (any subset, ``all``) as a list in that order; unknown names are an error."""
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if names == ["all"]:
        return list(ISSUES)
    unknown = [v for v in names if v not in ISSUES]
    if unknown or not names:
        raise ProbeError(f"unknown issue(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ISSUES)}")
    return [i for i in ISSUES if i in names]


def leak_parts(obs: pd.DataFrame, labels: np.ndarray, how: str) -> tuple[np.ndarray, str]:
    """The part (``train`` / ``val`` / ``test``, "" for none) of every cell under the split ``how`` and its
    description. ``auto``: the store's split column when it has a test part, else a group split when cells
    have groups, else stratified; ``group`` / ``stratified``: the split the studies make with seed 42 and
    20% test cells (:class:`probes.sampling.Sampler`)."""
    from probes.sampling import Sampler

    if how not in LEAK_SPLITS:
        raise ProbeError(f"unknown --split '{how}' for leaks; use one of {', '.join(LEAK_SPLITS)}")
    column = obs["split"].astype(str).str.strip().str.lower().to_numpy() if "split" in obs else None
    groups = obs["group"].astype(str).str.strip().to_numpy() if "group" in obs else None
    has_groups = groups is not None and bool((groups != "").any())
    if how == "auto":
        how = "column" if column is not None and (column == "test").any() else "group" if has_groups else "stratified"
    if how == "column":
        if column is None or not (column != "").any():
            raise ProbeError("--split column: the store has no split column values (the manifest had no split column)")
        return np.where(np.isin(column, ["train", "val", "test"]), column, ""), "the store's split column"
    if how == "group" and not has_groups:
        raise ProbeError("--split group: the store's group column is empty (give the manifest a group column)")
    sampler = Sampler(labels, how, groups=groups, test_size=LEAK_TEST_SIZE)
    sp = sampler.split(None, LEAK_SEED)
    parts = np.full(len(labels), "", dtype=object)
    parts[sp.train] = "train"
    parts[sp.test] = "test"
    return parts.astype(str), f"a {how} split (seed {LEAK_SEED}, {LEAK_TEST_SIZE:.0%} test cells)"


def store_issues(cells: Any, features: dict[str, Any], wanted: Sequence[str], options: Any) -> tuple[Any, list[str]]:
    """Duplicates, leaks and outliers of the audited cells (``wanted`` among them) on the first backbone's
    features, with the pixel digests its extraction recorded; returns the :class:`DataIssues` and notes."""
    from probes.studies.audit.data_issues import data_issues

    backbone = cells.backbones[0]
    fs = cells.feature_sets[backbone]
    notes = [f"data-set issues on {backbone}'s features ({cells.pool_of(backbone)} pool)"]
    hashes = None
    if fs.records_pixels:
        hashes = fs.pixel_digests(cells.obs["row"].to_numpy())
    else:
        notes.append(
            f"no pixel digests in '{fs.key}' (extracted before they were recorded): exact copies are found by "
            "features only"
        )
    parts = groups = None
    if "leak" in wanted:
        parts, described = leak_parts(cells.obs, cells.labels, options.leak_split)
        groups = cells.obs["group"].astype(str).to_numpy() if "group" in cells.obs else None
        notes.append(f"leaks judged against {described}")
    found = data_issues(
        features[backbone],
        cells.obs["id"].to_numpy(),
        labels=cells.labels,
        parts=parts,
        groups=groups,
        hashes=hashes,
        threshold=options.duplicate_threshold,
        k=options.outlier_k if "outlier" in wanted else None,
    )
    return found, notes + list(found.notes)


def issue_table(label_table: pd.DataFrame | None, found: Any, obs: pd.DataFrame) -> pd.DataFrame:
    """``issues.csv``: one row per audited cell (``id, path, label``) with ``<issue>_score``, ``<issue>_flag``,
    ``<issue>_why`` for each issue audited (label: the audit's score, confident learning's flag, its why)."""
    out = obs[["id", "path", "label"]].reset_index(drop=True).copy()
    if label_table is not None:
        lab = label_table.set_index("id").loc[out["id"]]
        out["label_score"] = lab["score"].to_numpy()
        out["label_flag"] = lab["confident_learning"].to_numpy(dtype=bool)
        out["label_why"] = lab["why"].to_numpy()
        out["label_rank"] = lab["rank"].to_numpy()
    if found is not None:
        table = found.table()
        out = out.merge(table, on="id", how="left", validate="one_to_one")
    return out
