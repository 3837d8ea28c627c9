"""``probes``: scale, eval — thin skins over :func:`probes.study.scale` and :func:`probes.study.evaluate`."""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Probe studies on an embedcache feature store.")
err = Console(stderr=True)

_SPLIT_HELP = "stratified (cap, then 80/20; the protocol), column (the store's split column: test vs train), group (no group on both sides)"
_VAL_HELP = "with --split column: 'train' counts val cells as training cells, 'exclude' leaves them out"


def _fail(e: Exception) -> None:
    if os.environ.get("PROBES_DEBUG"):
        raise e
    msg = str(e).replace("[", r"\[")
    err.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    raise typer.Exit(code=1)


@app.command()
def scale(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    model: str = typer.Option(..., "--model", "-m", help="backbone name(s) as given to embedcache extract, comma separated"),
    limits: str = typer.Option("256..16384", help="cells per class: 256..16384 (powers of two) or a comma list"),
    probes: str = typer.Option("logistic", help="comma list of probes: logistic, knn, knn1, svm, svm-rbf, mlp, cosine"),
    seeds: str = typer.Option("5", help="a count N (seeds 42..42+N-1) or a comma list of seeds"),
    split: str = typer.Option("stratified", help=_SPLIT_HELP),
    val: str = typer.Option("train", help=_VAL_HELP),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    pool: str = typer.Option("cls", help="cls or mean"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (default: scale-<models>-<date>)"),
    device: str = typer.Option("auto", help="device for the probes: auto, cpu, cuda"),
    test_size: float = typer.Option(0.2, help="test fraction (the protocol: 0.2)"),
    train_domain: Optional[str] = typer.Option(None, help="train (and in-domain test) on these domain(s) of the store's domain column, comma separated"),
    test_domain: Optional[str] = typer.Option(None, help="score on every cell of these unseen domain(s) (default with --train-domain: all others)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Macro-F1 against cells per class (FlagLimit), per backbone x probe, over seeds."""
    from probes.study import scale as run

    try:
        run(store, model, limits=limits, probes=probes, seeds=seeds, split=split, val=val, dataset=dataset,
            pool=pool, out=out, device=device, test_size=test_size, train_domain=train_domain,
            test_domain=test_domain, quiet=quiet, show=True)
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        _fail(e)


@app.command("eval")
def eval_(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    model: str = typer.Option(..., "--model", "-m", help="backbone name(s) as given to embedcache extract, comma separated"),
    probe: str = typer.Option("logistic", help="probe (or comma list): logistic, knn, knn1, svm, svm-rbf, mlp, cosine"),
    seeds: str = typer.Option("1", help="a count N (seeds 42..42+N-1) or a comma list of seeds"),
    split: str = typer.Option("stratified", help=_SPLIT_HELP),
    val: str = typer.Option("train", help=_VAL_HELP),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    pool: str = typer.Option("cls", help="cls or mean"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (default: eval-<models>-<probe>-<date>)"),
    device: str = typer.Option("auto", help="device for the probes: auto, cpu, cuda"),
    test_size: float = typer.Option(0.2, help="test fraction (the protocol: 0.2)"),
    train_domain: Optional[str] = typer.Option(None, help="train (and in-domain test) on these domain(s) of the store's domain column, comma separated"),
    test_domain: Optional[str] = typer.Option(None, help="score on every cell of these unseen domain(s) (default with --train-domain: all others)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """One fit on the full training split: all metrics, per-class F1, confusion matrix."""
    from probes.study import evaluate as run

    try:
        run(store, model, probe=probe, seeds=seeds, split=split, val=val, dataset=dataset, pool=pool, out=out,
            device=device, test_size=test_size, train_domain=train_domain, test_domain=test_domain, quiet=quiet,
            show=True)
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def robustness(
    store: str = typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr"),
    model: str = typer.Option(..., "--model", "-m", help="backbone name(s) as given to embedcache extract, comma separated"),
    perturb: str = typer.Option("blur-pre,blur-post", help="perturbation families extracted with embedcache extract --perturb"),
    probe: str = typer.Option("logistic", help="probe (or comma list): logistic, knn, knn1, svm, svm-rbf, mlp, cosine"),
    seeds: str = typer.Option("1", help="a count N (seeds 42..42+N-1) or a comma list of seeds"),
    split: str = typer.Option("auto", help="auto (the split column when it has test cells, else stratified), column, stratified"),
    dataset: Optional[str] = typer.Option(None, help="dataset in the store (default: the only one)"),
    pool: str = typer.Option("cls", help="cls or mean"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (default: robustness-<models>-<date>)"),
    device: str = typer.Option("auto", help="device for the probes: auto, cpu, cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train on clean features; macro-F1, Δ and drop slope on every perturbed version of the test cells."""
    from probes.robustness import robustness as run

    try:
        run(store, model, perturb=perturb, probe=probe, seeds=seeds, split=split, dataset=dataset, pool=pool,
            out=out, device=device, quiet=quiet, show=True)
    except Exception as e:  # noqa: BLE001
        _fail(e)


from cli.probes_audit_cmds import audit_cmd, neighbors_cmd, relabel_cmd  # noqa: E402

app.command("audit")(audit_cmd)
app.command("neighbors")(neighbors_cmd)
app.command("relabel")(relabel_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
