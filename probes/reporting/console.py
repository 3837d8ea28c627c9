"""The one printer and the one progress bar of the probe studies.

A study describes what to print as :class:`Panel` objects (a title, columns, rows of text) and
hands them to :func:`print_report` with its notes and files; the progress of its fits goes
through :func:`progress` (:mod:`embedcache.progress`: a bar on a terminal, plain lines in a log).
Every cell is printed as plain text made one line (:func:`probes.reporting.text.one_line`), so an
id holding ``[`` or a newline cannot turn into markup or break a row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from probes.reporting.text import one_line


@dataclass
class Col:
    """A column of a :class:`Panel`."""

    name: str
    justify: Literal["default", "left", "center", "right", "full"] = "right"
    style: str | None = None
    no_wrap: bool = False


@dataclass
class Bold:
    """A cell printed in bold (the best value of a row, say)."""

    text: str


@dataclass
class Panel:
    """One printed table: ``rows`` of cell texts (or :class:`Bold`), then plain ``footer`` lines."""

    title: str
    columns: list[Col]
    rows: list[list[Any]] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)


def mean_std(mean: float, std: float, n_seeds: int, digits: int = 3) -> str:
    """A mean over seeds for a table: ``0.812±0.013`` with several seeds, ``0.812`` with one (a std of one
    value says nothing), ``-`` when the mean is undefined (NaN: e.g. the accuracy of no kept cell)."""
    if mean != mean:  # NaN
        return "-"
    text = f"{mean:.{digits}f}"
    return text + (f"±{std:.{digits}f}" if n_seeds > 1 and std == std else "")


def make_console(console: Any = None) -> Any:
    """A rich console on stdout; in logs and pipes 1000 columns wide (as the CLIs' ``cli.common.make_console``),
    so no table is squeezed and every number of every column is printed."""
    if console is not None:
        return console
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 1000))
    return console


def _cell(value: Any) -> Any:
    from rich.text import Text

    if isinstance(value, Bold):
        return Text(one_line(value.text), style="bold")
    return Text(one_line(value))


def render_panel(panel: Panel) -> Any:
    """The rich table of ``panel``."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(one_line(panel.title), style="italic"))
    for c in panel.columns:
        t.add_column(
            Text(one_line(c.name), style="bold"),
            justify=c.justify,
            style=c.style,
            no_wrap=c.no_wrap,
        )
    for row in panel.rows:
        t.add_row(*[_cell(v) for v in row])
    return t


def print_report(
    panels: Sequence[Panel],
    *,
    notes: Sequence[str] = (),
    lines: Sequence[str] = (),
    out: Path | None = None,
    files: dict[str, Any] | None = None,
    console: Any = None,
) -> None:
    """Print ``panels`` (each followed by its footer), plain ``lines``, ``notes`` and where the files went."""
    from rich.text import Text

    console = make_console(console)
    for p in panels:
        console.print(render_panel(p))
        for line in p.footer:
            console.print(Text(one_line(line)))
    for line in lines:
        console.print(Text(one_line(line)))
    for note in notes:
        console.print(Text.assemble(("note: ", "yellow"), one_line(note)))
    if out is not None:
        shown = ", ".join(sorted(files or {}))
        console.print(Text.assemble("wrote ", (f"{one_line(out)}/", "bold"), f" ({one_line(shown)})"))


@contextlib.contextmanager
def progress(total: int, quiet: bool, what: str = "fits") -> Iterator[Callable[[str], None]]:
    """The progress of ``total`` fits on stderr; yields ``advance(description)``, called as each fit starts."""
    if quiet:
        yield lambda desc: None
        return
    from embedcache.progress import Progress

    with Progress(total, "fitting", unit=what, transient=True) as bar:
        started = [False]

        def advance(desc: str) -> None:
            bar.advance(1 if started[0] else 0, one_line(desc))
            started[0] = True

        yield advance
        if bar.done < total:
            bar.advance(total - bar.done)
