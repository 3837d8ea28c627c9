"""Extraction records each cell's pixel digest, so exact duplicates are found without reading an image again."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import embedcache
from embedcache.inputs.images import pixel_digest
from embedcache.store.errors import StoreError


def test_extract_records_the_digest_of_the_decoded_pixels(tmp_path, chula_cells):
    cells = chula_cells.iloc[:12].copy()
    copy = tmp_path / "copy-of-first.png"  # the same pixels in another file and format
    Image.open(cells["path"].iat[0]).convert("RGB").save(copy)
    shutil.copy(cells["path"].iat[1], tmp_path / "same-file.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    extra = pd.DataFrame({"path": [str(copy), str(tmp_path / "same-file.jpg"), str(bad)], "label": ["x", "x", "x"]})
    manifest = tmp_path / "cells.csv"
    pd.concat([cells[["path", "label"]], extra], ignore_index=True).to_csv(manifest, index=False)
    out = tmp_path / "s.zarr"
    kw = dict(weights="random", progress=False, num_workers=0, input_size=32, on_error="skip")
    embedcache.extract("timm:test_vit", manifest, out, **kw)
    embedcache.extract("timm:test_vit", manifest, out, perturb="blur-pre:1.6", **kw)
    ds = embedcache.open_store(out).dataset()
    clean, blurred = (ds.feature_set(k) for k in ds.feature_keys())
    digests = clean.pixel_digests()
    expected = [pixel_digest(np.asarray(Image.open(p).convert("RGB"))) for p in cells["path"]]
    assert digests[:12].tolist() == expected  # the pixels as decoded, before any resize
    assert digests[12] == digests[0] and digests[13] == digests[1]  # PNG copy, copied file
    assert digests[14] == 0 and len(set(digests[:12].tolist())) == 12  # unreadable: none; distinct cells differ
    np.testing.assert_array_equal(blurred.pixel_digests(), digests)  # of the pixels before the perturbation
    np.testing.assert_array_equal(clean.pixel_digests(np.array([13, 0])), digests[[13, 0]])


def test_imported_features_have_no_digests(tmp_path):
    """Imported features come without images: every digest is 0 (not recorded), never a made-up one."""
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    out = tmp_path / "imported.zarr"
    cells = pd.DataFrame({"id": [f"c{i}" for i in range(20)], "label": ["a", "b"] * 10})
    res = embedcache.import_features(out, x, cells, backbone="mine")
    fs = embedcache.open_store(out).dataset().feature_set(res.key)
    assert (fs.pixel_digests() == 0).all()


def test_a_set_written_before_digests_says_so(tmp_path, chula_subset, monkeypatch):
    from embedcache.store import feature_set

    out = tmp_path / "old.zarr"
    embedcache.extract("timm:test_vit", chula_subset(8), out, weights="random", progress=False, input_size=32)
    fs = embedcache.open_store(out).dataset().feature_set(embedcache.open_store(out).dataset().feature_keys()[0])
    monkeypatch.setattr(feature_set.FeatureSet, "records_pixels", property(lambda self: False))
    with pytest.raises(StoreError, match="records no pixel digests"):
        fs.pixel_digests()
