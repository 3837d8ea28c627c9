"""A killed extraction resumes only on the images it started with (issue 26, case 5): every cell's input is
fingerprinted (file size and mtime) with its chunk, and a resume whose done chunks' images changed is refused
naming the cells, or, with ``on_input_change="recompute"``, computes those chunks again."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import embedcache
from embedcache import ExtractionError
from tests.paths import REPO

KW = dict(weights="random", input_size=32, chunk_size=16, batch_size=16, num_workers=0, progress=False)
CHILD = (
    "import sys, embedcache; embedcache.extract('timm:test_vit', sys.argv[1], sys.argv[2], weights='random', "
    "input_size=32, chunk_size=16, batch_size=16, num_workers=0, progress=False)"
)


@pytest.fixture
def cells(tmp_path, chula_cells):
    """64 real cells copied (as PNG) into a folder of their own, so the test may change them."""
    folder = tmp_path / "cells"
    folder.mkdir()
    rows = chula_cells.iloc[:64]
    paths = []
    for i, p in enumerate(rows["path"]):
        out = folder / f"c{i:03d}.png"
        Image.open(p).convert("RGB").save(out)
        paths.append(str(out))
    manifest = tmp_path / "cells.csv"
    rows.assign(path=paths).to_csv(manifest, index=False)
    return manifest, paths


def _killed_after_two_chunks(manifest, store):
    env = dict(os.environ, EMBEDCACHE_KILL_AT="chunk:done#2")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(manifest), str(store)], cwd=REPO, env=env)
    assert proc.returncode == -9  # SIGKILL, two of four chunks written and flagged
    fs = embedcache.open_store(store).dataset().feature_set("timm-test_vit@random/32-bicubic/clean")
    assert fs.pending_chunks(["cls"]) == [2, 3]


def _flip_all(paths):
    for p in paths:
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p)


def test_a_resume_on_changed_images_is_refused_naming_the_cells(cells, tmp_path):
    manifest, paths = cells
    store = tmp_path / "cache.zarr"
    _killed_after_two_chunks(manifest, store)
    _flip_all(paths)  # the old code resumed: chunks 0-1 of the old images, 2-3 of the new, "complete"
    with pytest.raises(ExtractionError, match=r"images of 32 cells changed.*on-input-change recompute"):
        embedcache.extract("timm:test_vit", manifest, store, **KW)


@pytest.mark.slow  # two SIGKILLed processes and three extractions
def test_recompute_gives_the_features_of_the_images_now(cells, tmp_path):
    manifest, paths = cells
    store = tmp_path / "cache.zarr"
    _killed_after_two_chunks(manifest, store)
    _flip_all(paths)
    r = embedcache.extract("timm:test_vit", manifest, store, on_input_change="recompute", **KW)
    assert r.chunks_written == 4
    fresh = embedcache.extract("timm:test_vit", manifest, tmp_path / "fresh.zarr", **KW)
    a = embedcache.open_store(store).dataset().feature_set(r.key).to_numpy("cls")
    b = embedcache.open_store(tmp_path / "fresh.zarr").dataset().feature_set(fresh.key).to_numpy("cls")
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_an_unchanged_resume_goes_on(cells, tmp_path):
    manifest, _ = cells
    store = tmp_path / "cache.zarr"
    _killed_after_two_chunks(manifest, store)
    assert embedcache.extract("timm:test_vit", manifest, store, **KW).chunks_written == 2
