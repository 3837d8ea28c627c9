"""``neighbors``: the one-call form behind ``probes neighbors``: the ``k`` nearest cells of stored cells or new
images, as a table and a contact sheet (:class:`probes.search.index.NeighborIndex` does the searching)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from embedcache.options import UNSET
from probes.errors import ProbeError
from probes.search.index import ApproxNeighborIndex, NeighborIndex
from probes.search.options import SearchOptions

__all__ = ["neighbors", "NeighborResult", "print_neighbors"]


@dataclass
class NeighborResult:
    """What :func:`neighbors` found; ``table`` has one row per query x answer."""

    table: pd.DataFrame
    queries: pd.DataFrame  # query, label, path of each query
    index: NeighborIndex
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    recall: dict | None = None  # the recall@k measured for this look-up (``recall=True``)

    @property
    def index_info(self) -> str:
        """Which index answered, and for an ANN index its measured recall@k."""
        return self.index.describe()


def neighbors(
    store: Any,
    model: str,
    *,
    id: str | Sequence[str] | None = None,  # noqa: A002 - the CLI's name
    image: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    k: int = 12,
    dataset: str | None = None,
    pool: str | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    index: NeighborIndex | str = UNSET,
    show: bool = False,
    options: SearchOptions | None = None,
    **more: Any,
) -> NeighborResult:
    """The ``k`` nearest cells (cosine) of stored cells (``id``) and/or new images.

    New images are embedded with the feature set's own backbone, weights and preprocessing.
    Writes ``neighbors.csv`` and ``neighbors.png`` (a contact sheet: each query beside its
    neighbours and their labels) to ``out`` when given. ``index``: ``auto`` (exact below
    ``exact_below`` cells, else ``ivf``), ``exact``, ``ivf`` or ``hnsw`` (approximate, built once and
    kept beside the store, candidates re-ranked exactly: see :class:`ApproxNeighborIndex`), or a
    built :class:`NeighborIndex` to reuse for many interactive look-ups. ``nprobe`` (IVF lists
    visited), ``ef`` (HNSW candidate list) and ``rerank`` (candidates re-scored per query) tune an
    ANN search; ``recall`` measures its recall@k against exact search now, for these settings.
    ``show`` prints one table per query and the index line (the CLI's output). ``nprobe``, ``ef``,
    ``rerank``, ``recall`` and ``exact_below`` are the fields of :class:`SearchOptions` (keywords too).
    """
    opts = SearchOptions.build(options, **more, **({"index": index} if isinstance(index, str) else {}))
    index = index if isinstance(index, NeighborIndex) else opts.index
    nprobe, ef, rerank, recall, exact_below = opts.nprobe, opts.ef, opts.rerank, opts.recall, opts.exact_below
    ids = [id] if isinstance(id, str) else [str(i) for i in (id or [])]
    images = [image] if isinstance(image, (str, os.PathLike)) else list(image or [])
    if not ids and not images:
        raise ProbeError("give a cell id (--id) or an image (--image) to look up")
    if int(k) < 1:
        raise ProbeError(f"k must be at least 1, got {k}")
    for im in images:
        if not Path(im).is_file():
            raise ProbeError(f"image not found: {im}")
    if isinstance(index, NeighborIndex):
        idx = index
        if isinstance(idx, ApproxNeighborIndex):
            idx.nprobe, idx.ef, idx.rerank = int(nprobe or idx.nprobe), int(ef or idx.ef), int(rerank or idx.rerank)
    else:
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if show else None
        idx = NeighborIndex.from_store(
            store, model, dataset=dataset, pool=pool, index=index, exact_below=exact_below, nprobe=nprobe, ef=ef,
            rerank=rerank, log=log,
        )  # fmt: skip
    measured = idx.measure_recall(int(k)) if recall and isinstance(idx, ApproxNeighborIndex) else None
    tables, queries = [], []
    if ids:
        tables.append(idx.query_ids(ids, k))
        o = idx.obs.iloc[idx.positions(ids)]
        queries += [(str(i), str(lab), str(p)) for i, lab, p in zip(ids, o["label"], o["path"])]
    if images:
        tables.append(idx.query_images(images, k, device=device))
        queries += [(str(im), "(new image)", str(im)) for im in images]
    res = NeighborResult(
        pd.concat(tables, ignore_index=True),
        pd.DataFrame(queries, columns=["query", "label", "path"]),
        idx,
        recall=measured,
    )
    if out is not None:
        from probes.reporting.contact import neighbor_sheet
        from probes.reporting.tables import prepare_out, write_files

        res.out = prepare_out(out)
        res.files = write_files(
            res.out,
            tables={"neighbors.csv": res.table},
            plots={"neighbors.png": lambda p: neighbor_sheet(res.table, res.queries, p)},
        )
    if show:
        print_neighbors(res)
    return res


def print_neighbors(res: NeighborResult, console: Any = None) -> None:
    """One table per query: rank, id, label, similarity and path of each neighbour."""
    from probes.reporting.console import Col, Panel, print_report

    panels = []
    for q, g in res.table.groupby("query", sort=False):
        rows = [[str(r.rank), r.id, r.label, f"{r.similarity:.4f}", r.path] for r in g.itertuples(index=False)]
        panels.append(
            Panel(
                f"nearest cells of {q}", [Col(c, "left") for c in ("rank", "id", "label", "similarity", "path")], rows
            )
        )
    lines = [res.index_info] + [f"{name}: {path}" for name, path in res.files.items()]
    print_report(panels, lines=lines, console=console)
