"""A cap on the threads the probe fits use (BLAS, OpenMP, torch), for small or shared CPUs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Cap BLAS/OpenMP threads (threadpoolctl) and torch's intra-op threads; ``None``: no change."""
    if not threads:
        yield
        return
    import scipy.linalg  # noqa: F401  load scipy's own BLAS now, so that the limit reaches it
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(int(threads)):
            if torch is not None:
                torch.set_num_threads(int(threads))
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)
