"""``verify``: check every done row-chunk of a store against its checksum, and repair by recompute.

``verify`` checks every done chunk of every feature set (:meth:`FeatureSet.damage`); with ``repair=True``
it clears the ``done`` flags of the damaged ones, so that the same extract (or import) command recomputes
exactly those chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedcache.store.feature_set import Damage
from embedcache.store.store import open_store

__all__ = ["verify", "VerifyReport", "Damage"]


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


def verify(store: str, *, repair: bool = False) -> VerifyReport:
    """Check every done row-chunk of every feature set in the store; ``repair`` clears the done
    flags of damaged chunks so that rerunning the same extract / import recomputes them."""
    st = open_store(store, mode="a" if repair else "r")
    report = VerifyReport(st.url, incomplete_groups=st.incomplete_groups())
    for name in st.datasets():
        ds = st.dataset(name)
        for key in ds.feature_keys():
            fs = ds.feature_set(key)
            if not fs.has_checksums:
                report.unverifiable.append(f"{name}/{key}")
            damaged: list[Damage] = []
            for c in fs.done_chunks():
                report.chunks_checked += 1
                damaged += fs.damage(c)
            report.damaged += damaged
            if repair and damaged:
                fs.clear_done(sorted({d.chunk for d in damaged}))
    report.repaired = repair and bool(report.damaged)
    return report
