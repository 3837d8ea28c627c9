"""Errors of feature-set name resolution speak to Python callers too, not only in CLI flags (issue 28)."""

from __future__ import annotations

import pytest

import embedcache
from embedcache.store import StoreError
from probes import evaluate
from probes.errors import ProbeError

MODEL = "timm:test_vit"


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """Two clean sets of one backbone (32 and 48 px): the name alone is ambiguous."""
    root = tmp_path_factory.mktemp("nameerr")
    manifest = root / "cells.csv"
    chula_cells.iloc[:40].to_csv(manifest, index=False)
    out = root / "cache.zarr"
    for size in (32, 48):
        embedcache.extract(MODEL, manifest, out, weights="random", input_size=size, progress=False, num_workers=0)
    return out


def test_ambiguous_name_names_the_python_keyword_and_the_flag(store, tmp_path):
    ds = embedcache.open_store(store).dataset()
    with pytest.raises(StoreError) as e:
        ds.find_feature_set(MODEL)
    text = str(e.value)
    assert "model='timm-test_vit@random/32-bicubic'" in text and "--model timm-test_vit@random/32-bicubic" in text
    with pytest.raises(ProbeError, match=r"model=.* / --model"):
        evaluate(store, MODEL, probes="knn", out=tmp_path / "e", quiet=True)
    picked = evaluate(store, "timm-test_vit@random/48-bicubic", probes="knn", out=tmp_path / "f", quiet=True)
    assert set(picked.results["feature_key"]) == {"timm-test_vit@random/48-bicubic/clean"}


def test_unknown_name_says_how_to_extract_in_python_and_on_the_command_line(store):
    ds = embedcache.open_store(store).dataset()
    with pytest.raises(StoreError) as e:
        ds.find_feature_set("timm:no_such_vit")
    text = str(e.value)
    assert (
        "embedcache.extract('timm:no_such_vit', ...)" in text and "embedcache extract --model timm:no_such_vit" in text
    )
