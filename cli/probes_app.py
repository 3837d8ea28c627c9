"""``probes``: each command is a thin call of the same-named function of :mod:`probes` with the same
parameter names (``probes eval`` calls :func:`probes.evaluate`); options are declared in :mod:`cli.common`."""

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
    SPLIT,
    STORE,
    TEST_DOMAIN,
    TEST_SIZE,
    TRAIN_DOMAIN,
    VAL,
    fail,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Probe studies on an embedcache feature store.")

_SPLIT_HELP = (
    "stratified (cap, then 80/20; the protocol), column (the store's split column: test vs train), "
    "group (no group on both sides)"
)


# -- fine-tune options (lp, ft-last, lora, scratch-vit beside the probes; probes finetune) -------------------
TUNE = (
    "tail_blocks",
    "head",
    "loss",
    "gamma",
    "hierarchy",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "val_fraction",
    "patience",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
)


def _tune(values: dict) -> dict:
    """The fine-tune keywords of a command's arguments (same names as the Python functions')."""
    return {k: values[k] for k in TUNE if k in values}


def TAIL_BLOCKS():  # noqa: N802
    return typer.Option(
        None,
        help="fine-tunes (ft-last, lora) train the last K blocks on the tokens cached by "
        "embedcache extract --tail-blocks K",
    )


def HEAD():  # noqa: N802
    return typer.Option("linear", help="fine-tune head: linear, linear-cls-mean, mlp, decoder")


def LOSS():  # noqa: N802
    return typer.Option("ce", help="fine-tune loss: ce, focal, weighted-ce, weighted-focal, hierarchical-focal")


def GAMMA():  # noqa: N802
    return typer.Option(None, help="focal loss gamma (default 2; the hierarchy file's for hierarchical-focal)")


def HIERARCHY():  # noqa: N802
    return typer.Option(None, help="YAML of lineages and penalties for --loss hierarchical-focal")


def EPOCHS(default: int = 50):  # noqa: N802
    return typer.Option(default, help="fine-tune epochs (best epoch kept by hold-out macro-F1)")


def BATCH_SIZE():  # noqa: N802
    return typer.Option(256, help="fine-tune minibatch size")


def LR():  # noqa: N802
    return typer.Option(None, help="learning rate (default: lp 5e-4, ft-last / lora 1e-4, scratch-vit 1e-3)")


def WEIGHT_DECAY():  # noqa: N802
    return typer.Option(None, help="weight decay (default: lp 0, ft-last / lora 0.01, scratch-vit 0.05)")


def VAL_FRACTION():  # noqa: N802
    return typer.Option(0.1, help="fine-tunes: stratified hold-out of the training cells choosing the best epoch")


def PATIENCE():  # noqa: N802
    return typer.Option(None, help="fine-tunes: stop after this many epochs without a better hold-out macro-F1")


def LORA_RANK():  # noqa: N802
    return typer.Option(8, help="LoRA rank")


def LORA_ALPHA():  # noqa: N802
    return typer.Option(16.0, help="LoRA alpha")


def LORA_DROPOUT():  # noqa: N802
    return typer.Option(0.0, help="LoRA dropout")


