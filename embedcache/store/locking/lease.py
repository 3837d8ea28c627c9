"""Leases: exclusive writers on object stores, where no ``flock`` exists.

A lease is one small JSON object beside the store (``<store>.embedcache/leases/<hash>.json``) naming its
holder and when it expires. On S3 (s3fs) it is taken and kept with the store's conditional writes:

* take: ``PutObject`` with ``If-None-Match: *`` (only one writer can create the object);
* renew, and take over an expired lease: ``PutObject`` with ``If-Match: <ETag>`` of the version read
  (only one writer can replace that version; a holder that lost its lease finds out at its next renewal);
* give back: ``DeleteObject`` with ``If-Match`` (never deletes a lease someone else took over).

While held, a background thread renews the lease every ``ttl / 3`` seconds; a holder killed with SIGKILL
stops renewing, and its lease can be taken over ``ttl`` seconds after its last renewal. The first lease a
process takes on a file system checks that the server honours ``If-None-Match`` (a server that ignores it
would let two writers in): such a server is refused rather than trusted.

File systems without conditional writes embedcache knows how to use get a best-effort lease: the object
is written when absent, then read back after a short pause; a writer that reads another holder's token
backs off. :func:`guarantee` says which a store gets, and what it does not protect.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from embedcache.store.locking.base import LockBusy, LockLost, WriterLock, registered

__all__ = ["Lease", "LeaseBusy", "LeaseError", "LeaseLock", "lease", "guarantee", "lease_seconds", "LEASE_ENV"]

LEASE_ENV = "EMBEDCACHE_LEASE_SECONDS"
DEFAULT_TTL_S = 60.0
POLL_SECONDS = 0.5
SETTLE_SECONDS = 1.0  # best-effort leases: pause between writing and reading back
_checked_servers: set[str] = set()
_checked_guard = threading.Lock()


class LeaseError(RuntimeError):
    """The lease cannot be used on this store (e.g. the server ignores conditional writes)."""


class LeaseBusy(LockBusy):
    """Another writer holds the lease (the message names it and when it expires)."""


class LeaseLost(LeaseBusy, LockLost):
    """A lease this process held was taken over (after a stall past its expiry) or could not be renewed."""


def lease_seconds() -> float:
    """The lease expiry, in seconds after the last renewal (``EMBEDCACHE_LEASE_SECONDS``, default 60)."""
    value = os.environ.get(LEASE_ENV, "")
    try:
        ttl = float(value) if value else DEFAULT_TTL_S
    except ValueError as e:
        raise LeaseError(f"{LEASE_ENV}={value!r} is not a number of seconds") from e
    if ttl < 3:
        raise LeaseError(f"{LEASE_ENV}={value!r}: a lease must last at least 3 s (it is renewed every third)")
    return ttl


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.url_to_fs(url)


def is_s3(fs: Any) -> bool:
    """Whether ``fs`` is s3fs (whose conditional writes the leases use)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a") and hasattr(fs, "_call_s3")


def guarantee(url: str) -> dict[str, str]:
    """What a lease on the store at ``url`` (an fsspec URL) guarantees: ``mechanism`` and ``text``."""
    fs, _ = _fs(url)
    ttl = lease_seconds()
    if is_s3(fs):
        return {
            "mechanism": "lease-with-expiry",
            "text": (
                "one writer per feature set (and per store/dataset creation): a lease object beside the store, "
                "taken with S3 conditional writes (If-None-Match to take it, If-Match to renew it or take over "
                f"an expired one) and renewed every {ttl / 3:.0f} s; a killed writer's lease expires "
                f"{ttl:.0f} s after its last renewal. A writer that finds its lease taken over (after a stall "
                "past the expiry) stops before its next chunk's checksums and done flag. Not protected: the chunk "
                "data such a stalled writer writes between waking up and its next renewal (up to "
                f"{ttl / 3:.0f} s) can overwrite the new holder's unflagged chunk, which is then caught by its "
                "checksum on read (verify / repair); Dask tasks already running when their driver stops finish "
                "their chunk; writers' clocks must agree within a few seconds; writes that bypass embedcache "
                "(plain zarr, aws s3 cp) ignore leases"
            ),
        }
    return {
        "mechanism": "best-effort lease",
        "text": (
            f"this file system ({fs.protocol}) offers no conditional writes that embedcache uses: a lease object "
            "is written when absent and read back; two writers starting within about a second may both proceed "
            "(they write identical, verified chunk bytes for one feature set, but work is repeated)"
        ),
    }


