"""Stores and manifests on object storage, against a real S3-protocol server on 127.0.0.1 (moto's server
mode, started and stopped here): extract, read back, verify, URL manifests with URL image paths, leases."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache import StoreBusyError, open_store
from embedcache.store.locking.lease import Lease
from tests.embedcache.store.conftest import BUCKET

pytestmark = pytest.mark.slow  # a real S3 server (moto) on loopback

KW = dict(weights="random", input_size=32, chunk_size=16, batch_size=8, pool="cls,mean", progress=False)


def _extract(data, out, **kw):
    return embedcache.extract("timm:test_vit", data, out, **{**KW, "num_workers": 0, **kw})


def _feats(out: str | Path, key: str) -> dict[str, np.ndarray]:
    fs = open_store(out).dataset().feature_set(key)
    return {n: np.asarray(fs.group[n][:]) for n in ("cls", "mean", "crc_cls", "crc_mean", "ok")}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, chula_cells):
    """40 Chula cells extracted into a store on local disk: what every S3 variant must equal."""
    root = tmp_path_factory.mktemp("s3ref")
    manifest = root / "manifest.csv"
    chula_cells.iloc[:40].to_csv(manifest, index=False)
    r = _extract(manifest, root / "cache.zarr")
    return manifest, _feats(root / "cache.zarr", r.key), r


def test_extract_into_s3_reads_back_verifies_and_says_its_guarantee(s3, local_reference):
    manifest, ref, ref_r = local_reference
    url = f"s3://{BUCKET}/cache.zarr"
    r = _extract(manifest, url)
    assert r.store == url and r.chunks_written == 3 and r.key == ref_r.key
    _same(ref, _feats(url, r.key))
    assert s3.exists(f"{BUCKET}/cache.zarr/zarr.json")
    assert embedcache.verify(url).ok
    assert _extract(manifest, url).cache_hit
    # the lease was given back: no lease object left
    assert not s3.glob(f"{BUCKET}/cache.zarr.embedcache/leases/*.json")
    # info says what keeps writers apart there, and what it does not protect
    st = open_store(url)
    g = st.write_guarantee()
    assert g["mechanism"] == "lease-with-expiry" and "Not protected" in g["text"]
    from embedcache_cli.embedcache_app import app

    res = CliRunner().invoke(app, ["info", url])
    assert res.exit_code == 0, res.output
    assert "lease-with-expiry" in res.output and "If-None-Match" in res.output
    # a local store: flock
    local = CliRunner().invoke(app, ["info", str(manifest.parent / "cache.zarr")])
    assert local.exit_code == 0 and "writers: flock" in local.output


def test_manifest_and_image_paths_on_s3(s3, chula_cells, local_reference, tmp_path, monkeypatch):
    """A CSV manifest on S3 with paths relative to it, and a Parquet one with s3:// URLs (one missing)."""
    _, ref, _ = local_reference
    df = chula_cells.iloc[:40].copy()
    rel = [f"cells/{Path(p).name}" for p in df["path"]]
    for p, r in zip(df["path"], rel):
        s3.put_file(p, f"{BUCKET}/rbc/{r}")
    csv = df.assign(path=rel)
    s3.pipe_file(f"{BUCKET}/rbc/manifest.csv", csv.to_csv(index=False).encode())
    out = tmp_path / "cache.zarr"
    r = _extract(f"s3://{BUCKET}/rbc/manifest.csv", out)
    assert r.dataset == "rbc" and r.cells_computed == 40 and not r.skipped
    _same(ref, _feats(out, r.key))
    obs = open_store(out).dataset().obs
    assert obs["path"].iat[0] == f"s3://{BUCKET}/rbc/{rel[0]}"
    # Parquet, absolute URLs, one of them missing: a recorded skip naming the URL
    urls = [f"s3://{BUCKET}/rbc/{r}" for r in rel]
    urls[5] = f"s3://{BUCKET}/rbc/cells/gone.jpg"
    pq = tmp_path / "cells.parquet"
    df.assign(path=urls).to_parquet(pq)
    s3.put_file(str(pq), f"{BUCKET}/tables/cells.parquet")
    out2 = f"s3://{BUCKET}/urls.zarr"
    r2 = _extract(f"s3://{BUCKET}/tables/cells.parquet", out2, on_error="skip")
    assert [s[1] for s in r2.skipped] == ["missing file"]
    got = _feats(out2, r2.key)
    keep = np.arange(40) != 5
    assert np.array_equal(got["cls"][keep], ref["cls"][keep]) and not got["ok"][5]
    with pytest.raises(embedcache.ExtractionError, match="gone.jpg"):
        _extract(f"s3://{BUCKET}/tables/cells.parquet", tmp_path / "fail.zarr")
    with pytest.raises(embedcache.SourceError, match="not found"):
        _extract(f"s3://{BUCKET}/tables/none.csv", tmp_path / "none.zarr")
    # a fetch that fails for a reason that is not the image's (credentials, throttling) stops the run, and
    # nothing is recorded: the rerun fetches the cells again
    import fsspec

    real = fsspec.url_to_fs

    class Denied:
        def __init__(self, fs):
            self.fs = fs

        def cat_file(self, path, *a, **kw):
            if path.endswith(Path(rel[7]).name):
                raise PermissionError("The provided token has expired")
            return self.fs.cat_file(path, *a, **kw)

        def __getattr__(self, name):
            return getattr(self.fs, name)

    def url_to_fs(url, *a, **kw):
        fs, where = real(url, *a, **kw)
        return Denied(fs), where

    monkeypatch.setattr(fsspec, "url_to_fs", url_to_fs)
    with pytest.raises(Exception, match="token has expired"):
        _extract(f"s3://{BUCKET}/tables/cells.parquet", tmp_path / "denied.zarr", on_error="skip")
    monkeypatch.setattr(fsspec, "url_to_fs", real)
    r3 = _extract(f"s3://{BUCKET}/tables/cells.parquet", tmp_path / "denied.zarr", on_error="skip")
    assert [s[1] for s in r3.skipped] == ["missing file"] and _feats(tmp_path / "denied.zarr", r3.key)["ok"][7]
    # an .npz of images at a URL opens like a local one
    images = np.random.default_rng(0).integers(0, 255, (6, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "arr.npz", images=images, labels=np.arange(6))
    s3.put_file(str(tmp_path / "arr.npz"), f"{BUCKET}/tables/arr.npz")
    src = embedcache.open_source(f"s3://{BUCKET}/tables/arr.npz")
    assert src.name == "arr" and len(src) == 6 and np.array_equal(src.load(3), images[3])


def test_a_second_writer_is_refused_naming_the_lease_holder_and_an_expired_lease_is_taken_over(s3, local_reference):
    manifest, ref, ref_r = local_reference
    url = f"s3://{BUCKET}/leased.zarr"
    r = _extract(manifest, url)
    name = f"features::{r.dataset}::{r.key}"
    st = open_store(url, mode="a")
    with st.lock(name):  # another writer of the same feature set holds its lease
        objs = s3.glob(f"{BUCKET}/leased.zarr.embedcache/leases/*.json")
        assert len(objs) == 1
        held = json.loads(s3.cat_file(objs[0]))
        assert held["expires"] > time.time() and f"pid {os.getpid()}" in held["holder"]
        with pytest.raises(StoreBusyError, match=r"held by another embedcache writer \(pid .*expires in"):
            _extract(manifest, url)
    # a writer killed without giving its lease back: the lease expired 5 s ago, so the next writer takes it over
    dead = {"name": name, "holder": "pid 4242 on a-dead-node since then", "token": "dead", "expires": time.time() - 5}
    s3.pipe_file(objs[0], json.dumps(dead).encode())
    fs = open_store(url, mode="a").dataset().feature_set(r.key)
    fs.clear_done([1])
    again = _extract(manifest, url)
    assert again.chunks_written == 1
    _same(ref, _feats(url, r.key))
    assert not s3.exists(objs[0])  # taken over, then given back
    # not yet expired: refused, naming that holder
    s3.pipe_file(objs[0], json.dumps({**dead, "expires": time.time() + 300}).encode())
    with pytest.raises(StoreBusyError, match="pid 4242 on a-dead-node"):
        _extract(manifest, url)
    s3.rm_file(objs[0])


def test_lease_renewal_and_loss(s3, monkeypatch):
    """A held lease is renewed (its expiry moves); one taken over while held is reported lost."""
    folder = f"s3://{BUCKET}/renew.embedcache/leases"
    lease = Lease(folder, "x", ttl=3)
    lease.acquire()
    first = json.loads(s3.cat_file(lease.path))["expires"]
    time.sleep(1.6)
    assert json.loads(s3.cat_file(lease.path))["expires"] > first
    assert lease.lost is None
    s3.pipe_file(lease.path, json.dumps({"holder": "pid 1 on thief", "token": "t", "expires": 1e12}).encode())
    time.sleep(1.6)
    assert lease.lost and "pid 1 on thief" in lease.lost
    with pytest.raises(RuntimeError, match="thief"):
        lease.check()
    with pytest.warns(RuntimeWarning, match="taken over"):
        lease.release()
    assert s3.exists(lease.path)  # someone else's lease is never deleted
    s3.rm_file(lease.path)


def test_a_writer_that_lost_its_lease_stops_before_flagging_chunks(s3, local_reference, monkeypatch):
    """Another writer takes the lease over while the extraction runs (after a stall past its expiry): the next
    chunk write stops before its checksums and done flag; once that writer's lease expires, the rerun finishes
    the set, equal to a local run."""
    from embedcache.store.locking import base as locks

    manifest, ref, _ = local_reference
    url = f"s3://{BUCKET}/lost.zarr"
    writes = {"n": 0}
    real_write = embedcache.store.FeatureSet.write_chunk

    def write_and_lose(self, c, *a, **kw):
        writes["n"] += 1
        if writes["n"] == 2:  # between the first and the second chunk, another writer takes the lease over
            for held in list(locks._held):  # the leases this process holds
                thief = {"name": held.name, "holder": "pid 7 on elsewhere", "token": "t", "expires": time.time() + 2}
                s3.pipe_file(held.path, json.dumps(thief).encode())
                held._renew()  # its next renewal finds out
        return real_write(self, c, *a, **kw)

    monkeypatch.setattr(embedcache.store.FeatureSet, "write_chunk", write_and_lose)
    with pytest.raises(Exception, match="taken over by pid 7 on elsewhere"), pytest.warns(RuntimeWarning):
        _extract(manifest, url)
    monkeypatch.setattr(embedcache.store.FeatureSet, "write_chunk", real_write)
    st = open_store(url)
    key = st.dataset().feature_keys()[0]
    fs = st.dataset().feature_set(key)
    assert fs.pending_chunks(["cls"]) == list(range(1, fs.n_chunks))  # only the chunk written under the lease
    time.sleep(2.5)  # the other writer's lease expires
    again = _extract(manifest, url)
    assert again.chunks_written == fs.n_chunks - 1
    _same(ref, _feats(url, key))


def test_two_writers_taking_over_one_expired_lease_one_wins(s3):
    """If-Match on the expired lease's ETag: of two writers taking it over at once, exactly one gets it."""
    import threading

    from embedcache.store.locking.lease import LeaseBusy

    folder = f"s3://{BUCKET}/race.embedcache/leases"
    first = Lease(folder, "features::race", ttl=30)
    first.acquire()
    first._stop.set()
    first._thread.join()
    doc = json.loads(s3.cat_file(first.path))
    s3.pipe_file(first.path, json.dumps({**doc, "holder": "pid 9 on gone", "expires": time.time() - 1}).encode())
    racers = [Lease(folder, "features::race", ttl=30) for _ in range(2)]
    reads = [r._read() for r in racers]  # both read the expired document (and its ETag) before either writes
    assert reads[0][1] == reads[1][1]
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def take(r, etag):
        barrier.wait()
        try:
            r.etag = r._put(r._doc().encode(), if_match=etag)
            outcomes.append("took")
        except OSError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(r, e)) for r, (_, e) in zip(racers, reads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused", "took"]
    with pytest.raises(LeaseBusy):
        Lease(folder, "features::race", ttl=30).acquire()
    s3.rm_file(first.path)


def test_lease_taken_when_the_object_changes_under_the_writer(s3, monkeypatch):
    """Races a writer must not read as a busy lease: the expired lease it read was given back before its
    take-over (no phantom holder), and its create met another conditional write (S3's 409, EBUSY); both
    retried at once. A lease that keeps changing under it ends as busy, with a name, never as taken."""
    import errno

    from embedcache.store.locking.lease import LeaseBusy

    folder = f"s3://{BUCKET}/changing.embedcache/leases"
    gone = Lease(folder, "features::changing", ttl=30)
    real_read, real_put = Lease._read, Lease._put
    seen = {"reads": 0, "creates": 0, "take_overs": 0}

    def read_a_lease_given_back(self):  # first read: an expired lease, whose object is deleted at once
        seen["reads"] += 1
        if seen["reads"] == 1:
            s3.pipe_file(self.path, json.dumps({"holder": "pid 9 on gone", "token": "t", "expires": 1.0}).encode())
            doc, etag = real_read(self)
            s3.rm_file(self.path)
            return doc, etag
        return real_read(self)

    def create_fails_once(self, data, *, create=False, if_match=None):
        if create or if_match != '"' + "0" * 32 + '"':  # not the server check's stale-ETag probe
            seen["creates" if create else "take_overs"] += 1
        if create and seen["creates"] == 1:
            raise FileExistsError("someone created it first")  # as the expired lease was there
        return real_put(self, data, create=create, if_match=if_match)

    monkeypatch.setattr(Lease, "_read", read_a_lease_given_back)
    monkeypatch.setattr(Lease, "_put", create_fails_once)
    gone.acquire()  # wait=0: a phantom holder would have raised LeaseBusy here
    assert seen["take_overs"] == 1 and seen["creates"] == 2  # the take-over found no object; a create won
    assert json.loads(s3.cat_file(gone.path))["token"] == gone.token
    gone.release()
    monkeypatch.setattr(Lease, "_read", real_read)

    busy = {"n": 0}

    def conflict_once(self, data, *, create=False, if_match=None):
        if create and busy["n"] == 0:
            busy["n"] += 1
            raise OSError(errno.EBUSY, "ConditionalRequestConflict")
        return real_put(self, data, create=create, if_match=if_match)

    monkeypatch.setattr(Lease, "_put", conflict_once)
    racer = Lease(folder, "features::changing", ttl=30)
    racer.acquire()
    assert busy["n"] == 1 and json.loads(s3.cat_file(racer.path))["token"] == racer.token
    racer.release()

    def always_conflict(self, data, *, create=False, if_match=None):
        raise OSError(errno.EBUSY, "ConditionalRequestConflict")

    monkeypatch.setattr(Lease, "_put", always_conflict)
    with pytest.raises(LeaseBusy, match="kept changing"):
        Lease(folder, "features::changing", ttl=30).acquire()
    assert not s3.exists(racer.path)


def test_a_failed_server_check_leaves_no_lease_behind(s3, monkeypatch):
    """An I/O error while checking the server's conditional writes (after the lease object was made) gives
    the object back before the error propagates: the next writer is not kept waiting for its expiry."""
    import errno

    from embedcache.store.locking import lease as leases

    folder = f"s3://{BUCKET}/checkfail.embedcache/leases"
    monkeypatch.setattr(leases, "_checked_servers", set())  # this process has not checked the server yet
    real = Lease._check_server

    def network_down(self):
        raise OSError(errno.EIO, "connection reset while checking the server")

    monkeypatch.setattr(Lease, "_check_server", network_down)
    first = Lease(folder, "features::checkfail", ttl=30)
    with pytest.raises(OSError, match="connection reset"):
        first.acquire()
    assert not s3.exists(first.path)
    monkeypatch.setattr(Lease, "_check_server", real)
    second = Lease(folder, "features::checkfail", ttl=30)
    second.acquire()  # at once, no wait
    second.release()


def test_distributed_extract_from_an_s3_manifest_into_s3(s3, chula_cells, local_reference):
    """The issue's command: --data s3://.../manifest.parquet --out s3://.../cache.zarr --cluster local:2."""
    _, ref, ref_r = local_reference
    df = chula_cells.iloc[:40].copy()
    urls = []
    for p in df["path"]:
        key = f"{BUCKET}/dist/cells/{Path(p).name}"
        s3.put_file(p, key)
        urls.append(f"s3://{key}")
    s3.pipe_file(f"{BUCKET}/dist/manifest.parquet", df.assign(path=urls).to_parquet())
    out = f"s3://{BUCKET}/dist-cache.zarr"
    r = _extract(f"s3://{BUCKET}/dist/manifest.parquet", out, cluster="local:2")
    assert r.chunks_written == 3 and r.cells_computed == 40
    _same(ref, _feats(out, r.key))
    assert embedcache.verify(out).ok
    assert pd.Series(open_store(out).dataset().obs["path"]).str.startswith("s3://").all()


def test_best_effort_lease_where_there_are_no_conditional_writes():
    """A file system embedcache has no conditional writes for (here fsspec's memory://) gets a lease that is
    written, read back, refused to a second writer while fresh, taken over once expired; info says so."""
    from embedcache.store.locking.lease import LeaseBusy, guarantee

    folder = "memory://best-effort.embedcache/leases"
    first = Lease(folder, "features::x", ttl=30)
    first.acquire()
    second = Lease(folder, "features::x", ttl=30)
    with pytest.raises(LeaseBusy, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()  # given back: free
    doc = json.loads(second.fs.cat_file(second.path))
    second.fs.pipe_file(second.path, json.dumps({**doc, "token": "dead", "expires": time.time() - 1}).encode())
    second.release()  # the object is no longer its own: left in place
    assert json.loads(second.fs.cat_file(second.path))["token"] == "dead"
    third = Lease(folder, "features::x", ttl=30)
    third.acquire()  # expired: taken over
    assert json.loads(third.fs.cat_file(third.path))["token"] == third.token
    third.release()
    assert not third.fs.exists(third.path)
    assert guarantee(folder)["mechanism"] == "best-effort lease"
