"""Row-wise vector helpers shared by the heads and the neighbour index."""

from __future__ import annotations

import numpy as np

from .data import ProbeError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as a new C-contiguous float32 array (all-zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ProbeError(f"features must be 2-D (n, D), got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    x /= np.maximum(norms, 1e-12)
    return x