@dataclass
class _Doc:
    holder: str
    token: str
    expires: float
    name: str

    def encode(self) -> bytes:
        return json.dumps(
            {"name": self.name, "holder": self.holder, "token": self.token, "expires": self.expires}, sort_keys=True
        ).encode()

    @staticmethod
    def decode(data: bytes) -> _Doc | None:
        try:
            d = json.loads(data)
            return _Doc(str(d["holder"]), str(d["token"]), float(d["expires"]), str(d.get("name", "")))
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign object: treated as expired (it can be taken over)


class Lease:
    """One named lease on the folder ``folder_url`` (see the module docstring); use :func:`lease`."""

    def __init__(self, folder_url: str, name: str, *, ttl: float | None = None, what: str = ""):
        self.fs, folder = _fs(folder_url)
        self.name, self.what = name, what or name
        self.path = f"{folder.rstrip('/')}/{hashlib.sha1(name.encode()).hexdigest()[:16]}.json"
        self.ttl = lease_seconds() if ttl is None else float(ttl)
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}"
        self.s3 = is_s3(self.fs)
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease was lost while held (taken over after a stall)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back --------------------------------------------------------------
    def acquire(self, wait: float = 0.0) -> None:
        """Take the lease, polling up to ``wait`` seconds; :class:`LeaseBusy` names the holder."""
        deadline = time.monotonic() + wait
        while True:
            holder = self._try()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                left = holder.expires - time.time()
                waited = f" after waiting {wait:.0f} s" if wait else ""
                raise LeaseBusy(
                    f"{self.what} is held by another embedcache writer ({holder.holder}; its lease expires in "
                    f"{max(left, 0):.0f} s unless renewed){waited}"
                )
            time.sleep(POLL_SECONDS)
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="embedcache-lease")
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            warnings.warn(f"{self.what}: {self.lost}", RuntimeWarning, stacklevel=2)
            return
        try:
            if self.s3:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
            else:
                doc = self._read()[0]
                if doc is not None and doc.token == self.token:
                    self.fs.rm_file(self.path)
        except OSError as e:  # left in place it expires by itself
            warnings.warn(
                f"{self.what}: could not give back the lease ({e}); it expires in {self.ttl:.0f} s",
                RuntimeWarning,
                stacklevel=2,
            )

    def check(self) -> None:
        """Raise :class:`LeaseBusy` if the lease was lost while held (another writer took it over)."""
        if self.lost:
            raise LeaseLost(f"{self.what}: {self.lost}")

    # -- one attempt ---------------------------------------------------------------------------
    def _doc(self) -> _Doc:
        return _Doc(self.holder, self.token, time.time() + self.ttl, self.name)

    def _try(self) -> _Doc | None:
        """Take the lease if free or expired; None when taken, else the current holder's document."""
        return self._try_s3() if self.s3 else self._try_plain()

    def _try_s3(self, attempts: int = 5) -> _Doc | None:
        """One take (retried at once, ``attempts`` times, when the object changes under us); on failure the
        current holder's document."""
        try:
            self.etag = self._put(self._doc().encode(), create=True)
        except FileExistsError:
            pass
        except OSError as e:
            # S3 answers 409 ConditionalRequestConflict (EBUSY) to a conditional write racing another one
            # on the same key: look again at what is there
            if e.errno != errno.EBUSY:
                raise
        else:
            try:
                self._check_server()
            except BaseException:
                self._give_back_quietly()  # a lease we made is never left behind a failed check
                raise
            return None
        doc, etag = self._read()
        if doc is not None and doc.expires > time.time():
            return doc
        if etag is not None:  # expired (or unreadable): take it over, only if nobody else did first
            try:
                self.etag = self._put(self._doc().encode(), if_match=etag)
                return None
            except OSError:  # (FileNotFoundError too) someone else took it over, or gave it back: look again
                doc, _ = self._read()
                if doc is not None and doc.expires > time.time():
                    return doc
        if attempts > 0:  # given back between our requests, or a take-over we lost to a writer gone since
            return self._try_s3(attempts - 1)
        return _Doc("other writers (the lease object kept changing while this one tried)", "", time.time(), "")

    def _give_back_quietly(self) -> None:
        """Delete the lease object this writer just made (If-Match its ETag); errors are left to expiry."""
        with contextlib.suppress(OSError):
            bucket, key, _ = self.fs.split_path(self.path)
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)

    def _try_plain(self) -> _Doc | None:
        doc, _ = self._read()
        if doc is not None and doc.expires > time.time() and doc.token != self.token:
            return doc
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)  # file systems with real folders need it
        self.fs.pipe_file(self.path, self._doc().encode())
        time.sleep(SETTLE_SECONDS)
        doc, _ = self._read()
        if doc is not None and doc.token != self.token:
            return doc
        return None

    def _put(self, data: bytes, *, create: bool = False, if_match: str | None = None) -> str:
        kw: dict[str, Any] = {"mode": "create"} if create else {"IfMatch": if_match}
        out = self.fs.pipe_file(self.path, data, **kw)
        etag = out.get("ETag") if isinstance(out, dict) else None
        return str(etag or self.fs.info(self.path, refresh=True)["ETag"])

    def _read(self) -> tuple[_Doc | None, str | None]:
        """The lease document and its ETag (S3: from one GET, so the two belong together)."""
        if not self.s3:
            try:
                return _Doc.decode(self.fs.cat_file(self.path)), ""
            except FileNotFoundError:
                return None, None
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), str(resp["ETag"])

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        return _Doc.decode(data), etag

    def _check_server(self) -> None:
        """Once per server: a second ``If-None-Match`` create of the object just made must be refused."""
        server = f"{self.fs.protocol}:{getattr(self.fs, 'endpoint_url', None) or os.environ.get('AWS_ENDPOINT_URL')}"
        with _checked_guard:
            if server in _checked_servers:
                return
        ignored = []
        try:
            self.fs.pipe_file(self.path, self._doc().encode(), mode="create")
            ignored.append("If-None-Match")
        except FileExistsError:
            pass
        try:  # a take-over or renewal with a stale ETag must be refused too
            self.etag = self._put(self._doc().encode(), if_match='"' + "0" * 32 + '"')
            ignored.append("If-Match")
        except OSError:
            pass
        if not ignored:
            with _checked_guard:
                _checked_servers.add(server)
            return
        with contextlib.suppress(OSError):  # ours, whatever its ETag now
            self.fs.rm_file(self.path)
        raise LeaseError(
            f"the S3 server behind {self.path} ignores conditional writes ({', '.join(ignored)}), so two writers "
            "could both take a lease; write to a local store, or to a server that honours them (AWS S3, "
            "recent MinIO, moto)"
        )

    # -- keeping it -----------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
                renewed = time.monotonic()
            except Exception as e:  # noqa: BLE001  retried; lost (check() / release()) once it may have expired
                if self.lost is None and time.monotonic() - renewed >= self.ttl * 2 / 3:
                    self.lost = f"the lease could not be renewed before it expired ({type(e).__name__}: {e})"
                    self._stop.set()

    def _renew(self) -> None:
        if self.s3:
            try:
                self.etag = self._put(self._doc().encode(), if_match=self.etag)
                return
            except OSError:
                doc, etag = self._read()
            if doc is not None and doc.token == self.token:  # still ours (a transient error): next round retries
                self.etag = etag
                return
            who = doc.holder if doc is not None else "nobody (the lease object is gone)"
            self.lost = f"the lease was taken over by {who} while this writer held it (stalled past its expiry?)"
            self._stop.set()
            return
        doc, _ = self._read()
        if doc is not None and doc.token != self.token:
            self.lost = f"the lease was taken over by {doc.holder} while this writer held it"
            self._stop.set()
            return
        self.fs.pipe_file(self.path, self._doc().encode())


