"""What a fine-tune reads, minibatch by minibatch: cached tail tokens, pooled features or images.

A reader is anything with ``__len__`` and ``read(rows) -> np.ndarray`` (rows sorted ascending, int64;
one output row per row asked for, in that order) plus two optional attributes: ``kind`` (``"tokens"``,
default, for tail tokens (N, T, D) / (N, C, H, W) or pooled features (N, D); ``"images"`` for
normalised model input (N, 3, S, S)) and ``digest`` (a string naming the data, for provenance). A
zarr-backed reader is ``read = lambda rows: array.get_orthogonal_selection((rows,))`` with the same
attributes; nothing here needs the tokens to fit in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

KINDS = ("tokens", "images")


@runtime_checkable
class TokenReader(Protocol):
    """Rows of tokens (or features, or images) by index."""

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> np.ndarray: ...


def reader_kind(reader) -> str:
    """``reader.kind`` (default ``tokens``), checked."""
    kind = getattr(reader, "kind", "tokens")
    if kind not in KINDS:
        raise ValueError(f"reader kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_reader(reader) -> int:
    """``len(reader)`` after checking it has the reader protocol."""
    if not isinstance(reader, TokenReader):
        raise TypeError(
            f"a fine-tune reads a token reader (__len__ and read(rows)), got {type(reader).__name__}; "
            "wrap arrays in ArrayTokens"
        )
    n = len(reader)
    if n == 0:
        raise ValueError("the token reader has no rows")
    return n


class ArrayTokens:
    """An in-memory reader over an array (N, ...) of float16 / float32 tokens or features."""

    kind = "tokens"

    def __init__(self, array: np.ndarray | torch.Tensor):
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.dtype not in (np.float16, np.float32):
            raise ValueError(f"tokens must be float16 or float32, got {array.dtype}")
        if array.ndim not in (2, 3, 4):
            raise ValueError(f"tokens must be (N, D), (N, T, D) or (N, C, H, W), got shape {array.shape}")
        self.array = array
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.array)

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(rows, dtype=np.int64)]

    @property
    def digest(self) -> str:
        """SHA-256 of dtype, shape and bytes (computed once)."""
        if self._digest is None:
            h = hashlib.sha256(f"{self.array.dtype}|{self.array.shape}|".encode())
            h.update(np.ascontiguousarray(self.array).tobytes())
            self._digest = h.hexdigest()
        return self._digest


class ImageReader:
    """Cell images read from ``paths`` and preprocessed to normalised model input (N, 3, S, S) float32.

    ``check=True`` refuses, up front, paths that are gone (naming how many and the first few).
    """

    kind = "images"

    def __init__(self, paths: Sequence[str], prep, check: bool = True):
        self.paths = [str(p) for p in paths]
        self.prep = prep
        if check:
            gone = [p for p in self.paths if not os.path.isfile(p)]
            if gone:
                raise FileNotFoundError(
                    f"{len(gone)} of {len(self.paths)} images are gone, e.g. "
                    f"{', '.join(repr(p) for p in gone[:3])}; fine-tuning from images "
                    "re-reads them (restore them, or fine-tune on cached tail tokens)"
                )

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, rows: np.ndarray) -> np.ndarray:
        from embedcache.backbones.preprocess import to_model_input
        from embedcache.inputs.images import read_image

        imgs = [torch.from_numpy(read_image(self.paths[int(r)])) for r in rows]
        groups: list[list[torch.Tensor]] = []
        for im in imgs:  # consecutive same-shape runs keep the row order
            if groups and groups[-1][0].shape == im.shape:
                groups[-1].append(im)
            else:
                groups.append([im])
        x = to_model_input([torch.stack(g) for g in groups], self.prep, torch.device("cpu"))
        return x.numpy()

    @property
    def digest(self) -> str:
        h = hashlib.sha256(repr(self.prep).encode())
        for p in self.paths:
            h.update(p.encode() + b"\0")
        return h.hexdigest()


__all__ = ["KINDS", "ArrayTokens", "ImageReader", "TokenReader", "check_reader", "reader_kind"]