@app.command()
def scale(
    store: str = STORE(),
    model: str = MODEL(),
    limits: str = typer.Option("256..16384", help="cells per class: 256..16384 (powers of two) or a comma list"),
    probes: str = PROBES(),
    seeds: str = SEEDS("5"),
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: scale-<models>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    fraction: float = typer.Option(0.95, help="summary: the smallest limit reaching this fraction of the best"),
    train_domain: Optional[str] = TRAIN_DOMAIN(),
    test_domain: Optional[str] = TEST_DOMAIN(),
    tail_blocks: Optional[int] = TAIL_BLOCKS(),
    head: str = HEAD(),
    loss: str = LOSS(),
    gamma: Optional[float] = GAMMA(),
    hierarchy: Optional[str] = HIERARCHY(),
    epochs: int = EPOCHS(),
    batch_size: int = BATCH_SIZE(),
    lr: Optional[float] = LR(),
    weight_decay: Optional[float] = WEIGHT_DECAY(),
    val_fraction: float = VAL_FRACTION(),
    patience: Optional[int] = PATIENCE(),
    lora_rank: int = LORA_RANK(),
    lora_alpha: float = LORA_ALPHA(),
    lora_dropout: float = LORA_DROPOUT(),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """Macro-F1 against cells per class (FlagLimit), per backbone x probe, over seeds."""
    import probes as api

    try:
        api.scale(
            store,
            model,
            limits=limits,
            probes=probes,
            seeds=seeds,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            fraction=fraction,
            train_domain=train_domain,
            test_domain=test_domain,
            quiet=quiet,
            show=True,
            **_tune(locals()),
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        fail(e)


@app.command("eval")
def evaluate(
    store: str = STORE(),
    model: str = MODEL(),
    probes: str = PROBES(),
    seeds: str = SEEDS("1"),
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: eval-<models>-<probe>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    train_domain: Optional[str] = TRAIN_DOMAIN(),
    test_domain: Optional[str] = TEST_DOMAIN(),
    tail_blocks: Optional[int] = TAIL_BLOCKS(),
    head: str = HEAD(),
    loss: str = LOSS(),
    gamma: Optional[float] = GAMMA(),
    hierarchy: Optional[str] = HIERARCHY(),
    epochs: int = EPOCHS(),
    batch_size: int = BATCH_SIZE(),
    lr: Optional[float] = LR(),
    weight_decay: Optional[float] = WEIGHT_DECAY(),
    val_fraction: float = VAL_FRACTION(),
    patience: Optional[int] = PATIENCE(),
    lora_rank: int = LORA_RANK(),
    lora_alpha: float = LORA_ALPHA(),
    lora_dropout: float = LORA_DROPOUT(),
    save_adapter: Optional[str] = typer.Option(
        None,
        help="write the fitted fine-tune's adapter (safetensors + "
        "provenance) to DIR, for embedcache extract --adapter DIR",
    ),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """One fit on the full training split: all metrics, per-class F1, confusion matrix."""
    import probes as api

    try:
        api.evaluate(
            store,
            model,
            probes=probes,
            seeds=seeds,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            train_domain=train_domain,
            test_domain=test_domain,
            quiet=quiet,
            show=True,
            save_adapter=save_adapter,
            **_tune(locals()),
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


@app.command()
def robustness(
    store: str = STORE(),
    model: str = MODEL(),
    perturb: str = typer.Option(
        "blur-pre,blur-post", help="perturbation families extracted with embedcache extract --perturb"
    ),
    probes: str = PROBES(),
    seeds: str = SEEDS("1"),
    split: str = SPLIT("auto", "auto (the split column when it has test cells, else stratified), column, stratified"),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: robustness-<models>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """Train on clean features; macro-F1, Δ and drop slope on every perturbed version of the test cells."""
    import probes as api

    try:
        api.robustness(
            store,
            model,
            perturb=perturb,
            probes=probes,
            seeds=seeds,
            split=split,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            quiet=quiet,
            show=True,
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


_VAL_FRACTION = typer.Option(
    0.2,
    help="share of the training cells held out as the validation part (the probes "
    "are fitted on the rest; choices are made on it, never on test)",
)


@app.command()
def ensemble(
    store: str = STORE(),
    model: str = MODEL(),
    heads: str = typer.Option("mlp,logistic,cosine", help="three or more heads (probes), comma separated"),
    primary: Optional[str] = typer.Option(None, help="the primary head of the override rule (default: the first)"),
    pairs: str = typer.Option(
        "auto",
        help="confusion pairs 'A:B,C:D' (unordered), or auto: the primary head's top confusions on the validation part",
    ),
    n_pairs: int = typer.Option(4, help="with --pairs auto: how many pairs"),
    seeds: str = SEEDS("5"),
    val_fraction: float = _VAL_FRACTION,
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: ensemble-<models>-<heads>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """Per-class F1 of every head (best marked) and the override / majority / mean ensembles."""
    import probes as api

    try:
        api.ensemble(
            store,
            model,
            heads=heads,
            primary=primary,
            pairs=pairs,
            n_pairs=n_pairs,
            seeds=seeds,
            val_fraction=val_fraction,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            quiet=quiet,
            show=True,
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


@app.command()
def calibrate(
    store: str = STORE(),
    model: str = MODEL(),
    probes: str = PROBES(),
    seeds: str = SEEDS("1"),
    n_bins: int = typer.Option(15, help="confidence bins of ECE / MCE and the reliability diagram"),
    val_fraction: float = _VAL_FRACTION,
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: calibrate-<models>-<probes>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """ECE, MCE, Brier, NLL before / after temperature scaling (fitted on validation); reliability diagrams."""
    import probes as api

    try:
        api.calibrate(
            store,
            model,
            probes=probes,
            seeds=seeds,
            n_bins=n_bins,
            val_fraction=val_fraction,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            quiet=quiet,
            show=True,
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


@app.command()
def selective(
    store: str = STORE(),
    model: str = MODEL(),
    probes: str = PROBES(),
    confidence: str = typer.Option(
        "msp,margin,entropy", help="confidences, comma separated: msp, margin, entropy, agreement"
    ),
    target_accuracy: float = typer.Option(
        0.995, help="the threshold (chosen on validation) keeps cells up to this accuracy; in (0, 1]"
    ),
    agree_with: str = typer.Option(
        "heads", help="agreement between: heads (--heads on one backbone) or backbones (the probe on every --model)"
    ),
    heads: str = typer.Option("logistic,mlp,cosine", help="the heads voting for --confidence agreement"),
    coverages: str = typer.Option("1,0.9,0.8,0.67,0.5", help="coverages at which accuracy and F1 are reported"),
    seeds: str = SEEDS("1"),
    val_fraction: float = _VAL_FRACTION,
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: selective-<models>-<probes>-<date>)"),
    device: str = DEVICE(),
    test_size: float = TEST_SIZE(),
    scheduler: Optional[str] = SCHEDULER(),
    out_of_core: str = OUT_OF_CORE(),
    max_memory: Optional[str] = MAX_MEMORY(),
    quiet: bool = QUIET(),
) -> None:
    """Risk-coverage, AURC, scores at coverages, the threshold for a target accuracy, per-class abstention."""
    import probes as api

    try:
        api.selective(
            store,
            model,
            probes=probes,
            confidence=confidence,
            target_accuracy=target_accuracy,
            agree_with=agree_with,
            heads=heads,
            coverages=coverages,
            seeds=seeds,
            val_fraction=val_fraction,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            quiet=quiet,
            show=True,
            scheduler=scheduler,
            out_of_core=out_of_core,
            max_memory=max_memory,
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


@app.command()
def finetune(
    store: str = STORE(),
    model: str = MODEL(),
    method: str = typer.Option(
        "lora", help="lora, ft-last, lp, or scratch-vit (the small-patch paper's ViT from scratch at the working size)"
    ),
    blocks: str = typer.Option("all", help="train the last K blocks, or all (LoRA on every block's attention)"),
    augment: Optional[str] = typer.Option(None, help="training augmentations: flip,rot90,color,blur"),
    head: str = HEAD(),
    loss: str = LOSS(),
    gamma: Optional[float] = GAMMA(),
    hierarchy: Optional[str] = HIERARCHY(),
    epochs: int = EPOCHS(),
    batch_size: int = BATCH_SIZE(),
    lr: Optional[float] = LR(),
    weight_decay: Optional[float] = WEIGHT_DECAY(),
    val_fraction: float = VAL_FRACTION(),
    patience: Optional[int] = PATIENCE(),
    lora_rank: int = LORA_RANK(),
    lora_alpha: float = LORA_ALPHA(),
    lora_dropout: float = LORA_DROPOUT(),
    limit: Optional[int] = typer.Option(None, help="cap each class at this many cells (FlagLimit); default: all"),
    seeds: str = SEEDS("1"),
    split: str = SPLIT("stratified", _SPLIT_HELP),
    val: str = VAL(),
    dataset: Optional[str] = DATASET(),
    pool: Optional[str] = POOL(),
    out: Optional[str] = OUT("output folder (default: finetune-<models>-<method>-<date>)"),
    device: str = DEVICE("device for the fine-tune: auto, cpu, cuda"),
    test_size: float = TEST_SIZE(),
    train_domain: Optional[str] = TRAIN_DOMAIN(),
    test_domain: Optional[str] = TEST_DOMAIN(),
    save_adapter: Optional[str] = typer.Option(None, help="write the adapter (safetensors + provenance) to DIR"),
    quiet: bool = QUIET(),
) -> None:
    """Fine-tune from the images in the store (LoRA on all blocks, FT_last, scratch-vit), augmentations optional."""
    import probes as api

    try:
        api.finetune(
            store,
            model,
            method=method,
            blocks=blocks,
            augment=augment,
            limit=limit,
            seeds=seeds,
            split=split,
            val=val,
            dataset=dataset,
            pool=pool,
            out=out,
            device=device,
            test_size=test_size,
            train_domain=train_domain,
            test_domain=test_domain,
            save_adapter=save_adapter,
            quiet=quiet,
            show=True,
            **_tune(locals()),
        )
    except Exception as e:  # noqa: BLE001
        fail(e)


from cli.probes_audit_cmds import audit, neighbors, relabel  # noqa: E402

app.command("audit")(audit)
app.command("neighbors")(neighbors)
app.command("relabel")(relabel)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
