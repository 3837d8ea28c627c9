"""One interface for the writer locks of every kind of store, with capability flags.

A store chooses its backend once, by its URL (:func:`embedcache.store.store.writer_lock_for`): ``flock``
on local disk (:mod:`.flock`), an in-process lock for ``memory://`` (:mod:`.flock` too), a lease with
expiry on S3 and other fsspec stores (:mod:`.lease`). Every backend answers :meth:`WriterLock.hold` and
says what it guarantees; the flags say what a caller may rely on, as zarr-python's ``Store.supports_*``
do, and one shared test class checks each backend against its flags.

A held lock can be lost (a lease taken over after a stall; a lock file deleted with the side folder).
Writers call :func:`check_held` before a chunk's checksums and done flags: a lost lock stops the writer
with :class:`LockLost` naming why, instead of flagging chunks another writer may now own.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Iterator
from typing import ClassVar, Protocol

__all__ = ["WriterLock", "LockBusy", "LockLost", "Held", "check_held", "registered"]


class LockBusy(RuntimeError):
    """Another writer holds the lock (the message names it)."""


class LockLost(LockBusy):
    """A lock this process held was lost (taken over, or its lock file deleted); the message says which."""


class Held(Protocol):
    """A lock while it is held: :meth:`check` raises :class:`LockLost` when it was lost."""

    def check(self) -> None: ...


_held: list[Held] = []
_held_guard = threading.Lock()


@contextlib.contextmanager
def registered(held: Held) -> Iterator[Held]:
    """Count ``held`` among the locks :func:`check_held` checks, for the ``with`` block."""
    with _held_guard:
        _held.append(held)
    try:
        yield held
    finally:
        with _held_guard:
            _held.remove(held)


def check_held() -> None:
    """Raise :class:`LockLost` when a lock this process holds was lost. Chunk writes call it before their
    checksums and done flags, so a writer that lost its lock stops before flagging chunks it no longer owns."""
    with _held_guard:
        held = list(_held)
    for h in held:
        h.check()


class WriterLock(abc.ABC):
    """Exclusive, named locks on one store (one per feature set, per dataset creation, per label commit)."""

    mechanism: ClassVar[str]
    supports_other_processes: ClassVar[bool]  # keeps out writers in other processes of this machine
    supports_other_hosts: ClassVar[bool]  # keeps out writers on other machines sharing the store
    supports_release_on_death: ClassVar[bool]  # a killed holder's lock is freed (at once, or after an expiry)
    supports_loss_detection: ClassVar[bool]  # a holder finds out, before its next done flag, that it lost the lock

    @abc.abstractmethod
    def hold(self, name: str, *, wait: float = 0.0, what: str = "") -> contextlib.AbstractContextManager[object]:
        """Hold lock ``name`` for a ``with`` block, waiting up to ``wait`` seconds (0: refuse at once);
        :class:`LockBusy` names the holder."""

    @abc.abstractmethod
    def guarantee(self) -> str:
        """What this lock guarantees, and what it does not protect (``embedcache info`` prints it)."""

    def describe(self) -> dict[str, str]:
        """``{"mechanism", "text"}`` for ``embedcache info``."""
        return {"mechanism": self.mechanism, "text": self.guarantee()}
