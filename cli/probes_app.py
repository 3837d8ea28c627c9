"""``probes``: each command is a thin call of the same-named function of :mod:`probes` with the same parameter
names (``probes eval`` calls :func:`probes.evaluate`). The options every study shares
(:class:`~probes.engine.options.StudyOptions`), the fine-tunes' (:class:`~probes.tuning.options.TuneOptions`),
the audit's and the neighbour search's are generated from their options objects (:mod:`.options`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from embedcache_cli.common import Dataset, Model, OneModel, Probes, Seeds, Store, make_console, run
from embedcache_cli.options import with_options
from probes.engine.options import DOMAIN_OPTIONS, StudyOptions
from probes.search.options import SearchOptions
from probes.studies.audit.options import AuditOptions
from probes.tuning.options import TuneOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Probe studies on an embedcache feature store.")

NO_DOMAINS = {"hide": DOMAIN_OPTIONS}
NO_SPLITS = {"hide": ("split", "val", "test_size", *DOMAIN_OPTIONS)}
ValFraction = Annotated[
    float,
    typer.Option(
        help="share of the training cells held out as the validation part (the probes are fitted on the rest; "
        "choices are made on it, never on test)"
    ),
]


def _api():
    import probes  # deferred: the studies import the heads when they run, not when the CLI starts

    return probes


@app.command()
@with_options()
def scale(
    store: Store,
    model: Model,
    limits: Annotated[str, typer.Option(help="cells per class: 256..16384 (powers of two) or a comma list")] = (
        "256..16384"
    ),
    probes: Probes = "logistic",
    seeds: Seeds = "5",
    fraction: Annotated[float, typer.Option(help="summary: the smallest limit reaching this fraction of the best")] = (
        0.95
    ),
    options: Optional[StudyOptions] = None,
    tune: Optional[TuneOptions] = None,
) -> None:
    """Macro-F1 against cells per class (FlagLimit), per backbone x probe, over seeds."""
    run(_api().scale, store, model, limits=limits, probes=probes, seeds=seeds, fraction=fraction, **_shown(options),
        tune=tune)  # fmt: skip


@app.command("eval")
@with_options()
def evaluate(
    store: Store,
    model: Model,
    probes: Probes = "logistic",
    seeds: Seeds = "1",
    save_adapter: Annotated[
        Optional[str],
        typer.Option(
            help="write the fitted fine-tune's adapter (safetensors + provenance) to DIR, for embedcache extract "
            "--adapter DIR"
        ),
    ] = None,
    options: Optional[StudyOptions] = None,
    tune: Optional[TuneOptions] = None,
) -> None:
    """One fit on the full training split: all metrics, per-class F1, confusion matrix."""
    run(_api().evaluate, store, model, probes=probes, seeds=seeds, save_adapter=save_adapter, **_shown(options),
        tune=tune)  # fmt: skip


@app.command()
@with_options(hide=("val", *DOMAIN_OPTIONS))
def robustness(
    store: Store,
    model: Model,
    perturb: Annotated[
        str, typer.Option(help="perturbation families extracted with embedcache extract --perturb")
    ] = "blur-pre,blur-post",
    probes: Probes = "logistic",
    seeds: Seeds = "1",
    options: Optional[StudyOptions] = None,
) -> None:
    """Train on clean features; macro-F1, Δ and drop slope on every perturbed version of the test cells."""
    run(_api().robustness, store, model, perturb=perturb, probes=probes, seeds=seeds, **_shown(options))


@app.command()
@with_options(**NO_DOMAINS)
def ensemble(
    store: Store,
    model: Model,
    heads: Annotated[str, typer.Option(help="three or more heads (probes), comma separated")] = "mlp,logistic,cosine",
    primary: Annotated[
        Optional[str], typer.Option(help="the primary head of the override rule (default: the first)")
    ] = None,
    pairs: Annotated[
        str,
        typer.Option(
            help="confusion pairs 'A:B,C:D' (unordered), or auto: the primary head's top confusions on the "
            "validation part"
        ),
    ] = "auto",
    n_pairs: Annotated[int, typer.Option(help="with --pairs auto: how many pairs")] = 4,
    seeds: Seeds = "5",
    val_fraction: ValFraction = 0.2,
    options: Optional[StudyOptions] = None,
) -> None:
    """Per-class F1 of every head (best marked) and the override / majority / mean ensembles."""
    run(_api().ensemble, store, model, heads=heads, primary=primary, pairs=pairs, n_pairs=n_pairs, seeds=seeds,
        val_fraction=val_fraction, **_shown(options))  # fmt: skip


@app.command()
@with_options(**NO_DOMAINS)
def calibrate(
    store: Store,
    model: Model,
    probes: Probes = "logistic",
    seeds: Seeds = "1",
    n_bins: Annotated[int, typer.Option(help="confidence bins of ECE / MCE and the reliability diagram")] = 15,
    val_fraction: ValFraction = 0.2,
    options: Optional[StudyOptions] = None,
) -> None:
    """ECE, MCE, Brier, NLL before / after temperature scaling (fitted on validation); reliability diagrams."""
    run(_api().calibrate, store, model, probes=probes, seeds=seeds, n_bins=n_bins, val_fraction=val_fraction,
        **_shown(options))  # fmt: skip


@app.command()
@with_options(**NO_DOMAINS)
def selective(
    store: Store,
    model: Model,
    probes: Probes = "logistic",
    confidence: Annotated[
        str, typer.Option(help="confidences, comma separated: msp, margin, entropy, agreement")
    ] = "msp,margin,entropy",
    target_accuracy: Annotated[
        float, typer.Option(help="the threshold (chosen on validation) keeps cells up to this accuracy; in (0, 1]")
    ] = 0.995,
    agree_with: Annotated[
        str,
        typer.Option(
            help="agreement between: heads (--heads on one backbone) or backbones (the probe on every --model)"
        ),
    ] = "heads",
    heads: Annotated[str, typer.Option(help="the heads voting for --confidence agreement")] = "logistic,mlp,cosine",
    coverages: Annotated[
        str, typer.Option(help="coverages at which accuracy and F1 are reported")
    ] = "1,0.9,0.8,0.67,0.5",
    seeds: Seeds = "1",
    val_fraction: ValFraction = 0.2,
    options: Optional[StudyOptions] = None,
) -> None:
    """Risk-coverage, AURC, scores at coverages, the threshold for a target accuracy, per-class abstention."""
    run(_api().selective, store, model, probes=probes, confidence=confidence, target_accuracy=target_accuracy,
        agree_with=agree_with, heads=heads, coverages=coverages, seeds=seeds, val_fraction=val_fraction,
        **_shown(options))  # fmt: skip


@app.command()
@with_options()
def finetune(
    store: Store,
    model: Model,
    method: Annotated[
        str,
        typer.Option(
            help="lora, ft-last, lp, or scratch-vit (the small-patch paper's ViT from scratch at the working size)"
        ),
    ] = "lora",
    blocks: Annotated[
        str, typer.Option(help="train the last K blocks, or all (LoRA on every block's attention)")
    ] = "all",
    augment: Annotated[Optional[str], typer.Option(help="training augmentations: flip,rot90,color,blur")] = None,
    limit: Annotated[
        Optional[int], typer.Option(help="cap each class at this many cells (FlagLimit); default: all")
    ] = None,
    seeds: Seeds = "1",
    save_adapter: Annotated[
        Optional[str], typer.Option(help="write the adapter (safetensors + provenance) to DIR")
    ] = None,
    options: Optional[StudyOptions] = None,
    tune: Optional[TuneOptions] = None,
) -> None:
    """Fine-tune from the images in the store (LoRA on all blocks, FT_last, scratch-vit), augmentations optional."""
    run(_api().finetune, store, model, method=method, blocks=blocks, augment=augment, limit=limit, seeds=seeds,
        save_adapter=save_adapter, **_shown(options), tune=tune)  # fmt: skip


@app.command()
@with_options(**NO_SPLITS)
def audit(
    store: Store,
    model: Model,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="neither read nor write out-of-fold predictions")
    ] = False,
    options: Optional[StudyOptions] = None,
    audit_options: Optional[AuditOptions] = None,
) -> None:
    """Rank cells by how likely their label is wrong: confident learning on calibrated models, neighbours."""
    assert audit_options is not None
    if no_cache:
        if audit_options.cache:
            from embedcache_cli.common import fail

            fail(ValueError("--cache and --no-cache exclude each other"))
        audit_options = audit_options.replace(cache=False)
    run(_api().audit, store, model, **_shown(options), audit_options=audit_options)


@app.command()
@with_options()
def neighbors(
    store: Store,
    model: OneModel,
    id: Annotated[  # noqa: A002  the Python API's name
        Optional[list[str]], typer.Option("--id", help="cell id to look up (repeatable)")
    ] = None,
    image: Annotated[
        Optional[list[str]], typer.Option("--image", help="new image file to embed and look up (repeatable)")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="neighbours per query")] = 12,
    dataset: Dataset = None,
    pool: Annotated[Optional[str], typer.Option(help="cls or mean (default: the backbone's own)")] = None,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="folder for neighbors.csv and neighbors.png")
    ] = None,
    device: Annotated[str, typer.Option(help="device to embed --image with: auto, cpu, cuda")] = "auto",
    options: Optional[SearchOptions] = None,
) -> None:
    """The k nearest cells (cosine) of stored cells or new images: a table and a contact sheet."""
    run(_api().neighbors, store, model, id=id or None, image=image or None, k=k, dataset=dataset, pool=pool, out=out,
        device=device, show=True, options=options)  # fmt: skip


@app.command("map")
def embedding_map(
    store: Store,
    model: OneModel,
    out: Annotated[str, typer.Option("--out", "-o", help="folder for map.html, map.png and map.csv")] = "map",
    dataset: Dataset = None,
    pool: Annotated[Optional[str], typer.Option(help="cls or mean (default: the backbone's own)")] = None,
    suspicion: Annotated[
        Optional[str], typer.Option(help="an audit's output folder (or its suspects.csv): colour by suspicion")
    ] = None,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity")] = 30.0,
    thumbnails: Annotated[int, typer.Option(help="cells whose image and neighbours the page keeps")] = 2000,
    k: Annotated[int, typer.Option("-k", "--k", help="nearest cells listed per kept cell")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the layout and the thumbnail sample")] = 0,
) -> None:
    """A 2-D map of a feature set (t-SNE), coloured by label / split / domain / audit suspicion: one offline HTML
    page (click a cell: its image and nearest cells) and a PNG."""
    from probes.studies.embedding_map import describe

    res = run(_api().embedding_map, store, model, out=out, dataset=dataset, pool=pool, suspicion=suspicion,
              perplexity=perplexity, thumbnails=thumbnails, k=k, seed=seed)  # fmt: skip
    make_console().print(describe(res))


@app.command()
def relabel(
    store: Store,
    corrections: Annotated[str, typer.Option("--corrections", "-c", help="CSV with columns id,new_label[,note]")],
    dataset: Dataset = None,
    source: Annotated[
        Optional[str], typer.Option(help="who or what made the corrections (default: the file path)")
    ] = None,
    allow_new_labels: Annotated[
        bool, typer.Option("--allow-new-labels", help="accept labels no cell carries yet")
    ] = False,
) -> None:
    """Apply reviewed label corrections; history is kept and original labels never change."""
    n = run(_api().relabel, store, corrections, dataset=dataset, source=source, allow_new_labels=allow_new_labels)
    make_console().print(
        f"{n} label(s) changed (history kept, original labels unchanged); "
        "every later study and audit reads the new labels"
    )


def _shown(options: StudyOptions | None) -> dict[str, StudyOptions]:
    """The study's options as the CLI runs it: the summary always printed (``--quiet`` hides the bar only) and
    the files always written (to ``--out``, else ``<study>-<models>-<date>``)."""
    return {"options": (options or StudyOptions()).replace(show=True, write=True)}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
