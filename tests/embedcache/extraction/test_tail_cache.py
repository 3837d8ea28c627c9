"""``extract --tail-blocks k``: the tokens entering the last k blocks, cached beside the features with
the same guarantees (chunk-aligned, checksummed, done flags, SIGKILL-safe resume, cache hit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import embedcache
from embedcache.backbones.tail import TailError, TailModule
from embedcache.store import open_store
from tests.paths import REPO as _REPO

REPO = _REPO
KW = dict(weights="random", input_size=32, chunk_size=16, batch_size=8, num_workers=0, progress=False)


@pytest.fixture
def cells(tmp_path, chula_cells):
    path = tmp_path / "cells.csv"
    chula_cells.iloc[:48].to_csv(path, index=False)
    return path


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("model,pool", [("timm:test_vit", "cls"), ("timm:test_resnet", "mean")])
def test_tail_on_cached_tokens_reproduces_the_stored_features(tmp_path, cells, model, pool):
    r = embedcache.extract(model, cells, tmp_path / "c.zarr", tail_blocks=1, pool=pool, **KW)
    fs = open_store(tmp_path / "c.zarr").dataset().feature_set(r.key)
    assert fs.token_sets == ["tokens_k1"] and fs.is_complete()
    tokens = fs.tokens(1).read(np.arange(48))
    assert tokens.dtype == np.float16 and len(tokens) == 48
    bb = embedcache.load_backbone(model, weights="random")
    with torch.inference_mode():
        again = TailModule(bb, 1, pool=pool).eval()(torch.from_numpy(tokens.astype(np.float32))).numpy()
    stored = fs.to_numpy(pool)
    assert _cos(again, stored).min() > 0.999
    # the same features as an extract without tokens (one forward pass either way)
    plain = embedcache.extract(model, cells, tmp_path / "plain.zarr", pool=pool, **KW)
    ref = open_store(tmp_path / "plain.zarr").dataset().feature_set(plain.key).to_numpy(pool)
    np.testing.assert_allclose(stored, ref, rtol=0, atol=2e-3)
    assert embedcache.extract(model, cells, tmp_path / "c.zarr", tail_blocks=1, pool=pool, **KW).cache_hit


def test_tokens_are_added_to_an_existing_feature_set(tmp_path, cells, capsys):
    first = embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", **KW)
    fs = open_store(tmp_path / "c.zarr").dataset().feature_set(first.key)
    before = fs.to_numpy("cls", dtype=np.float16)
    with pytest.raises(embedcache.StoreError, match="--tail-blocks 1"):
        fs.tokens(1)
    added = embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", tail_blocks=1, **{**KW, "progress": True})
    assert added.key == first.key and not added.cache_hit
    assert "KB per cell" in capsys.readouterr().err  # the size is said before starting
    fs = open_store(tmp_path / "c.zarr").dataset().feature_set(first.key)
    assert np.allclose(fs.to_numpy("cls", dtype=np.float16), before, atol=2e-3)
    assert fs.tokens(1).shape[1:] == embedcache.backbones.tail.tail_token_shape(
        embedcache.load_backbone("timm:test_vit", weights="random"), 1, 32
    )


def test_tail_blocks_beyond_the_depth_is_refused_before_anything_is_written(tmp_path, cells):
    with pytest.raises(TailError, match="with 6 blocks: use 1..6"):
        embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", tail_blocks=99, **KW)
    assert not (tmp_path / "c.zarr").exists()


KILLED = """
import embedcache
embedcache.extract("timm:test_vit", "cells.csv", "c.zarr", weights="random", input_size=32, chunk_size=16,
                   batch_size=8, num_workers=0, progress=False, tail_blocks=1)
"""


@pytest.mark.slow
def test_killed_tail_token_extraction_resumes_to_the_uninterrupted_result(tmp_path, cells):
    env = dict(
        os.environ,
        EMBEDCACHE_KILL_AT="chunk:done#2",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    fs = open_store(tmp_path / "c.zarr").dataset().feature_set("timm-test_vit@random/32-bicubic/clean")
    assert fs.done("tokens_k1").tolist() == [True, True, False]
    resumed = embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", tail_blocks=1, **KW)
    assert resumed.chunks_written == 1
    whole = embedcache.extract("timm:test_vit", cells, tmp_path / "whole.zarr", tail_blocks=1, **KW)
    a = open_store(tmp_path / "c.zarr").dataset().feature_set(resumed.key)
    b = open_store(tmp_path / "whole.zarr").dataset().feature_set(whole.key)
    rows = np.arange(48)
    assert np.array_equal(a.tokens(1).read(rows), b.tokens(1).read(rows))
    assert np.array_equal(a.to_numpy("cls", dtype=np.float16), b.to_numpy("cls", dtype=np.float16))
    assert embedcache.verify(str(tmp_path / "c.zarr")).ok


def test_a_saved_adapter_embeds_new_images_into_its_own_feature_set_and_answers_image_queries(tmp_path, cells):
    """The tuned model is usable: fine-tune on cached tokens, save the adapter, extract new cells with it,
    and query the tuned feature set by image."""
    from embedcache.extraction.new_images import embed_images
    from probes.tuning import FineTuneProbe

    r = embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", tail_blocks=1, **KW)
    ds = open_store(tmp_path / "c.zarr").dataset()
    fs = ds.feature_set(r.key)
    bb = embedcache.load_backbone("timm:test_vit", weights="random")
    probe = FineTuneProbe(bb, method="ft-last", k=1, epochs=2, batch_size=16, lr=1e-2, device="cpu")
    probe.fit(fs.tokens(1), ds.obs["label"].to_numpy(dtype=str))
    probe.save_adapter(tmp_path / "run")
    tuned = embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", adapter=tmp_path / "run", **KW)
    assert tuned.key != r.key and tuned.key.startswith("timm-test_vit@random+ft-last@")
    ds = open_store(tmp_path / "c.zarr").dataset()
    base, new = ds.feature_set(r.key).to_numpy("cls"), ds.feature_set(tuned.key).to_numpy("cls")
    assert not np.allclose(base, new, atol=1e-2)  # the tuned model, not the base one
    with torch.no_grad():  # the same as the in-memory tuned model on the same cached tokens
        mem = probe.net_.trunk.embed(torch.from_numpy(fs.tokens(1).read(np.arange(48)).astype(np.float32)), ["cls"])
    assert _cos(mem["cls"].numpy(), new).min() > 0.999
    paths = ds.obs["path"].tolist()[:3]
    queried = embed_images(ds.feature_set(tuned.key), paths, "cls", device="cpu")
    np.testing.assert_allclose(queried, new[:3], atol=2e-3)  # the adapter is re-applied for queries
    assert embedcache.extract("timm:test_vit", cells, tmp_path / "c.zarr", adapter=tmp_path / "run", **KW).cache_hit
