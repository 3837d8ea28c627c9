"""Extraction on a Dask cluster: bitwise equal to one process, a SIGKILLed worker's chunks retried, a rerun
after the whole cluster died finishing only the missing chunks; real cells, a tiny random-init ViT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embedcache
from embedcache import open_store
from embedcache.extraction.distributed import ClusterError, parse_cluster
from tests.conftest import REPO

N_CELLS, CHUNK = 100, 8  # 13 row-chunks
ARRAYS = ("cls", "mean", "crc_cls", "crc_mean", "crc_rows", "ok", "error", "done_cls", "done_mean")
KW = dict(weights="random", input_size=32, chunk_size=CHUNK, batch_size=4, pool="cls,mean", progress=False)


def _extract(data, out, **kw):
    return embedcache.extract("timm:test_vit", data, out, **{**KW, "num_workers": 0, **kw})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, chula_cells) -> Path:
    """100 bundled Chula cells and one missing image (recorded as skipped under on_error='skip')."""
    df = chula_cells.iloc[:N_CELLS].copy()
    df.loc[df.index[37], "path"] = str(Path(df["path"].iat[37]).with_name("no_such_cell.jpg"))
    path = tmp_path_factory.mktemp("dist") / "manifest.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, manifest):
    """The single-process run that every distributed one must equal, bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "cache.zarr"
    r = _extract(manifest, out, on_error="skip")
    assert r.chunks_written == 13 and len(r.skipped) == 1
    return out, r


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, one thread each, shared by the tests of this module."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as lc:
        with Client(lc) as client:
            yield lc, client


def _arrays(out: Path, key: str) -> dict[str, np.ndarray]:
    fs = open_store(out).dataset().feature_set(key)
    return {name: np.asarray(fs.group[name][:]) for name in ARRAYS}


def _assert_same(a: Path, b: Path, key: str) -> None:
    x, y = _arrays(a, key), _arrays(b, key)
    for name in ARRAYS:
        assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), name


@pytest.mark.slow
def test_distributed_run_is_bitwise_equal_to_one_process(tmp_path, manifest, reference, cluster, capsys):
    ref_out, ref = reference
    lc, _ = cluster
    out = tmp_path / "cache.zarr"
    r = _extract(manifest, out, on_error="skip", scheduler=lc.scheduler_address, progress=True)
    assert r.key == ref.key and r.chunks_written == 13 and r.cells_computed == N_CELLS
    assert r.skipped == ref.skipped and "missing file" in r.skipped[0][1]
    _assert_same(ref_out, out, r.key)
    assert embedcache.verify(out).ok
    # one progress display over the whole job, ending at all cells
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "2 workers" in ln or "Dask" in ln]
    assert lines and f"{N_CELLS}/{N_CELLS} cells" in lines[-1]
    # rerun on the cluster: a cache hit, nothing submitted
    again = _extract(manifest, out, on_error="skip", scheduler=lc.scheduler_address)
    assert again.cache_hit and again.chunks_written == 0


@pytest.mark.slow
def test_a_sigkilled_worker_has_its_chunks_retried(tmp_path, manifest, reference, cluster):
    ref_out, ref = reference
    lc, client = cluster
    before = client.run(os.getpid)
    victim = sorted(before)[0]
    # only this worker process (not its nanny, so not its replacement) dies, at its second chunk write,
    # after the chunk's data is written and before its flags are: the chunk must be redone elsewhere
    client.run(lambda: os.environ.__setitem__("EMBEDCACHE_KILL_AT", "chunk:data-written#2"), workers=[victim])
    out = tmp_path / "cache.zarr"
    r = _extract(manifest, out, on_error="skip", scheduler=lc.scheduler_address)
    client.wait_for_workers(2, timeout=60)
    after = client.run(os.getpid)
    assert before[victim] not in after.values(), "the worker was not killed: the test did not test a retry"
    assert r.cells_computed == N_CELLS and r.skipped == ref.skipped
    _assert_same(ref_out, out, r.key)
    assert embedcache.verify(out).ok


@pytest.mark.slow
def test_rerun_after_the_whole_cluster_died_computes_only_missing_chunks(tmp_path, manifest, reference, cluster):
    ref_out, ref = reference
    out = tmp_path / "cache.zarr"
    env = {k: v for k, v in os.environ.items() if k != "EMBEDCACHE_KILL_AT"}
    env["EMBEDCACHE_KILL_AT"] = "distributed:chunk-finished#3"  # the driver (and its scheduler) die mid-job
    env["PYTHONPATH"] = str(REPO)
    args = ["extract", "-m", "timm:test_vit", "-d", str(manifest), "-o", str(out), "--weights", "random"]
    args += ["--input-size", "32", "--chunk-size", str(CHUNK), "--batch-size", "4", "--pool", "cls,mean"]
    args += ["--on-error", "skip", "--cluster", "local:2", "--num-workers", "0", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.embedcache_app", *args],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        with pytest.raises(ProcessLookupError):  # the whole cluster dies: every worker process with it
            for _ in range(50):
                os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.1)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    fs = open_store(out).dataset().feature_set(ref.key)
    done = int(fs.done("cls").sum())
    assert 3 <= done < 13
    r = _extract(manifest, out, on_error="skip", scheduler=cluster[0].scheduler_address)
    assert not r.cache_hit and r.chunks_written == 13 - done
    _assert_same(ref_out, out, r.key)


