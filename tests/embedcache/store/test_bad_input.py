"""Bad input gets a clear error up front (issue 26, the less severe cases): every numeric option is checked
declaratively by its options object before anything is written; metadata that cannot be parsed or that
disagrees with its arrays names itself; a feature set read without a pooling uses its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache.store import StoreError
from embedcache.store.records import MetadataAltered
from embedcache.store.verify import verify
from embedcache_cli.embedcache_app import app


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--batch-size", "-1", "batch_size must be >= 1, got -1"),  # the old code exited 0 having written nothing
        ("--batch-size", "0", "batch_size must be >= 1, got 0"),
        ("--chunk-size", "0", "chunk_size must be >= 1, got 0"),  # the old code: integer division or modulo by zero
        ("--chunk-size", "-5", "chunk_size must be >= 1"),
        ("--input-size", "0", "input_size must be >= 8, got 0"),  # the old code silently used the default
        ("--working-size", "2", "working_size must be >= 4"),
    ],
)
def test_numeric_options_are_refused_before_anything_is_written(tmp_path, chula_subset, flag, value, match):
    out = tmp_path / "c.zarr"
    args = ["extract", "-m", "timm:test_vit", "--weights", "random", "-d", str(chula_subset(8)), "-o", str(out)]
    res = CliRunner().invoke(app, [*args, flag, value, "-q"])
    assert res.exit_code == 1 and match in res.output, res.output
    assert f"({flag} on the command line)" in res.output
    assert not out.exists()  # the old code left a store behind for --chunk-size 0


def test_python_options_speak_python(tmp_path, chula_subset):
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0 \(--batch-size on the command line\)"):
        embedcache.extract("timm:test_vit", chula_subset(8), tmp_path / "c.zarr", weights="random", batch_size=0)
    with pytest.raises(TypeError, match="unknown option.*batchsize.*it has: dataset"):
        embedcache.extract("timm:test_vit", chula_subset(8), tmp_path / "c.zarr", weights="random", batchsize=8)


@pytest.fixture
def store(tmp_path):
    out = tmp_path / "c.zarr"
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    embedcache.import_features(out, {"mean": x}, labels=["a", "b"] * 20, backbone="cnn", chunk_size=16)
    return out


def test_a_truncated_metadata_file_is_named_and_repaired(store):
    meta = store / "cells" / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # the old code: the JSON parser's message
    st = embedcache.open_store(store)
    assert st.datasets() == [] and st.lost_datasets() == ["cells"]
    assert verify(str(store), repair=True).restored and verify(str(store)).ok
    root = store / "zarr.json"
    root.write_text(root.read_text()[:40])
    with pytest.raises(StoreError, match=r"root metadata .* cannot be read .*verify .*--repair"):
        embedcache.open_store(store)
    assert verify(str(store), repair=True).restored and verify(str(store)).ok
    assert embedcache.open_store(store).dataset().feature_keys() == ["cnn/imported/clean"]


def test_edited_n_or_chunk_size_attributes_are_named(store):
    meta = store / "cells" / "features" / "cnn" / "imported" / "clean" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["chunk_size"] = 10  # the old code: "operands could not be broadcast"
    meta.write_text(json.dumps(doc))
    with pytest.raises(MetadataAltered, match="chunks of 10, its arrays hold 40 in chunks of 16"):
        embedcache.open_store(store).dataset().feature_set("cnn/imported/clean")


def test_a_set_read_without_a_pooling_uses_its_own(store):
    fs = embedcache.open_store(store).dataset().feature_set("cnn/imported/clean")
    assert fs.pools == ["mean"] and fs.to_numpy().shape == (40, 8)  # the old code: KeyError: 'done_cls'
    with pytest.raises(StoreError, match="has no 'cls' features \\(has: mean\\)"):
        fs.to_numpy("cls")
    lazy = fs.to_dask()
    assert lazy.dtype == np.float32 and np.isfinite(float(lazy.sum().compute()))
