"""Checksums of written row-chunks: CRC-32 of their values, recorded before their ``done`` flags.

Every row-chunk a writer finishes gets a CRC-32 of its values, one per pool (``crc_<pool>``) and one of
its ``ok`` and ``error`` rows (``crc_rows``), each its own stored object, written before the chunk's
``done`` flags. Reading a done chunk recomputes the CRC of what the store returned: a deleted chunk (which
Zarr would serve as zeros), a truncated, zeroed or altered one is an error that names it, never data.

CRC-32 from the standard library's ``zlib`` runs at ~1.5 GB/s here (2-core AMD EPYC, AVX2):
~0.25 s for 185,000 x 1024 float16 features, small beside decoding them.
"""

from __future__ import annotations

import zlib

import numpy as np

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


def crc_problem(stored: int, actual: int) -> str:
    if stored == MISSING_CRC:
        return "no checksum recorded for a chunk marked done"
    if stored != actual:
        return f"checksum mismatch (recorded {stored:08x}, read {actual:08x}): altered, truncated or deleted"
    return ""
