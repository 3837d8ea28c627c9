"""The memory budget of a study's features: when they are read out of core (:class:`MemoryPolicy`).

A study reads its features into memory (:meth:`probes.features.cells.Cells.features`) unless they exceed
the budget (``max_memory`` bytes, default :data:`MEMORY_FRACTION` of the physical RAM; ``mode="always"``
forces, ``"never"`` forbids the out-of-core path, :mod:`probes.features.chunked`). The CLI's
``--out-of-core`` / ``--max-memory`` set it for one study (:func:`memory_policy`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from probes.errors import ProbeError

MEMORY_FRACTION = 0.5  # of the physical RAM: the default budget for one study's feature matrix
MODES = ("auto", "always", "never")
CACHE_FRACTION = 0.5  # of the budget: standardised blocks a streamed fit keeps between its passes
BLOCK_COPIES = 8  # room a block leaves for its working copies (standardised, transposed, scores)
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 1024, 1 << 20
OUT_OF_CORE_PROBES = ("knn", "knn1", "logistic", "linear")


# -- the memory budget ------------------------------------------------------------------------------
def physical_memory() -> int:
    """Bytes of physical RAM (``sysconf``)."""
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(value: str | int | float | None) -> int | None:
    """``"8GB"``, ``"512MiB"``, ``"2e9"`` or an int -> bytes; ``None`` / ``""`` -> None (the default)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(value).lower())
        if m is None:
            raise ProbeError(f"--max-memory '{value}' is not a size; write e.g. 8GB, 512MiB or a byte count")
        n = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if n <= 0:
        raise ProbeError(f"--max-memory must be positive, got {value}")
    return int(n)


@dataclass(frozen=True)
class MemoryPolicy:
    """When a study's features are read out of core: ``mode`` ``auto`` (above ``max_memory`` bytes;
    None: :data:`MEMORY_FRACTION` of the RAM), ``always`` or ``never``; ``block_rows`` (None: from the
    budget) the rows read at a time."""

    mode: str = "auto"
    max_memory: int | None = None
    block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ProbeError(f"out-of-core mode '{self.mode}'; one of {', '.join(MODES)}")
        if self.block_rows is not None and self.block_rows < 1:
            raise ProbeError(f"block_rows must be at least 1, got {self.block_rows}")

    @property
    def budget(self) -> int:
        """The memory budget in bytes."""
        return self.max_memory if self.max_memory is not None else int(MEMORY_FRACTION * physical_memory())

    def out_of_core(self, nbytes: int) -> bool:
        """Read ``nbytes`` of float32 features out of core?"""
        return self.mode == "always" or (self.mode == "auto" and nbytes > self.budget)

    def rows_per_block(self, width: int) -> int:
        """Rows per block for features of ``width`` columns."""
        if self.block_rows is not None:
            return int(self.block_rows)
        rows = self.budget // max(1, BLOCK_COPIES * 4 * width)
        return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, rows)))


_POLICY: contextvars.ContextVar[MemoryPolicy | None] = contextvars.ContextVar("probes_memory_policy", default=None)


def current_policy() -> MemoryPolicy:
    """The policy studies follow now (:func:`memory_policy` sets it; default: ``auto`` at the default budget)."""
    return _POLICY.get() or MemoryPolicy()


@contextlib.contextmanager
def memory_policy(
    mode: str = "auto", max_memory: str | int | None = None, block_rows: int | None = None
) -> Iterator[MemoryPolicy]:
    """Run the block with this out-of-core policy (``max_memory``: bytes or ``"8GB"``)."""
    policy = MemoryPolicy(mode, parse_memory(max_memory), block_rows)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
