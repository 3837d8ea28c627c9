"""Outputs never destroy what they replace or where they land (issue 26, case 7): an export is written beside
its target and renamed over it, so a SIGKILL leaves the previous export intact; no export or study output is
written inside a store's Zarr tree."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache.store import StoreError
from embedcache_cli.embedcache_app import app as embedcache_app
from embedcache_cli.probes_app import app as probes_app
from tests.paths import REPO

KILLED_EXPORT = """
import os, signal, sys, anndata
from embedcache.store.export import export_anndata

def write_half_then_die(self, path, *a, **k):
    with open(path, "wb") as f:
        f.write(b"\\x89HDF" + b"\\0" * 92)  # what the old in-place write left: 96 bytes
    os.kill(os.getpid(), signal.SIGKILL)

anndata.AnnData.write_h5ad = write_half_then_die
export_anndata(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    root = tmp_path_factory.mktemp("out")
    manifest = root / "cells.csv"
    chula_cells.iloc[:40].to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract("timm:test_vit", manifest, out, weights="random", input_size=32, progress=False, num_workers=0)
    return out


def test_a_killed_export_leaves_the_previous_export_intact(store, tmp_path):
    import anndata

    target = tmp_path / "cells.h5ad"
    embedcache.export_anndata(store, target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(store), str(target)], cwd=REPO)
    assert proc.returncode == -9
    assert target.read_bytes() == before  # the old code: a 96-byte file where the good export was
    assert anndata.read_h5ad(target).n_obs == 40


def test_an_export_into_the_store_is_refused(store):
    before = (store / "zarr.json").read_bytes()
    res = CliRunner().invoke(embedcache_app, ["export", str(store), "--anndata", str(store / "zarr.json")])
    assert res.exit_code == 1 and "inside the embedcache store" in res.output
    assert (store / "zarr.json").read_bytes() == before  # the old code overwrote the store's root metadata
    with pytest.raises(StoreError, match="inside the embedcache store"):
        embedcache.export_anndata(store, store.parent / "cache.zarr.embedcache" / "x.h5ad")


def test_study_outputs_inside_the_store_are_refused(store):
    res = CliRunner().invoke(
        probes_app, ["eval", "-s", str(store), "-m", "timm:test_vit", "--out", str(store / "eval")]
    )
    assert res.exit_code == 1 and "inside the embedcache store" in res.output
    assert not (store / "eval").exists()
    assert np.isfinite(embedcache.open_store(store).dataset().find_feature_set("timm:test_vit").to_numpy()).all()
