"""A study's fits as Dask tasks (probes.engine.dask_fits, --scheduler): the tables of a local run, exactly.

A LocalCluster of 2 worker processes on the 832 bundled Chula cells (tiny random-init ViT)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import embedcache
from probes import scale
from probes.engine.dask_fits import fit_scheduler, parse_scheduler
from probes.errors import ProbeError
from probes.features.policy import memory_policy
from tests.conftest import REPO

MODEL = "timm:test_vit"
STUDY = dict(limits="16,48", probes="logistic,knn", seeds=2, quiet=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    root = tmp_path_factory.mktemp("dask")
    manifest = root / "chula.csv"
    df = chula_cells.copy()
    df["group"] = df["smear"]
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    kw = dict(weights="random", input_size=64, label_column="label_name", progress=False, num_workers=2)
    embedcache.extract(MODEL, manifest, out, chunk_size=128, batch_size=128, **kw)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A running cluster (2 worker processes), reached by its tcp:// address as a remote one would be;
    its workers run as many threads as this process (the local run) does."""
    import torch
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=torch.get_num_threads(), processes=True, dashboard_address=None
    ) as c:
        yield c.scheduler_address


def tables(res) -> dict[str, pd.DataFrame]:
    """The study's tables without the timings (a fit's seconds are the worker's)."""
    return {
        "results": res.results.drop(columns=["seconds", "study"]),
        "fits": res.fits.drop(columns=["seconds"]),
        "confusion": res.confusion,
        "curves": res.curves.drop(columns=["seconds"]),
    }


def assert_same(a, b) -> None:
    for name, table in tables(a).items():
        pd.testing.assert_frame_equal(table, tables(b)[name], check_exact=True, obj=name)


@pytest.mark.slow
def test_dask_fits_equal_the_local_run(store, cluster, tmp_path):
    assert cluster.startswith("tcp://")
    local = scale(store, MODEL, out=tmp_path / "local", **STUDY)
    with fit_scheduler(cluster):
        remote = scale(store, MODEL, out=tmp_path / "dask", **STUDY)
    assert len(remote.fits) == 2 * 2 * 2 and set(remote.fits["features"]) == {"in-memory"}
    assert_same(local, remote)


@pytest.mark.slow
def test_dask_fits_of_out_of_core_rows(store, cluster, tmp_path):
    """Rows read from the store travel as its URL; the workers read and fit them as a local run does."""
    with memory_policy("always", block_rows=100):
        local = scale(store, MODEL, out=tmp_path / "local", **STUDY)
        with fit_scheduler(cluster):
            remote = scale(store, MODEL, out=tmp_path / "dask", **STUDY)
    assert set(remote.fits["features"]) == {"out-of-core"}
    assert any("read their features out of core" in n for n in remote.notes)
    assert_same(local, remote)


def test_scheduler_specs():
    assert parse_scheduler("local:3") == ("local", 3) and parse_scheduler("tcp://head:8786") == (
        "address",
        "tcp://head:8786",
    )
    for bad in ("local:0", "local:x", "head:8786"):
        with pytest.raises(ProbeError, match="--scheduler"):
            parse_scheduler(bad)


@pytest.mark.slow
def test_cli_scheduler_and_out_of_core(store, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cli.probes_app", "scale", "--store", str(store), "--model", MODEL]
    cmd += ["--limits", "16", "--probes", "knn,logistic", "--seeds", "1", "--out", str(out), "--quiet"]
    p = subprocess.run(
        [*cmd, "--scheduler", "local:2", "--max-memory", "1KB"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "read their features out of core" in p.stdout
    fits = pd.read_csv(out / "fits.csv")
    assert set(fits["features"]) == {"out-of-core"} and len(fits) == 2
    p = subprocess.run([*cmd, "--scheduler", "head:1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "--scheduler" in p.stderr


def _frames(res) -> dict[str, pd.DataFrame]:
    """Every table of a study result, without timings."""
    out = {}
    for name, value in vars(res).items():
        if isinstance(value, pd.DataFrame):
            out[name] = value.drop(columns=[c for c in ("seconds", "study") if c in value.columns])
    return out


@pytest.mark.slow
def test_probability_studies_on_dask_equal_the_local_run(store, cluster, tmp_path):
    """calibrate, ensemble and selective send their fits (with the held-out split they need) as tasks."""
    from probes import calibrate, ensemble, selective

    runs = {
        "calibrate": lambda **kw: calibrate(store, MODEL, probes="logistic,knn", seeds=2, quiet=True, **kw),
        "ensemble": lambda **kw: ensemble(store, MODEL, heads="knn,logistic,cosine", seeds=1, quiet=True, **kw),
        "selective": lambda **kw: selective(store, MODEL, probes="logistic", seeds=1, quiet=True, **kw),
    }
    from distributed import Client, get_task_stream

    for name, run in runs.items():
        local = _frames(run(out=tmp_path / f"{name}-local"))
        with Client(cluster) as client, get_task_stream(client=client) as stream:
            remote = _frames(run(out=tmp_path / f"{name}-dask", scheduler=cluster))
        assert sum("fit_remote" in str(t["key"]) for t in stream.data) >= 1, name  # the fits ran on the cluster
        assert local.keys() == remote.keys() and local, name
        for table in local:
            pd.testing.assert_frame_equal(local[table], remote[table], obj=f"{name}.{table}")


@pytest.mark.slow
def test_audit_on_dask_equals_the_local_run(store, cluster, tmp_path):
    """Each backbone x probe x seed of the audit's out-of-fold fits is one task; the ranking is the local one."""
    from distributed import Client, get_task_stream

    from probes import audit

    kw = dict(probes="logistic,knn", joint=True, folds=3, seeds=1, k=5, cache=False, html=False, quiet=True)
    local = audit(store, MODEL, out=tmp_path / "local", **kw)
    with Client(cluster) as client, get_task_stream(client=client) as stream:
        remote = audit(store, MODEL, out=tmp_path / "dask", scheduler=cluster, **kw)
    assert sum("_oof_one" in str(t["key"]) for t in stream.data) == 3  # logistic, knn and the joint member, one seed
    pd.testing.assert_frame_equal(local.table, remote.table)
