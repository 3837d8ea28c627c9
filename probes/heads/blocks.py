"""The standardised, transposed rows a linear fit runs on, in fixed blocks of rows: one code path for
features in memory and for features read from the store block by block
(:class:`probes.features.chunked.ChunkedRows`).

Both paths cut the same positions into the same blocks of rows (:func:`block_rows`), compute the
column moments with the same float64 sums block by block, standardise each block the same way and
evaluate the objective block by block in the same order (:func:`probes.heads.lbfgs.fit_linear` on a
:class:`StandardizedBlocks`). Float32 arithmetic is then done on the same numbers in the same order,
so a fit on rows that were read out of core gives the in-memory fit's coefficients bit for bit, not
only to round-off. The block size depends on the feature width alone, whatever the memory budget (the
budget decides how many blocks are kept in memory between passes, never how the sums are cut): at most
128 MB of float32 per block, large enough for BLAS to run near full speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

BLOCK_BYTES = 128 * 2**20  # float32 bytes per block of every linear fit (in memory and out of core alike)
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8192, 65536


def block_rows(width: int) -> int:
    """Rows per block for features of ``width`` columns: the largest power of two whose float32 block stays
    within :data:`BLOCK_BYTES`, clipped to [8192, 65536] (1,024 columns: 32,768 rows). A function of the width
    alone, so both paths cut alike. Smaller blocks cost BLAS speed: on the 2-core AVX2 EPYC, blocks of 8,192
    rows made an in-memory 32,000 x 1,024 fit ~10% slower than one matrix, blocks of 32,768 ~5%."""
    rows = BLOCK_BYTES // (4 * max(1, int(width)))
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << max(0, int(rows).bit_length() - 1))))


def row_blocks(positions: np.ndarray, width: int) -> list[np.ndarray]:
    """``positions`` cut into consecutive blocks of :func:`block_rows` rows."""
    size = block_rows(width)
    positions = np.asarray(positions, dtype=np.int64)
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def read_rows(X: Any, positions: np.ndarray) -> np.ndarray:
    """Float32 rows of ``X`` at ``positions``: an in-memory array, or :class:`probes.features.chunked.ChunkedRows`
    (read from the store)."""
    if hasattr(X, "read"):
        return X.read(positions)
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1 and (np.diff(positions) == 1).all():
        return np.ascontiguousarray(X[positions[0] : positions[-1] + 1])  # a run of rows: a view, no copy
    return np.ascontiguousarray(X[positions])


def column_moments(X: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, scale)`` (float32, on ``device``) of the columns of all rows of ``X``: two passes over
    its blocks, float64 sums; constant columns get scale 1."""
    n, d = X.shape
    cpu = device.type == "cpu"  # numpy's column reductions are several times faster than torch's on the CPU
    total = torch.zeros(d, dtype=torch.float64, device=device)
    parts = row_blocks(np.arange(n), d)
    for pos in parts:
        x = read_rows(X, pos)
        total += (
            torch.from_numpy(x.sum(axis=0, dtype=np.float64)).to(device)
            if cpu
            else _on(x, device).sum(0, dtype=torch.float64)
        )
    mean = (total / n).float()
    sq = torch.zeros(d, dtype=torch.float64, device=device)
    m32 = mean.cpu().numpy()
    for pos in parts:
        x = read_rows(X, pos)
        if cpu:
            c = x - m32
            sq += torch.from_numpy(np.einsum("ij,ij->j", c, c, dtype=np.float64))
        else:
            c = _on(x, device).sub_(mean)
            sq += c.double().square().sum(0)
    scale = (sq / n).float().sqrt()
    scale = torch.where(scale > 1e-12 * mean.abs().clamp_min(1.0), scale, torch.ones_like(scale))
    return mean, scale


def _on(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def standardized_t(x: np.ndarray, mean: torch.Tensor, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``((x - mean) / scale)^T`` (d, n), contiguous float32 on ``device``: the layout the linear solvers
    are fast in (:mod:`probes.heads.lbfgs`)."""
    xt = _on(x, device)
    XT = torch.empty(xt.shape[1], xt.shape[0], dtype=torch.float32, device=device)
    XT.copy_(xt.T)
    return XT.sub_(mean[:, None]).div_(scale[:, None])


class RowBlocks:
    """The standardised blocks of chosen rows of ``X``: ``parts`` (position arrays, one per block), their
    class ``codes`` (one per row of ``X``), ``mean`` and ``scale``. A block is standardised when first
    asked for and kept while the kept blocks fit in ``keep_bytes`` (None: all of them, for rows in
    memory); the others are read again on every pass (out of core). Views over some of the blocks are
    :class:`StandardizedBlocks`."""

    def __init__(
        self,
        X: Any,
        codes: np.ndarray,
        parts: list[np.ndarray],
        mean: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        keep_bytes: float | None = None,
    ):
        if len(codes) != len(X):
            raise ValueError(f"{len(codes)} class codes for {len(X)} rows")
        self.X, self.codes, self.parts = X, codes, parts
        self.mean, self.scale, self.device = mean, scale, device
        self.width = int(X.shape[1])
        self.keep = float("inf") if keep_bytes is None else float(keep_bytes)
        self.held = 0
        self._f32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._low: dict[int, torch.Tensor] = {}

    def _kept(self, t: torch.Tensor) -> bool:
        size = t.numel() * t.element_size()
        if self.held + size > self.keep:
            return False
        self.held += size
        return True

    def get(self, i: int, low: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``: ``(XT_i (d, n_i) float32, or bfloat16 with low, codes_i (n_i,))``."""
        hit = self._f32.get(i)
        if hit is None:
            pos = self.parts[i]
            XT = standardized_t(read_rows(self.X, pos), self.mean, self.scale, self.device)
            codes = torch.from_numpy(self.codes[pos]).to(self.device)
            if self._kept(XT):
                self._f32[i] = (XT, codes)
        else:
            XT, codes = hit
        if not low:
            return XT, codes
        XT_low = self._low.get(i)
        if XT_low is None:
            XT_low = XT.bfloat16()
            if i in self._f32 and self._kept(XT_low):
                self._low[i] = XT_low
        return XT_low, codes

    def view(self, indices: range | list[int], low: bool = False) -> StandardizedBlocks:
        """The blocks at ``indices``, in that order, as one transposed matrix."""
        return StandardizedBlocks(self, list(indices), low)

    def release(self) -> None:
        """Drop the kept blocks."""
        self._f32.clear()
        self._low.clear()
        self.held = 0


class StandardizedBlocks:
    """Some blocks of a :class:`RowBlocks` as the standardised, transposed matrix ``X^T`` (d, n) that
    :func:`probes.heads.lbfgs.fit_linear` takes in place of a tensor (its ``ColumnBlocks``)."""

    def __init__(self, source: RowBlocks, indices: list[int], low: bool = False):
        self.source, self.indices, self.low = source, indices, low
        self.shape = (source.width, sum(len(source.parts[i]) for i in indices))
        self.device = source.device
        self.dtype = torch.bfloat16 if low else torch.float32

    def blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(XT_i (d, n_i), codes_i (n_i,))`` for every block, in order."""
        for i in self.indices:
            yield self.source.get(i, self.low)

    def lowered(self) -> StandardizedBlocks:
        """The same blocks in bfloat16."""
        return StandardizedBlocks(self.source, self.indices, True)

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(XT (d, n), codes (n,))`` in one piece (for solvers that take whole matrices)."""
        parts = list(self.blocks())
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
