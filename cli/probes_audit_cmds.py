"""``probes audit``, ``probes neighbors``, ``probes relabel``: thin skins over :mod:`probes.audit`
and :mod:`probes.neighbors`. Plain functions with Typer options; register them with
``app.command("audit")(audit_cmd)`` and so on."""

from __future__ import annotations

import os
from typing import List, Optional

import typer
from rich.console import Console

err = Console(stderr=True)


def _fail(e: Exception) -> None:
    if os.environ.get("PROBES_DEBUG"):
        raise e
    err.print(f"[bold red]error:[/] {str(e).replace('[', chr(92) + '[')}", soft_wrap=True)
    raise typer.Exit(code=1)


def audit_cmd(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    model: str = typer.Option(..., "--model", "-m", help="backbone name(s) as given to embedcache extract, comma separated"),
    probes: str = typer.Option("logistic,knn,mlp", help="comma list of probes: logistic, knn, knn1, svm, svm-rbf, mlp, cosine"),
    folds: int = typer.Option(5, help="out-of-fold folds (group-aware when the store's group column has values)"),
    seeds: str = typer.Option("3", help="a count N (seeds 42..42+N-1) or a comma list of seeds"),
    split: str = typer.Option("auto", help="fold scheme: auto (group-aware when obs.group has values), group, stratified"),
    k: int = typer.Option(10, "-k", "--k", help="neighbours per cell for the neighbour-disagreement evidence"),
    top: int = typer.Option(50, help="suspects in the report, contact sheet and corrections template"),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    pool: str = typer.Option("cls", help="cls or mean"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (default: audit-<models>-<date>)"),
    cache: Optional[str] = typer.Option(None, help="out-of-fold cache file (default: in the store, .probes/audit-oof-<dataset>.parquet)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="neither read nor write out-of-fold predictions"),
    device: str = typer.Option("auto", help="device for the probes: auto, cpu, cuda"),
    threads: Optional[int] = typer.Option(None, help="BLAS/OpenMP/torch threads for the probe fits (default: the library's; 1 is often much faster on small or shared CPUs)"),
    no_html: bool = typer.Option(False, "--no-html", help="skip report.html"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
) -> None:
    """Rank cells by how likely their label is wrong: out-of-fold consensus, self-confidence, neighbours."""
    from probes.audit import audit

    try:
        if no_cache and cache:
            raise ValueError("--cache and --no-cache exclude each other")
        audit(store, model, probes=probes, folds=folds, seeds=seeds, split=split, k=k, top=top, dataset=dataset,
              pool=pool, out=out, cache=False if no_cache else cache, device=device, threads=threads,
              html=not no_html, quiet=quiet)
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        _fail(e)


def neighbors_cmd(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    model: str = typer.Option(..., "--model", "-m", help="one backbone name (or full feature key)"),
    id: Optional[List[str]] = typer.Option(None, "--id", help="cell id to look up (repeatable)"),  # noqa: A002
    image: Optional[List[str]] = typer.Option(None, "--image", help="new image file to embed and look up (repeatable)"),
    k: int = typer.Option(12, "-k", "--k", help="neighbours per query"),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    pool: str = typer.Option("cls", help="cls or mean"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="folder for neighbors.csv and neighbors.png"),
    device: str = typer.Option("auto", help="device to embed --image with: auto, cpu, cuda"),
) -> None:
    """The k nearest cells (exact cosine) of stored cells or new images: a table and a contact sheet."""
    from rich.table import Table

    from probes.neighbors import neighbors

    try:
        res = neighbors(store, model, id=id or None, image=image or None, k=k, dataset=dataset, pool=pool, out=out,
                        device=device)
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    console = Console()
    for q, g in res.table.groupby("query", sort=False):
        t = Table(title=f"nearest cells of {q}")
        for col in ("rank", "id", "label", "similarity", "path"):
            t.add_column(col)
        for r in g.itertuples(index=False):
            t.add_row(str(r.rank), str(r.id), str(r.label), f"{r.similarity:.4f}", str(r.path))
        console.print(t)
    for name, path in res.files.items():
        console.print(f"{name}: {path}")


def relabel_cmd(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    corrections: str = typer.Option(..., "--corrections", "-c", help="CSV with columns id,new_label[,note]"),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    source: Optional[str] = typer.Option(None, help="who or what made the corrections (default: the file path)"),
    allow_new_labels: bool = typer.Option(False, "--allow-new-labels", help="accept labels no cell carries yet"),
) -> None:
    """Apply reviewed label corrections; history is kept and original labels never change."""
    from probes.audit import relabel

    try:
        n = relabel(store, corrections, dataset=dataset, source=source, allow_new_labels=allow_new_labels)
    except Exception as e:  # noqa: BLE001
        _fail(e)
        return
    Console().print(f"{n} label(s) changed (history kept, original labels unchanged); "
                    "every later study and audit reads the new labels")
