"""What every CLI command shares: :func:`fail` (one clear error line) and the Typer options the
probes commands repeat, declared once (``STORE``, ``MODEL``...). Each option's parameter name is
the Python API's (``probes.scale(store, model, probes=..., seeds=...)``)."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table as _RichTable

PROBE_NAMES = "logistic, knn, knn1, svm, svm-rbf, mlp, cosine"


LOG_WIDTH = 1000  # off a terminal: wide enough that no table of ours is ever squeezed


def make_console(stderr: bool = False) -> Console:
    """The console of both CLIs: the terminal's width on a terminal; off one (a pipe, a log, a test runner)
    :data:`LOG_WIDTH` columns, so tables keep every number instead of being cut to 80 columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=max(LOG_WIDTH, console.width))
    return console


class Table(_RichTable):
    """A rich table whose columns fold long cells onto more lines instead of cutting them with an ellipsis."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)


def fail(e: Exception) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit 1 (``PROBES_DEBUG=1``: raise, with the traceback)."""
    if os.environ.get("PROBES_DEBUG"):
        raise e
    from rich.text import Text

    make_console(stderr=True).print(Text.assemble(("error:", "bold red"), f" {e}"), soft_wrap=True)
    raise typer.Exit(code=1)


def STORE() -> typer.models.OptionInfo:  # noqa: N802 - a declaration, read like a constant
    return typer.Option(..., "--store", "-s", help="store path or fsspec URL, e.g. cache.zarr")


def MODEL(help: str = "backbone name(s) as given to embedcache extract, comma separated") -> typer.models.OptionInfo:  # noqa: N802, A002
    return typer.Option(..., "--model", "-m", help=help)


def PROBES(default: str = "logistic") -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(default, "--probes", "--probe", help=f"probe or comma list of probes: {PROBE_NAMES}")


def SEEDS(default: str) -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(default, help="a count N (seeds 42..42+N-1) or a comma list of seeds")


def DATASET() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(None, help="dataset in the store (default: the only one)")


def POOL() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        None,
        help="cls or mean for every backbone, or per backbone: timm:test_resnet=mean,cls "
        "(default: each backbone's own, the first pooling it was extracted with)",
    )


def OUT(help: str) -> typer.models.OptionInfo:  # noqa: N802, A002
    return typer.Option(None, "--out", "-o", help=help)


def DEVICE(help: str = "device for the probes: auto, cpu, cuda") -> typer.models.OptionInfo:  # noqa: N802, A002
    return typer.Option("auto", help=help)


def QUIET() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(False, "--quiet", "-q", help="no progress bar (the summary is still printed)")


def K(default: int, help: str) -> typer.models.OptionInfo:  # noqa: N802, A002
    return typer.Option(default, "-k", "--k", help=help)


def TEST_SIZE() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(0.2, help="test fraction (the protocol: 0.2)")


def SPLIT(default: str, help: str) -> typer.models.OptionInfo:  # noqa: N802, A002
    return typer.Option(default, help=help)


def VAL() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        "train", help="with --split column: 'train' counts val cells as training cells, 'exclude' leaves them out"
    )


def TRAIN_DOMAIN() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        None, help="train (and in-domain test) on these domain(s) of the store's domain column, comma separated"
    )


def TEST_DOMAIN() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        None, help="score on every cell of these unseen domain(s) (default with --train-domain: all others)"
    )


def SCHEDULER() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        None,
        help="run each fit as a Dask task: tcp://HOST:PORT (a running dask scheduler; its workers need the "
        "store at the same URL) or local:N (N worker processes here); the tables are a local run's",
    )


def OUT_OF_CORE() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(
        "auto",
        help="read the features from the store in row blocks (knn, logistic fit them there): auto (when "
        "they exceed --max-memory), always, never",
    )


def MAX_MEMORY() -> typer.models.OptionInfo:  # noqa: N802
    return typer.Option(None, help="memory budget for a study's features, e.g. 8GB or 512MiB (default: half the RAM)")
