"""One test class run against every writer-lock backend (flock, in-process, best-effort lease, S3 lease), as
zarr-python's ``StoreTests`` runs against every store: what a backend's ``supports_*`` flags promise, it does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from embedcache.store.locking.base import LockBusy, LockLost, WriterLock, check_held
from embedcache.store.locking.flock import FlockLock, MemoryLock, lock_file
from embedcache.store.locking.lease import LeaseLock, lease
from embedcache.store.store import writer_lock_for
from tests.embedcache.store.conftest import BUCKET
from tests.paths import REPO

# a child process that holds lock "shared" of the store at argv[1] until killed
_HOLDER = textwrap.dedent("""
    import sys, time
    from embedcache.store.store import writer_lock_for
    with writer_lock_for(sys.argv[1]).hold("shared", what="the child's set"):
        print("held", flush=True)
        time.sleep(600)
""")


class WriterLockTests:
    """Subclasses give ``url``: the store path whose backend :func:`writer_lock_for` chooses."""

    backend: type[WriterLock]

    @pytest.fixture
    def url(self, tmp_path) -> str:
        raise NotImplementedError

    @pytest.fixture
    def lock(self, url) -> WriterLock:
        chosen = writer_lock_for(url)
        assert isinstance(chosen, self.backend)  # chosen once, by the URL
        return chosen

    def lose(self, lock: WriterLock, name: str) -> None:
        """Make the held lock ``name`` lost the way this backend can lose it."""
        raise NotImplementedError

    def test_flags_and_guarantee_are_declared(self, lock):
        for flag in ("supports_other_processes", "supports_other_hosts", "supports_release_on_death"):
            assert isinstance(getattr(lock, flag), bool), flag
        assert isinstance(lock.supports_loss_detection, bool)
        said = lock.describe()
        assert said["mechanism"] and len(said["text"]) > 20

    def test_hold_release_and_hold_again(self, lock):
        with lock.hold("a"):
            pass
        with lock.hold("a"):
            pass

    def test_a_second_holder_is_refused_naming_the_set(self, lock):
        with lock.hold("a", what="the set a"):
            with pytest.raises(LockBusy, match="the set a"):
                with lock.hold("a", what="the set a"):
                    pass

    def test_other_names_do_not_conflict(self, lock):
        with lock.hold("a"), lock.hold("b"):
            pass

    def test_a_waiting_holder_gets_the_lock_once_it_is_given_back(self, lock):
        held, release = threading.Event(), threading.Event()

        def first() -> None:
            with lock.hold("w"):
                held.set()
                release.wait(10)

        t = threading.Thread(target=first)
        t.start()
        assert held.wait(10)
        threading.Timer(0.3, release.set).start()
        start = time.monotonic()
        with lock.hold("w", wait=20):
            waited = time.monotonic() - start
        t.join()
        assert waited >= 0.25

    def test_other_processes_are_kept_out_and_a_dead_holder_frees_the_lock(self, url, lock):
        if not lock.supports_other_processes:
            pytest.skip(f"{lock.mechanism}: other processes cannot see this store at all")
        child = subprocess.Popen([sys.executable, "-c", _HOLDER, url], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "held"
            with pytest.raises(LockBusy, match="held by another embedcache"):
                with lock.hold("shared"):
                    pass
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        assert lock.supports_release_on_death
        with lock.hold("shared", wait=30):  # flock: at once; a lease: once it expires
            pass

    def test_a_lost_lock_stops_the_writer_before_its_next_done_flag(self, lock):
        if not lock.supports_loss_detection:
            pytest.skip(f"{lock.mechanism}: nothing can take the lock away")
        with lock.hold("l", what="the set l"):
            check_held()  # held: nothing to say
            self.lose(lock, "l")
            with pytest.raises(LockLost, match="the set l"):
                check_held()
        check_held()  # given back: no longer checked


class TestFlockLock(WriterLockTests):
    backend = FlockLock

    @pytest.fixture
    def url(self, tmp_path) -> str:
        return str(tmp_path / "cache.zarr")

    def lose(self, lock, name):
        lock_file(lock.folder, name).unlink()  # e.g. the side folder deleted while a writer runs


class TestMemoryLock(WriterLockTests):
    backend = MemoryLock

    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"memory://locks-{tmp_path.name}/cache.zarr"


@pytest.mark.filterwarnings("ignore:.*taken over:RuntimeWarning")  # the lost lease, said when given back
class _LeaseTests(WriterLockTests):
    backend = LeaseLock

    @pytest.fixture(autouse=True)
    def short_leases(self, monkeypatch):
        monkeypatch.setenv("EMBEDCACHE_LEASE_SECONDS", "3")

    def lose(self, lock, name):
        from embedcache.store.locking import base

        (held,) = [h for h in base._held if getattr(h, "name", None) == name]
        held.fs.pipe_file(held.path, b'{"name": "l", "holder": "pid 7 elsewhere", "token": "t", "expires": 1e12}')
        held._renew()  # its next renewal finds another holder's lease


class TestBestEffortLease(_LeaseTests):
    """fsspec file systems without conditional writes (here the local one through a file:// URL)."""

    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"file://{tmp_path}/cache.zarr"

    def test_it_says_it_is_best_effort(self, lock):
        assert lock.describe()["mechanism"] == "best-effort lease"


@pytest.mark.slow
class TestS3Lease(_LeaseTests):
    """S3 conditional writes on a real S3-protocol server (moto) on loopback."""

    @pytest.fixture
    def url(self, s3, tmp_path) -> str:
        return f"s3://{BUCKET}/{tmp_path.name}/cache.zarr"

    def test_it_uses_conditional_writes(self, lock):
        assert lock.describe()["mechanism"] == "lease-with-expiry"


def test_a_lease_released_twice_is_harmless(tmp_path):
    with lease(f"file://{tmp_path}/leases", "x"):
        pass
    with lease(f"file://{tmp_path}/leases", "x"):
        pass


PAUSED_IMPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import embedcache
    from embedcache.store import FeatureSet

    out, marker, go = sys.argv[1:4]
    write = FeatureSet.write_chunk

    def write_after_a_pause(self, c, *a, **k):
        if c == 2:
            Path(marker).touch()
            while not Path(go).exists():
                time.sleep(0.02)
        write(self, c, *a, **k)

    FeatureSet.write_chunk = write_after_a_pause
    x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    embedcache.import_features(out, x, labels=["a", "b"] * 128, backbone="mine", chunk_size=64)
""")


@pytest.mark.slow  # two processes
def test_a_writer_whose_side_folder_is_deleted_stops_before_its_next_done_flag(tmp_path):
    """Issue 26, case 9: with <store>.embedcache removed mid-import, a second writer of the same set could lock
    a new lock file and both wrote and exited 0. Now the first finds its lock file gone and stops, naming why."""
    import shutil

    import numpy as np

    import embedcache

    out, marker, go = tmp_path / "c.zarr", tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_IMPORT, str(out), str(marker), str(go)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.02)
        shutil.rmtree(f"{out}.embedcache")  # the side folder, and the first writer's lock file with it
        x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
        second = embedcache.import_features(out, x, labels=["a", "b"] * 128, backbone="mine", chunk_size=64)
        assert second.chunks_written == 2  # chunks 2-3; the first had flagged 0-1
        go.touch()
        _, err = first.communicate(timeout=120)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0 and "was deleted while this writer held it" in err