def test_memory_stores_and_bad_cluster_specs_are_refused(manifest):
    with pytest.raises(ClusterError, match="memory:// store.*cannot write"):
        _extract(manifest, "memory://dist/cache.zarr", cluster="local:2")
    with pytest.raises(ClusterError, match="local or local:N"):
        _extract(manifest, "unused.zarr", cluster="slurm:4")
    with pytest.raises(ClusterError, match="not both"):
        _extract(manifest, "unused.zarr", cluster="local:2", scheduler="tcp://127.0.0.1:1")
    assert parse_cluster("local:3") == 3 and parse_cluster("local") >= 1
    assert not Path("unused.zarr").exists()


@pytest.mark.slow
def test_perturbed_sets_and_in_memory_cells_run_on_the_cluster(tmp_path, chula_cells, cluster):
    """Arrays are shipped to the workers; each perturbation is its own set, equal to one process's."""
    from PIL import Image

    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((48, 48))) for p in chula_cells["path"][:40]])
    kw = dict(labels=chula_cells["label"].iloc[:40].to_numpy(), dataset="arrays", perturb=["blur-post:0.8"])
    a = _extract(images, tmp_path / "a.zarr", **kw)
    b = _extract(images, tmp_path / "b.zarr", scheduler=cluster[0].scheduler_address, **kw)
    assert len(b.variants) == 1
    for ra, rb in [(a, b), *zip(a.variants, b.variants)]:
        assert ra.key == rb.key and rb.chunks_written == ra.chunks_written == 5
        _assert_same(tmp_path / "a.zarr", tmp_path / "b.zarr", rb.key)


# -- GPU pinning (no GPU here: the CUDA runtime and dask-cuda are stand-ins, the choice is ours) ------
def test_workers_pin_one_gpu_each(monkeypatch):
    """LocalCluster workers 0..N-1 take GPU ``name % count``; a dask-cuda worker (which sees only its own
    GPU) takes device 0; a worker without a GPU under a CUDA driver is a clear error; CPU stays CPU."""
    import types

    import distributed
    import torch

    from embedcache.extraction import distributed as dist

    assert dist._worker_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ClusterError, match="has no GPU"):
        dist._worker_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, name, want in ((4, 0, 0), (4, 3, 3), (4, 5, 1), (2, "tcp-worker-7", 1), (1, 2, 0)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        monkeypatch.setattr(distributed, "get_worker", lambda name=name: types.SimpleNamespace(name=name))
        assert dist._worker_device("cuda") == torch.device("cuda", want), (count, name)

    def outside_a_worker():
        raise ValueError("no worker found")

    monkeypatch.setattr(distributed, "get_worker", outside_a_worker)
    assert dist._worker_device("cuda") == torch.device("cuda", 0)


def test_cuda_driver_asks_dask_cuda_for_one_gpu_per_worker(monkeypatch):
    """With dask-cuda installed the local cluster is its LocalCUDACluster (one GPU, one thread per
    worker); without it, None (the caller then starts a LocalCluster)."""
    import types

    from embedcache.extraction import distributed as dist

    made = {}

    class FakeLocalCUDACluster:
        def __init__(self, **kw):
            made.update(kw)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeLocalCUDACluster))
    assert isinstance(dist._cuda_cluster(3), FakeLocalCUDACluster)
    assert made["n_workers"] == 3 and made["threads_per_worker"] == 1
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed: import fails
    assert dist._cuda_cluster(3) is None


def test_a_task_is_sent_its_own_cells_only(chula_cells, tmp_path):
    """What one Dask task gets: its chunk's ids, paths (and images), indexed by row numbers in the whole
    source, so a 10^7-cell table is never sent whole to every worker; rows outside it are refused."""
    import pickle

    from embedcache.inputs.sources import open_source

    chula_cells.to_csv(tmp_path / "cells.csv", index=False)
    whole = open_source(tmp_path / "cells.csv", label_column="label_name")
    part = whole.rows(16, 24)
    assert list(part.table.columns) == ["id", "path"] and len(part) == 8
    for i in (16, 20, 23):
        assert part.cell_id(i) == whole.cell_id(i) and part.cell_path(i) == whole.cell_path(i)
        np.testing.assert_array_equal(part.load(i), whole.load(i))
    for outside in (15, 24):
        with pytest.raises(IndexError, match="not among rows 16..23"):
            part.load(outside)
    assert len(pickle.dumps(part)) < len(pickle.dumps(whole)) / 20
    images = np.random.default_rng(0).integers(0, 255, size=(10, 8, 8, 3), dtype=np.uint8)
    arrays = open_source(images)
    np.testing.assert_array_equal(arrays.rows(5, 10).load(7), arrays.load(7))


@pytest.mark.slow
def test_compile_happens_once_per_backbone_per_process(manifest, tmp_path, monkeypatch):
    """--compile: a process that computes many chunks (a Dask worker: one task each) or extracts twice with
    one loaded backbone compiles it once; the features are those of the plain model (the compiler here is a
    counting stand-in: no C compiler is needed to check when compilation is asked for)."""
    import torch

    from embedcache.backbones.loading import load_backbone

    calls = []

    def counting_compile(fn, **kw):
        calls.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", counting_compile)
    bb = load_backbone("timm:test_vit", weights="random")
    done = [_extract(manifest, tmp_path / out, backbone=bb, compile=True, on_error="skip") for out in ("a", "b")]
    plain = _extract(manifest, tmp_path / "plain", backbone=bb, on_error="skip")
    assert len(calls) == 1 and calls[0] == {"dynamic": False}
    got = [open_store(r.store).dataset().feature_set(r.key).to_numpy("cls") for r in (done[0], plain)]
    np.testing.assert_array_equal(got[0], got[1])