@contextlib.contextmanager
def lease(
    folder_url: str, name: str, *, wait: float = 0.0, what: str = "", ttl: float | None = None
) -> Iterator[Lease]:
    """Hold lease ``name`` in ``folder_url`` for the ``with`` block (see :class:`Lease`)."""
    held = Lease(folder_url, name, ttl=ttl, what=what)
    held.acquire(wait)
    try:
        with registered(held):
            yield held
    finally:
        held.release()


class LeaseLock(WriterLock):
    """Leases in the folder ``folder_url`` (``<store>.embedcache/leases``): conditional writes on S3, a
    best-effort lease on other fsspec file systems (:func:`guarantee` says which)."""

    mechanism = "lease-with-expiry"
    supports_other_processes = True
    supports_other_hosts = True
    supports_release_on_death = True  # after the expiry (``EMBEDCACHE_LEASE_SECONDS``)
    supports_loss_detection = True  # a lease taken over after a stall is noticed at the next renewal

    def __init__(self, folder_url: str, store_url: str):
        self.folder_url, self.store_url = folder_url, store_url

    def hold(self, name: str, *, wait: float = 0.0, what: str = "") -> contextlib.AbstractContextManager[object]:
        return lease(self.folder_url, name, wait=wait, what=what)

    def guarantee(self) -> str:
        return guarantee(self.store_url)["text"]

    def describe(self) -> dict[str, str]:
        return guarantee(self.store_url)
