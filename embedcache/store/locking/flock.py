"""Locks that keep two writers out of the same part of a store.

Local stores use ``flock`` on files in the store's side folder (``<store>.embedcache/locks/``,
outside the Zarr tree so that zarr, xarray and dask never meet them); the OS releases a flock
when its holder dies, SIGKILL included. ``memory://`` stores use in-process locks. Other fsspec
stores (``s3://``...) use leases with expiry (:mod:`embedcache.store.locking.lease`); see
:meth:`embedcache.store.store.Store.write_guarantee` for what each guarantees.

A lock either waits (``wait`` seconds, polling) or is refused at once with the holder named.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
POLL_SECONDS = 0.05


class LockBusy(RuntimeError):
    """Another process holds the lock (the message names it)."""


def lock_file(folder: Path, name: str) -> Path:
    """The file that stands for lock ``name`` in ``folder``."""
    return folder / (hashlib.sha1(name.encode()).hexdigest()[:16] + ".lock")


@contextlib.contextmanager
def file_lock(folder: Path, name: str, *, wait: float = 0.0, what: str = "") -> Iterator[bool]:
    """Hold the flock for ``name`` in ``folder``; yields True, or False when the folder cannot
    be made because the file system is read-only (nothing can be written there anyway)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in _READ_ONLY_ERRNOS and not os.access(folder.parent, os.W_OK):
            yield False
            return
        raise
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                    waited = f" after waiting {wait:.0f} s" if wait else ""
                    raise LockBusy(f"{what or name} is held by another embedcache process ({holder}){waited}") from None
                time.sleep(POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
        yield True
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def memory_lock(key: str, *, wait: float = 0.0, what: str = "") -> Iterator[bool]:
    """An in-process lock for ``memory://`` stores."""
    with _memory_guard:
        lk = _memory_locks.setdefault(key, threading.Lock())
    acquired = lk.acquire(timeout=wait) if wait else lk.acquire(blocking=False)
    if not acquired:
        raise LockBusy(f"{what or key} is being written by another thread")
    try:
        yield True
    finally:
        lk.release()


def remove_stale(folder: Path) -> None:
    """Delete the lock files in ``folder`` that nobody holds, then the folder if it is empty
    (used to move an old store's in-tree ``.locks`` out of the Zarr hierarchy)."""
    for path in folder.glob("*.lock"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except (BlockingIOError, OSError):
            pass  # held by a running (older) process: leave it
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        folder.rmdir()
