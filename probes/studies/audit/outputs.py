"""The audit's files and console: ``suspects.csv``, ``corrections-template.csv``, ``suspects.png``,
``audit.json``, ``report.html`` (through the one writer) and the printed summary (the one printer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from probes.reporting.console import Col, Panel, print_report
from probes.reporting.contact import suspect_sheet
from probes.reporting.html import audit_html
from probes.reporting.tables import write_files


def write_outputs(res: Any, *, top: int = 50, html: bool = True) -> dict[str, Path]:
    """``suspects.csv``, ``corrections-template.csv``, ``suspects.png`` (the label audit), ``issues.csv``
    (every issue audited, one row per cell), ``audit.json`` and ``report.html`` under ``res.out``."""
    document = {
        "audit.json": {**res.params, "reused_models": res.reused, "computed_models": res.computed, "fits": res.fits}
    }
    issues = {"issues.csv": res.issue_table} if res.issue_table is not None else {}
    if "label" not in res.params.get("issues", ["label"]):
        plots: dict[str, Callable[[Path], Any]] = {}
        if html:
            plots["report.html"] = lambda p: audit_html(res, p, top=top, neighbours=None)
        return write_files(res.out, tables=issues, plots=plots, documents=document)
    sus = res.suspects(top)
    corrections = pd.DataFrame(
        {
            "id": sus["id"],
            "new_label": sus["proposed_label"],
            "note": [
                f"audit rank {r}, score {s:.3f}, was {g}: {w}"
                for r, s, g, w in zip(sus["rank"], sus["score"], sus["given_label"], sus["why"])
            ],
        }
    )
    nb = suspect_neighbors(res, top)
    b0 = res.params["backbones"][0]
    title = f"top suspects (red) and their nearest neighbours in {b0} (orange: another label)"
    label_plots: dict[str, Callable[[Path], Any]] = {
        "suspects.png": lambda p: suspect_sheet(sus.head(min(top, 24)), nb, p, title=title)
    }
    if html:
        label_plots["report.html"] = lambda p: audit_html(res, p, top=top, neighbours=nb)
    files = write_files(
        res.out,
        tables={"suspects.csv": res.table, "corrections-template.csv": corrections, **issues},
        plots=label_plots,
        documents=document,
    )
    files["corrections"] = files.pop("corrections-template.csv")  # the key audits always used
    return files


def suspect_neighbors(res: Any, top: int, backbone: str | None = None) -> pd.DataFrame:
    """Neighbour rows (``query, rank, id, label, similarity, path``) of the ``top`` suspects."""
    b = backbone or res.params["backbones"][0]
    idx, sims = res.neighbors[b]
    rows = []
    ids, labels, paths = (res.obs[c].to_numpy() for c in ("id", "label", "path"))
    for pos in res.table.index[:top]:
        for r, (j, s) in enumerate(zip(idx[pos], sims[pos])):
            if j >= 0:
                rows.append((ids[pos], r + 1, ids[j], labels[j], float(s), paths[j]))
    return pd.DataFrame(rows, columns=["query", "rank", "id", "label", "similarity", "path"])


def print_summary(res: Any, top: int = 15, console: Any = None) -> None:
    """The top suspects with their evidence, the score formula, what was excluded, the data-set issues, the files."""
    p = res.params
    panels = issue_panels(res.issues, top=min(top, 10))
    lines = [*p.get("issue_notes", [])]
    if "label" not in p.get("issues", ["label"]):
        lines += [*p.get("excluded", []), *(f"{name}: {path}" for name, path in res.files.items())]
        print_report(panels, lines=lines, console=console)
        return
    cols = [
        Col(c, "left")
        for c in (
            "rank",
            "id",
            "given",
            "proposed",
            "votes",
            "consensus",
            "self-conf",
            "CL flag",
            "nbr disagr.",
            "score",
        )
    ]
    rows = [
        [
            str(r.rank),
            r.id,
            r.given_label,
            r.proposed_label,
            f"{r.proposed_votes:.2f}",
            f"{r.consensus:.2f}",
            f"{r.self_confidence:.2f}",
            "yes" if r.confident_learning else "",
            f"{r.neighbor_disagreement:.2f}",
            f"{r.score:.3f}",
        ]
        for r in res.table.head(top).itertuples(index=False)
    ]
    title = (
        f"label audit: {p['n_cells']} cells, {p['n_models']} models (backbone x probe) x {len(p['seeds'])} seeds = "
        f"{p['n_runs']} out-of-fold runs ({res.reused} reused, {res.computed} fitted), "
        f"{p['scheme']} {p['folds']}-fold"
    )
    lines = [p["formula"], *p.get("excluded", []), *lines]
    if p.get("cache"):
        lines.append(f"out-of-fold cache: {p['cache']}")
    lines += [f"{name}: {path}" for name, path in res.files.items() if name != "oof"]
    print_report([Panel(title, cols, rows), *panels], lines=lines, console=console)


def issue_panels(found: Any, top: int = 10) -> list[Panel]:
    """One printed table per data-set issue: how many cells are flagged and the top ones with their why."""
    if found is None:
        return []
    panels = []
    parts = [("duplicate", found.duplicates.cells), ("leak", None if found.leaks is None else found.leaks.cells)]
    parts.append(("outlier", None if found.outliers is None else found.outliers.cells))
    for name, cells in parts:
        if cells is None:
            continue
        flagged = cells[cells["flag"]].sort_values("score", ascending=False)
        title = f"{name}s: {len(flagged)} of {len(cells)} cells flagged" + (
            f" (top {top})" if len(flagged) > top else ""
        )
        rows = [[str(r.id), f"{r.score:.3f}", str(r.why)] for r in flagged.head(top).itertuples(index=False)]
        panels.append(Panel(title, [Col("id", "left"), Col("score"), Col("why", "left")], rows))
    return panels
