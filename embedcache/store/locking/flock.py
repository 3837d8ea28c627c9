"""``flock`` locks for local stores, and in-process locks for ``memory://`` stores.

Local stores use ``flock`` on files in the store's side folder (``<store>.embedcache/locks/``,
outside the Zarr tree so that zarr, xarray and dask never meet them); the OS releases a flock
when its holder dies, SIGKILL included. ``memory://`` stores use in-process locks. Other fsspec
stores (``s3://``...) use leases with expiry (:mod:`embedcache.store.locking.lease`); see
:meth:`embedcache.store.Store.write_guarantee` for what each guarantees.

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

from embedcache.store.locking.base import LockBusy, LockLost, WriterLock, registered

_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
POLL_SECONDS = 0.05


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
        with registered(_LockFile(fd, lock_file(folder, name), what or name)):
            yield True
    finally:
        os.close(fd)  # closing releases the flock


class _LockFile:
    """A held flock's file: lost when the file was deleted (or replaced) while held, e.g. with the side folder,
    after which another writer could lock a new file of the same name."""

    def __init__(self, fd: int, path: Path, what: str):
        self.fd, self.path, self.what = fd, path, what
        self.inode = os.fstat(fd).st_ino

    def check(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            same = False
        if not same:
            raise LockLost(
                f"{self.what}: the lock file {self.path} was deleted while this writer held it (was the side "
                "folder removed?); another writer may now hold the set, so this one stops before its next done "
                "flag; rerun the same command to finish (it resumes where the chunks stop)"
            )


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


class FlockLock(WriterLock):
    """``flock`` on files in ``folder`` (the store's side folder ``<store>.embedcache/locks``)."""

    mechanism = "flock"
    supports_other_processes = True
    supports_other_hosts = False  # only as far as the file system's flock reaches
    supports_release_on_death = True  # the OS releases a dead holder's flock at once
    supports_loss_detection = True  # a deleted lock file is noticed before the next done flag

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def hold(self, name: str, *, wait: float = 0.0, what: str = "") -> contextlib.AbstractContextManager[object]:
        return file_lock(self.folder, name, wait=wait, what=what)

    def guarantee(self) -> str:
        return (
            f"one writer per feature set (and per store/dataset creation): flock on files in {self.folder}, "
            "released by the OS when a writer dies (SIGKILL too); a writer whose lock file is deleted stops before "
            "its next done flag. Not protected: a network file system without working flock (some NFSv3, SMB or "
            "FUSE mounts)"
        )


class MemoryLock(WriterLock):
    """In-process locks for a ``memory://`` store (which only this process can see)."""

    mechanism = "in-process lock"
    supports_other_processes = False  # no other process can see a memory:// store anyway
    supports_other_hosts = False
    supports_release_on_death = True  # the store dies with its process
    supports_loss_detection = False  # nothing can take an in-process lock away

    def __init__(self, prefix: str):
        self.prefix = prefix

    def hold(self, name: str, *, wait: float = 0.0, what: str = "") -> contextlib.AbstractContextManager[object]:
        return memory_lock(f"{self.prefix}::{name}", wait=wait, what=what)

    def guarantee(self) -> str:
        return "one process only: a memory:// store lives in it"
