"""Checksums of written row-chunks, and the verification of a whole store.

Every row-chunk a writer finishes gets a CRC-32 of its values, one per pool (``crc_<pool>``) and
one of its ``ok`` and ``error`` rows (``crc_rows``), each its own stored object, written before
the chunk's ``done`` flags. Reading a done chunk recomputes the CRC of what the store returned:
a deleted chunk (which Zarr would serve as zeros), a truncated, zeroed or altered one is an
error that names it, never data. ``verify`` checks every done chunk of a store; with
``repair=True`` it clears the ``done`` flags of the damaged ones, so that the same extract (or
import) command recomputes exactly those chunks.

CRC-32 from the standard library's ``zlib`` runs at ~1.5 GB/s here (2-core AMD EPYC, AVX2):
~0.25 s for 185,000 x 1024 float16 features, small beside decoding them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embedcache.store.store import FeatureSet

MISSING_CRC = -1  # fill value of the checksum arrays: no checksum was recorded for that chunk


def crc_values(values: np.ndarray) -> int:
    """CRC-32 of an array's values (its bytes in C order; strings as UTF-8 joined by NUL)."""
    a = np.asarray(values)
    if a.dtype.kind in "OUS":
        return zlib.crc32("\x00".join(a.astype(str).tolist()).encode())
    a = np.ascontiguousarray(a)
    return zlib.crc32(a.data.cast("B")) if a.size else zlib.crc32(b"")  # a.data: memoryview of a


def crc_rows(ok: np.ndarray, error: np.ndarray) -> int:
    """CRC-32 of one chunk's ``ok`` flags and ``error`` texts together."""
    return zlib.crc32(str(crc_values(np.asarray(ok, dtype=bool))).encode() + b":" + str(crc_values(error)).encode())


@dataclass
class Damage:
    """One damaged row-chunk of one array of a feature set."""

    dataset: str
    key: str
    array: str  # a pool name, or "rows" for ok/error
    chunk: int
    rows: tuple[int, int]
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.dataset}/{self.key}/{self.array} chunk {self.chunk} (rows {self.rows[0]}-{self.rows[1] - 1}): "
            f"{self.reason}"
        )


@dataclass
class VerifyReport:
    """What :func:`verify` found (and repaired)."""

    store: str
    chunks_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # feature sets written without checksums
    incomplete_groups: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "chunks_checked": self.chunks_checked,
            "damaged": [d.__dict__ | {"rows": list(d.rows)} for d in self.damaged],
            "unverifiable": self.unverifiable,
            "incomplete_groups": self.incomplete_groups,
            "repaired": self.repaired,
        }


def check_chunk(fs: FeatureSet, c: int, arrays: list[str] | None = None) -> list[Damage]:
    """Damage found in done row-chunk ``c`` of ``fs`` (each pool, then ok/error rows)."""
    found = []
    rows = fs.chunk_rows(c)
    span = (rows.start, rows.stop)
    for name in arrays or [*fs.pools, *fs.token_sets, "rows"]:
        try:
            reason = fs.chunk_problem(c, name)
        except Exception as e:  # noqa: BLE001  an undecodable chunk is damage, reported with its cause
            reason = f"cannot be decoded ({type(e).__name__}: {e})"
        if reason:
            found.append(Damage(fs.dataset.name, fs.key, name, c, span, reason))
    return found


def verify(store_url: str, *, repair: bool = False) -> VerifyReport:
    """Check every done row-chunk of every feature set in the store; ``repair`` clears the done
    flags of damaged chunks so that rerunning the same extract / import recomputes them."""
    from embedcache.store.store import open_store

    store = open_store(store_url, mode="a" if repair else "r")
    report = VerifyReport(store.url, incomplete_groups=store.incomplete_groups())
    for name in store.datasets():
        ds = store.dataset(name)
        for key in ds.feature_keys():
            fs = ds.feature_set(key)
            if not fs.has_checksums:
                report.unverifiable.append(f"{name}/{key}")
            damaged: list[Damage] = []
            for c in fs.done_chunks():
                report.chunks_checked += 1
                damaged += check_chunk(fs, c)
            report.damaged += damaged
            if repair and damaged:
                fs.clear_done(sorted({d.chunk for d in damaged}))
    report.repaired = repair and bool(report.damaged)
    return report
