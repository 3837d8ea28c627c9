"""The one progress display of the project: a rich bar on a terminal, plain lines in a log.

When the stream (stderr by default) is not a terminal, a rich bar would be cut to 80 columns and
lose its numbers, so :class:`Progress` writes whole lines instead, e.g.
``extract timm:test_vit: 512/1000 cells, 49 cells/s, 0:10 elapsed, 0:10 left``, each time another
tenth of the work is done or ``interval`` seconds have passed, and once at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Progress", "progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    s = int(max(seconds, 0.0) + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress over ``total`` units; use as a context manager or call :meth:`close`.

    ``advance(n, description)`` counts ``n`` more units and may change the description.
    ``enabled=False`` shows nothing. ``force_plain=True`` writes plain lines even on a terminal.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "cells",
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float = 5.0,
        steps: int = 10,
        transient: bool = False,
        force_plain: bool = False,
    ) -> None:
        self.total, self.description, self.unit = int(total), description, unit
        self.enabled, self.interval, self.steps = enabled, float(interval), max(int(steps), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self._last_line_t = self.t0
        self._last_step = 0
        self._closed = False
        self._rich: Any = None
        if not enabled:
            return
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if is_tty and not force_plain:
            self._start_rich(transient)

    # -- rich -----------------------------------------------------------------------------------
    def _start_rich(self, transient: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=transient,
        )
        self._rich.start()
        self._task = self._rich.add_task(self.description, total=self.total, rate="")

    # -- counting -------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        """Count ``n`` more units done."""
        self.done += int(n)
        if description is not None:
            self.description = description
        if not self.enabled or self._closed:
            return
        if self._rich is not None:
            fields: dict[str, Any] = {"rate": f"{self.rate:,.0f} {self.unit}/s"}
            if description is not None:
                fields["description"] = description
            self._rich.update(self._task, advance=n, **fields)
            return
        now = time.perf_counter()
        step = self.done * self.steps // self.total if self.total > 0 else 0
        if step > self._last_step or now - self._last_line_t >= self.interval:
            self._last_step = max(step, self._last_step)
            self._write_line(now)

    def line(self, now: float | None = None) -> str:
        """The plain progress line for the count so far."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t0
        rate = self.done / max(elapsed, 1e-9)
        text = (
            f"{self.description}: {self.done}/{self.total} {self.unit}, {rate:,.0f} {self.unit}/s, "
            f"{format_seconds(elapsed)} elapsed"
        )
        if 0 < self.done < self.total and rate > 0:
            text += f", {format_seconds((self.total - self.done) / rate)} left"
        return text

    def _write_line(self, now: float) -> None:
        self._last_line_t = now
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar (rich) or write the final line (plain)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        elif self._last_step < self.steps or self.done != self.total:
            self._write_line(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, description: str, *, unit: str = "cells", enabled: bool = True, **kw: Any) -> Progress:
    """A :class:`Progress` (see there); ``enabled=False`` shows nothing."""
    return Progress(total, description, unit=unit, enabled=enabled, **kw)
