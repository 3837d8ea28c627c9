"""``probes audit``, ``probes neighbors``, ``probes relabel``: thin calls of :func:`probes.audit`,
:func:`probes.search.index` and :func:`probes.relabel` with the same parameter names. Plain functions
with Typer options (:mod:`cli.common`); :mod:`cli.probes_app` registers them."""

from __future__ import annotations

from typing import Optional

import typer

from cli.common import (
    DATASET,
    DEVICE,
    MAX_MEMORY,
    MODEL,
    OUT,
    OUT_OF_CORE,
    POOL,
    PROBES,
    QUIET,
    SCHEDULER,
    SEEDS,
    STORE,
    K,
    fail,
    make_console,
)


def audit(
    store: str = STORE(),
    model: str = MODEL(),
    probes: str = PROBES("logistic,knn,mlp"),
    folds: int = typer.Option(5, help="out-of-fold folds (group-aware when the store's group column has values)"),
    seeds: str = SEEDS("3"),
    folds_by: str = typer.Option(
        "auto", "--folds-by", help="fold scheme: auto (group-aware when obs.group has values), group, stratified"
    ),
    k: int = K(10, "neighbours per cell for the neighbour-disagreement evidence"),
    ranking: Optional[str] = typer.Option(
        None,
        help="score: calibration|order|neighbour weight|consensus weight[|margin share], e.g. 'cal|all|n0.2|c0' "
        "or 'raw|all|n0.2|c0.15|m0.2' (default: the one the label-noise benchmark chose)",
    ),
    joint: bool = typer.Option(
        True,
        "--joint/--no-joint",
        help="add the joint member: a plain logistic (C=1) on every backbone's features side by side, per seed",
    ),
    top: int = typer.Option(50, help="suspects in the report, contact sheet and corrections template"),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: audit-<models>-<date>)"),
    cache: Optional[str] = typer.Option(
        None,
        help="out-of-fold cache file (default: beside the store, "
        "<store>.embedcache/probes/audit-oof-<dataset>.parquet)",
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write out-of-fold predictions"),
    device: str = DEVICE(),
    threads: Optional[int] = typer.Option(
        None,
        help="BLAS/OpenMP/torch threads for the probe fits (default: the "
        "library's; 1 is often much faster on small or shared CPUs)",
    ),
    html: bool = typer.Option(True, "--html/--no-html", help="write report.html"),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    scheduler: Optional[str] = SCHEDULER(),
    quiet: bool = QUIET(),
) -> None:
    """Rank cells by how likely their label is wrong: confident learning on calibrated models, neighbours."""
    import probes as api

    try:
        if no_cache and cache:
            raise ValueError("--cache and --no-cache exclude each other")
        api.audit(
            store,
            model,
            probes=probes,
            folds=folds,
            seeds=seeds,
            folds_by=folds_by,
            k=k,
            ranking=ranking,
            joint=joint,
            out_of_core=out_of_core,
            max_memory=max_memory,
            scheduler=scheduler,
            top=top,
            dataset=dataset,
            pool=pool,
            out=out,
            cache=False if no_cache else cache,
            device=device,
            threads=threads,
            html=html,
            quiet=quiet,
            show=True,
        )
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        fail(e)


def neighbors(
    store: str = STORE(),
    model: str = MODEL("one backbone name (or full feature key)"),
    id: Optional[list[str]] = typer.Option(None, "--id", help="cell id to look up (repeatable)"),  # noqa: A002
    image: Optional[list[str]] = typer.Option(None, "--image", help="new image file to embed and look up (repeatable)"),
    k: int = K(12, "neighbours per query"),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("folder for neighbors.csv and neighbors.png"),
    device: str = DEVICE("device to embed --image with: auto, cpu, cuda"),
    index: str = typer.Option(
        "auto",
        "--index",
        help="auto (exact below --exact-below cells, else ivf), exact, ivf (IVF-PQ) or hnsw; an ivf/hnsw index is "
        "built once per feature set, kept beside the store, and its candidates are re-ranked by exact cosine",
    ),
    nprobe: Optional[int] = typer.Option(None, help="ivf: inverted lists visited per query (default 32)"),
    ef: Optional[int] = typer.Option(None, help="hnsw: candidate list size per query, at least --rerank (default 128)"),
    rerank: Optional[int] = typer.Option(None, help="ivf/hnsw: candidates re-scored exactly per query (default 200)"),
    recall: bool = typer.Option(
        False, "--recall", help="measure the ivf/hnsw index's recall@k against exact search now, for these settings"
    ),
    exact_below: int = typer.Option(200_000, help="--index auto: exact search below this many cells"),
) -> None:
    """The k nearest cells (cosine) of stored cells or new images: a table and a contact sheet."""
    import probes as api

    try:
        api.neighbors(
            store,
            model,
            id=id or None,
            image=image or None,
            k=k,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            index=index,
            nprobe=nprobe,
            ef=ef,
            rerank=rerank,
            recall=recall,
            exact_below=exact_below,
            show=True,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


def relabel(
    store: str = STORE(),
    corrections: str = typer.Option(..., "--corrections", "-c", help="CSV with columns id,new_label[,note]"),
    dataset: Optional[str] = DATASET(),
    source: Optional[str] = typer.Option(None, help="who or what made the corrections (default: the file path)"),
    allow_new_labels: bool = typer.Option(False, "--allow-new-labels", help="accept labels no cell carries yet"),
) -> None:
    """Apply reviewed label corrections; history is kept and original labels never change."""
    import probes as api

    try:
        n = api.relabel(store, corrections, dataset=dataset, source=source, allow_new_labels=allow_new_labels)
    except Exception as e:  # noqa: BLE001
        fail(e)
    make_console().print(
        f"{n} label(s) changed (history kept, original labels unchanged); "
        "every later study and audit reads the new labels"
    )
