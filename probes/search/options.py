"""How a neighbour look-up searches, declared once (:class:`SearchOptions`): exact or approximate, and the
approximate index's knobs. ``probes neighbors`` builds its flags from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from embedcache.options import Interval, Options, option
from probes.errors import ProbeError
from probes.search.ann import AUTO_EXACT_BELOW, choose_kind

__all__ = ["SearchOptions"]


@dataclass(frozen=True)
class SearchOptions(Options):
    """Which index answers a look-up and how an approximate one searches."""

    error = ProbeError

    index: str = option(
        "auto",
        "auto (exact below --exact-below cells, else ivf), exact, ivf (IVF-PQ) or hnsw; an ivf/hnsw index is "
        "built once per feature set, kept beside the store, and its candidates are re-ranked by exact cosine",
        flags=("--index",),
        check=lambda name, value: choose_kind(value, None) and None,  # raises naming the kinds
    )
    nprobe: int | None = option(None, "ivf: inverted lists visited per query (default 32)", check=Interval(int, 1))
    ef: int | None = option(
        None, "hnsw: candidate list size per query, at least --rerank (default 128)", check=Interval(int, 1)
    )
    rerank: int | None = option(
        None, "ivf/hnsw: candidates re-scored exactly per query (default 200)", check=Interval(int, 1)
    )
    recall: bool = option(
        False,
        "measure the ivf/hnsw index's recall@k against exact search now, for these settings",
        flags=("--recall",),
    )
    exact_below: int = option(
        AUTO_EXACT_BELOW, "--index auto: exact search below this many cells", check=Interval(int, 1)
    )
