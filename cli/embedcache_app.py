"""``embedcache``: models, extract, info, demo — thin skins over the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from embedcache.extraction.options import ExtractOptions
from embedcache_cli.common import Table, fail, make_console, run
from embedcache_cli.options import with_options

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Cache frozen foundation-model embeddings of single cells."
)
console = make_console()
err = make_console(stderr=True)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    cost: bool = typer.Option(False, "--cost", help="measure what each backbone costs here (random-init weights)"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="with --cost: names, comma separated, or all (default: a few tiny timm models)"
    ),
    device: str = typer.Option("auto", help="with --cost: auto, cpu, cuda ..."),
    dtype: str = typer.Option("auto", help="with --cost: compute dtype (auto: as extract would choose)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the table as CSV"),
) -> None:
    """List the backbone registry; with --cost, measure parameters, GFLOPs, speed and memory of each."""
    from embedcache.backbones.costs import models as run_models

    try:
        table = run_models(cost=cost, model=model, device=device, dtype=dtype, out=out)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if as_json:
        console.print_json(table.to_json(orient="records"))
        return
    if cost:
        _print_costs(table)
        return
    t = Table(title="embedcache backbones (also: timm:<name>, --weights PATH)")
    for col in ("name", "hub id", "timm arch", "width", "input", "pool", "gated", "licence", "never in"):
        t.add_column(col)
    for s in table.itertuples():
        t.add_row(
            s.name,
            s.hub_id or "-",
            s.arch,
            str(s.width),
            f"{s.input_size} {s.interpolation}",
            ",".join(s.default_pool),
            "yes" if s.gated else "no",
            s.licence,
            ",".join(s.forbid_dtypes) or "-",
        )
    console.print(t)


def _print_costs(table) -> None:
    t = Table(title="backbone costs, measured here with RANDOM-INIT weights (speed and memory, not features)")
    heads = (
        "model",
        "dtype",
        "input",
        "params (M)",
        "weights (MB)",
        "GFLOPs/cell",
        "ms/cell @1",
        "best batch",
        "cells/s @best",
        "peak mem (MB)",
    )
    for col in heads:
        t.add_column(col)
    for r in table.itertuples():
        t.add_row(
            r.model,
            r.dtype,
            str(r.input_size),
            f"{r.params / 1e6:,.2f}",
            f"{r.weight_mb:,.1f}",
            f"{r.gflops_per_cell:,.3f}",
            f"{r.ms_per_cell_batch1:,.2f}",
            str(r.best_batch),
            f"{r.cells_per_s_best:,.1f}",
            f"{r.peak_mem_mb:,.1f}",
        )
    console.print(t)
    if len(table):
        console.print(
            f"device: {table['device'].iat[0]} ({table['device_name'].iat[0]}); memory: {table['mem_method'].iat[0]}"
        )


@app.command("check-precision")
def check_precision(
    model: str = typer.Option(..., "--model", "-m", help="registry name or timm:<name>"),
    data: Path = typer.Option(..., "--data", "-d", help="ImageFolder, .csv/.parquet manifest, or .npz of your cells"),
    dtypes: str = typer.Option("float16,bfloat16,float32", help="dtypes to check against float32, comma separated"),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    n_cells: int = typer.Option(64, help="cells to compare (spread over the data)"),
    threshold: float = typer.Option(0.999, help="a dtype passes when every cell's cosine to fp32 is at least this"),
    weights: Optional[str] = typer.Option(None, help="local weights file, or 'random'"),
    revision: Optional[str] = typer.Option(None, help="hub revision"),
    record: bool = typer.Option(True, "--record/--no-record", help="save the result where --dtype auto reads it"),
) -> None:
    """Compare compute dtypes with float32 on your cells; the recorded result steers extract --dtype auto."""
    from embedcache.backbones.precision import check_precision as run_check

    try:
        table = run_check(
            model,
            data,
            dtypes=[d.strip() for d in dtypes.split(",") if d.strip()],
            device=device,
            n_cells=n_cells,
            threshold=threshold,
            weights=weights,
            revision=revision,
            record=record,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)
    t = Table(
        title=f"{model} on {table['device'].iat[0]}: each dtype against float32 ({table['n_cells'].iat[0]} cells)"
    )
    for col in ("dtype", "min cosine", "median cosine", "max rel. error", "non-finite cells", "passed", "note"):
        t.add_column(col)
    for r in table.itertuples():
        ran = r.passed is not None
        t.add_row(
            r.dtype,
            f"{r.min_cosine:.6f}" if ran else "-",
            f"{r.median_cosine:.6f}" if ran else "-",
            f"{r.max_rel_error:.2e}" if ran else "-",
            str(int(r.non_finite_cells)) if ran else "-",
            {True: "[green]yes[/]", False: "[red]no[/]"}.get(r.passed, "not run"),
            r.note,
        )
    console.print(t)
    if table.attrs.get("unreadable_cells"):
        console.print(f"[yellow]note:[/] {table.attrs['unreadable_cells']} sampled cells could not be read")
    if weights == "random":
        console.print("[yellow]note:[/] random-init weights: the result applies to these weights only")
    if "record" in table.attrs:
        console.print(f"recorded in {table.attrs['record']} (extract --dtype auto skips dtypes that failed)")


@app.command()
@with_options()
def extract(
    model: Annotated[str, typer.Option("--model", "-m", help="registry name (embedcache models) or timm:<name>")],
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="ImageFolder, .csv/.parquet manifest (a path or URL, e.g. s3://...), or .npz"
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="store path or fsspec URL, e.g. cache.zarr or s3://lab/c.zarr")
    ],
    no_labels: Annotated[bool, typer.Option("--no-labels", help="the manifest has no labels")] = False,
    options: ExtractOptions = ExtractOptions(),
) -> None:
    """Extract pooled features of every cell into a resumable Zarr store."""
    import warnings

    from embedcache import extract as run_extract
    from embedcache.inputs.sources import LabelSpellingWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LabelSpellingWarning)  # printed below from r.notes
            if no_labels:
                options = options.replace(label_column=None)
            r = run_extract(model, data, out, options=options)
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        fail(e)
    for v in [r, *r.variants]:
        _report(v)
    for note in r.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)


def _cache_hit(r) -> bool:
    """Say so when ``r`` (a write result) found its feature set complete."""
    if r.cache_hit:
        console.print(
            f"cache hit: [bold]{r.dataset}/{r.key}[/] is complete in {r.store} ({r.n_cells} cells); nothing to do"
        )
    return r.cache_hit


def _report(r) -> None:
    if _cache_hit(r):
        return
    console.print(
        f"wrote [bold]{r.dataset}/{r.key}[/]: {r.cells_computed} cells in {r.chunks_written} chunks, "
        f"{r.seconds:.1f} s ({r.cells_per_second:,.0f} cells/s)"
    )
    if r.skipped:
        console.print(f"[yellow]skipped {len(r.skipped)} unreadable cells[/] (recorded as not ok):")
        for cid, reason in r.skipped[:10]:
            console.print(f"  {cid}: {reason}")
        if len(r.skipped) > 10:
            console.print(f"  ... and {len(r.skipped) - 10} more (embedcache info)")


@app.command("import")
def import_(
    features: Path = typer.Option(
        ..., "--features", "-f", help=".npy (N, D), or .npz with one (N, D) array per pool (cls, mean)"
    ),
    backbone: str = typer.Option(
        ..., "--backbone", "--model", "-m", help="backbone name to file the features under (probes --model NAME)"
    ),
    out: str = typer.Option(..., "--out", "-o", help="store path or fsspec URL"),
    cells: Optional[Path] = typer.Option(
        None, "--cells", help="CSV/Parquet, one row per feature row: id, label, split, domain, group, path"
    ),
    dataset: Optional[str] = typer.Option(
        None, help="dataset inside the store (default: its only dataset, beside the extracted cells; new: cells)"
    ),
    store_dtype: str = typer.Option("float16", help="stored feature dtype: float16 or float32"),
    chunk_size: int = typer.Option(1024, help="cells per stored row-chunk (the unit of resume)"),
) -> None:
    """Write embeddings computed elsewhere into a store, beside extracted ones."""
    from embedcache import import_features_file

    try:
        r = import_features_file(
            out, features, cells, backbone=backbone, dataset=dataset, store_dtype=store_dtype, chunk_size=chunk_size
        )
    except Exception as e:  # noqa: BLE001
        fail(e)
    if not _cache_hit(r):
        console.print(f"wrote [bold]{r.dataset}/{r.key}[/]: {r.n_cells} cells in {r.chunks_written} chunks")
    if r.not_ok:
        console.print(
            f"[yellow]{r.not_ok} rows with NaN/inf values[/] recorded as not ok (studies exclude and count them)"
        )


@app.command()
def info(
    store: str = typer.Argument(..., help="store path or URL"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    verify: bool = typer.Option(False, "--verify", help="also check every chunk's checksum (reads all data)"),
) -> None:
    """Show datasets, feature sets, shapes, status, damage, skipped cells and provenance."""
    from embedcache.store.describe import describe, provenance_line

    try:
        summary = describe(store, verify=verify)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if as_json:
        console.print_json(json.dumps(summary, default=str))
        return
    console.print(f"[bold]{summary['url']}[/] (schema {summary['schema_version']})")
    guarantee = summary.get("write_guarantee")
    if guarantee:
        console.print(f"writers: [bold]{guarantee['mechanism']}[/]: {guarantee['text']}", soft_wrap=True)
    for group in summary.get("incomplete", []):
        console.print(
            f"[yellow]incomplete:[/] {group}: its creation was interrupted; rerun the same command to redo it"
        )
    for line in summary.get("lost", []):
        console.print(f"[red]damaged:[/] {line}", soft_wrap=True)
    for name, ds in summary["datasets"].items():
        if "damage" in ds:
            for d in ds["damage"]:
                console.print(f"[red]damaged:[/] dataset {name}: {d}", soft_wrap=True)
            continue
        for line in ds.get("lost", []):
            console.print(f"[red]damaged:[/] {name}/{line}", soft_wrap=True)
        classes = f", {ds['classes']} classes" if "classes" in ds else ""
        fixes = f", {ds.get('label_corrections', 0)} label corrections (probes relabel history)"
        console.print(
            f"dataset [bold]{name}[/]: {ds['n']} cells{classes}{fixes}, from {ds['source']['kind']} "
            f"{ds['source']['origin']}"
        )
        t = Table()
        heads = ("feature set", "status", "shape", "dtype", "pools", "skipped", "perturbed", "weights", "provenance")
        for col in heads:
            t.add_column(col)
        for key, fs in ds["feature_sets"].items():
            if "weights" not in fs:  # damaged before it could be described
                t.add_row(key, fs["status"], *["-"] * 7)
                continue
            w = fs["weights"]
            where = w.get("hub_id") or w.get("path") or ""
            wdesc = f"{w.get('source', '?')} {where} sha256:{str(w.get('sha256', ''))[:12]}"
            pools = ", ".join(f"{p} {v}" for p, v in fs["pools"].items())
            t.add_row(
                key,
                fs["status"],
                "×".join(map(str, fs["shape"])),
                fs["dtype"],
                pools,
                str(fs.get("skipped_cells", "?")),
                str(fs["perturbed_cells"]) if "perturbed_cells" in fs else "-",
                wdesc,
                provenance_line(fs.get("provenance", {})),
            )
        console.print(t)
        for key, fs in ds["feature_sets"].items():
            for d in fs.get("damage", []):
                console.print(f"[red]damaged:[/] {key}: {d}")
            if fs.get("damage"):
                console.print(f"  run: embedcache verify {summary['url']} --repair, then rerun the same extract")


@app.command()
def verify(
    store: str = typer.Argument(..., help="store path or URL"),
    repair: bool = typer.Option(False, "--repair", help="clear the done flags of damaged chunks (a rerun redoes them)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Check every written chunk against its checksum; with --repair, mark damaged ones for recompute."""
    from embedcache import verify as run_verify

    try:
        report = run_verify(store, repair=repair)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if as_json:
        console.print_json(json.dumps(report.as_dict(), default=str))
    else:
        console.print(
            f"checked {report.chunks_checked} chunks in {report.store}: "
            + ("no damage" if report.ok else f"{len(report.damaged) + len(report.metadata)} damaged")
        )
        for line in report.metadata:
            console.print(f"[red]damaged:[/] {line}", soft_wrap=True)
        for d in report.damaged:
            console.print(f"[red]damaged:[/] {d}")
        for line in report.restored:
            console.print(f"restored from its record: {line}")
        for key in report.unverifiable:
            console.print(
                f"[yellow]no checksums:[/] {key} (written by an older embedcache; only missing chunks are found)"
            )
        for group in report.incomplete_groups:
            console.print(f"[yellow]incomplete:[/] {group}: rerun the command that created it")
        if report.repaired:
            console.print(
                "repaired: the damaged chunks are marked unwritten; rerun the same extract (or import) command"
            )
    if not report.ok and not repair:
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="folder for the store and the probe study"),
    data: Optional[Path] = typer.Option(
        None, help="cells to use (default: the 832 real Chula RBC-12 cells bundled in tests/data)"
    ),
    model: str = typer.Option("efficientnet-lite0", help="backbone to extract with (real ImageNet weights)"),
    compare_random: bool = typer.Option(
        True, "--compare-random/--no-compare-random", help="also extract the same network at random init"
    ),
    probe: bool = typer.Option(True, help="then fit logistic and kNN probes on the cache (probes eval)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", " /--quiet", " /-q", help="progress bars"),
) -> None:
    """Run the main job on real cells: extract with a pretrained backbone and its random-init copy, probe both."""
    from embedcache_cli.demo import demo as run_demo

    def show(step: str, value) -> None:
        if step == "cells":
            console.print(f"real cells: {value}")
        elif step in ("extract", "extract-random"):
            console.print(
                f"{'cache hit' if value.cache_hit else 'wrote'} {value.dataset}/{value.key} ({value.n_cells} cells)"
            )
        elif step == "store":
            info(value, as_json=False, verify=False)

    result = run(
        run_demo,
        out,
        data=data,
        model=model,
        compare_random=compare_random,
        probe=probe,
        progress=progress,
        show=True,
        on_step=show,
    )
    scores = result.macro_f1()
    if result.random is not None and scores:
        t = Table(title="why the cache is worth having: macro-F1 on the same test cells")
        for col in ("probe", f"{result.extract.key} (ImageNet)", f"{result.random.key} (random init)"):
            t.add_column(col)
        for p in ("logistic", "knn"):
            t.add_row(p, f"{scores[(result.extract.key, p)]:.3f}", f"{scores[(result.random.key, p)]:.3f}")
        console.print(t)


@app.command()
def export(
    store: str = typer.Argument(..., help="store path or URL"),
    anndata: Path = typer.Option(..., "--anndata", help="write an AnnData .h5ad: obs = cells, obsm = feature sets"),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="backbone names or feature keys, comma separated (default: every feature set)"
    ),
) -> None:
    """Export a dataset for single-cell tools (scanpy): the cell table and every feature set in one .h5ad."""
    from embedcache.store.export import export_anndata

    try:
        path = export_anndata(store, anndata, dataset=dataset, model=model)
    except Exception as e:  # noqa: BLE001
        fail(e)
    console.print(f"wrote [bold]{path}[/] (obs: cells and current labels; obsm: one matrix per feature set)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
