"""What every CLI command shares: :func:`fail` / :func:`run` (one clear error line), the console, and the
Typer options the probes commands repeat, as ``Annotated`` aliases (``Store``, ``Model``...). Each option's
parameter name is the Python API's (``probes.scale(store, model, probes=..., seeds=...)``); the options of a
job are generated from its options object (:mod:`embedcache_cli.options`)."""

from __future__ import annotations

import os
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table as _RichTable

from probes.heads.registry import PROBES

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


def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the library function ``fn``; any error becomes one clear line (:func:`fail`)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  every library error reaches the user as one clear line
        fail(e)


# the options every probes command spells the same way (the Python API's names)
Store = Annotated[str, typer.Option("--store", "-s", help="store path or fsspec URL, e.g. cache.zarr")]
Model = Annotated[
    str, typer.Option("--model", "-m", help="backbone name(s) as given to embedcache extract, comma separated")
]
OneModel = Annotated[str, typer.Option("--model", "-m", help="one backbone name (or full feature key)")]
Probes = Annotated[
    str, typer.Option("--probes", "--probe", help=f"probe or comma list of probes: {PROBES.help_text()}")
]
Seeds = Annotated[str, typer.Option(help="a count N (seeds 42..42+N-1) or a comma list of seeds")]
Dataset = Annotated[Optional[str], typer.Option(help="dataset in the store (default: the only one)")]
