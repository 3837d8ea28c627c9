"""Importing features computed elsewhere: studies read them like extracted ones, nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache.extraction.importing import NON_FINITE
from embedcache.store import FeatureSetConflict, StoreBusyError, StoreError
from probes import evaluate
from probes.features.cells import open_cells
from tests.conftest import REPO

MODEL = "timm:test_vit"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, chula_cells):
    """600 of the bundled real Chula cells extracted with a tiny random-init ViT: (store, features, obs)."""
    root = tmp_path_factory.mktemp("import")
    df = chula_cells.sample(600, random_state=1).copy()
    df["group"] = df["smear"]
    manifest = root / "cells.csv"
    df.to_csv(manifest, index=False)
    out = root / "extracted.zarr"
    embedcache.extract(
        MODEL,
        manifest,
        out,
        weights="random",
        input_size=32,
        progress=False,
        num_workers=2,
        chunk_size=256,
        batch_size=128,
    )
    ds = embedcache.open_store(out).dataset()
    return out, ds.find_feature_set(MODEL).to_numpy("cls"), ds.obs


def test_imported_features_study_exactly_like_extracted_ones(extracted, tmp_path):
    store, X, obs = extracted
    r = embedcache.import_features(tmp_path / "mine.zarr", X, obs, backbone="mine", chunk_size=100)
    assert (r.key, r.n_cells, r.chunks_written, r.not_ok, r.cache_hit) == ("mine/imported/clean", 600, 6, 0, False)
    ds = embedcache.open_store(tmp_path / "mine.zarr").dataset()
    fs = ds.find_feature_set("mine")
    assert np.array_equal(fs.to_numpy("cls"), X) and fs.ok().all() and fs.is_complete()
    pd.testing.assert_frame_equal(ds.obs, obs)

    kw = dict(probes="logistic,knn", seeds=2, quiet=True)
    theirs = evaluate(store, MODEL, out=tmp_path / "a", **kw).results
    ours = evaluate(tmp_path / "mine.zarr", "mine", out=tmp_path / "b", **kw).results
    cols = ["probe", "seed", "metric", "class", "value", "n_train", "n_test"]
    pd.testing.assert_frame_equal(ours[cols].reset_index(drop=True), theirs[cols].reset_index(drop=True))


def test_same_import_is_a_cache_hit_other_features_conflict(extracted, tmp_path):
    _, X, obs = extracted
    out = tmp_path / "s.zarr"
    embedcache.import_features(out, X, obs, backbone="mine")
    assert embedcache.import_features(out, X, obs, backbone="mine").cache_hit
    with pytest.raises(FeatureSetConflict, match="imported_sha256"):
        embedcache.import_features(out, X * 2, obs, backbone="mine")
    # a second backbone's features for the same cells sit beside the first
    embedcache.import_features(out, X[:, :16].copy(), obs, backbone="other")
    assert embedcache.open_store(out).dataset().feature_keys() == ["mine/imported/clean", "other/imported/clean"]
    with pytest.raises(StoreError, match="different cell list"):
        embedcache.import_features(out, X[:500], obs.iloc[:500], backbone="third")


# A real import in a child process that stops half-way through writing chunk 2 (half its rows written,
# with wrong values, its done flag unset) and waits there to be SIGKILLed.
_PAUSED_IMPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    import embedcache
    from embedcache.store import FeatureSet

    features, cells, out, marker = sys.argv[1:5]
    write = FeatureSet.write_chunk

    def write_then_stall(self, c, values, ok, error):
        if c == 2:
            rows = self.chunk_rows(c)
            half = slice(rows.start, rows.start + (rows.stop - rows.start) // 2)
            for pool, v in values.items():
                self.group[pool][half] = -v[: half.stop - half.start] - 1
            Path(marker).touch()
            time.sleep(600)
        write(self, c, values, ok, error)

    FeatureSet.write_chunk = write_then_stall
    embedcache.import_features(out, np.load(features), cells, backbone="mine", chunk_size=128)
""")


def test_sigkilled_import_resumes_only_missing_chunks_and_equals_an_uninterrupted_one(extracted, tmp_path):
    _, X, obs = extracted
    np.save(tmp_path / "f.npy", X)
    cells = tmp_path / "cells.csv"
    obs.to_csv(cells, index=False)
    out, marker = tmp_path / "killed.zarr", tmp_path / "stalled"
    cmd = [sys.executable, "-c", _PAUSED_IMPORT, str(tmp_path / "f.npy"), str(cells), str(out), str(marker)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the child import never reached chunk 2"
            time.sleep(0.02)
        # while it runs, a second writer of the same feature set is refused with a clear message
        with pytest.raises(StoreBusyError, match="another embedcache process"):
            embedcache.import_features(out, X, cells, backbone="mine", chunk_size=128)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    fs = embedcache.open_store(out).dataset().find_feature_set("mine")  # opens after SIGKILL
    assert fs.n_chunks == 5 and fs.done("cls").tolist() == [True, True, False, False, False]
    with pytest.raises(StoreError, match="incomplete"):
        fs.to_numpy("cls")
    r = embedcache.import_features(out, X, cells, backbone="mine", chunk_size=128)  # the flock died with the child
    assert (r.cache_hit, r.chunks_written, r.n_cells) == (False, 3, 600)
    clean = embedcache.import_features(tmp_path / "clean.zarr", X, cells, backbone="mine", chunk_size=128)
    assert clean.chunks_written == 5
    a = embedcache.open_store(out).dataset()
    b = embedcache.open_store(tmp_path / "clean.zarr").dataset()
    fa, fb = a.find_feature_set("mine"), b.find_feature_set("mine")
    np.testing.assert_array_equal(fa.to_numpy("cls"), fb.to_numpy("cls"))
    np.testing.assert_array_equal(fa.to_numpy("cls"), X.astype(np.float16).astype(np.float32))
    assert fa.ok().all() and (fa.errors() == fb.errors()).all()
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert embedcache.import_features(out, X, cells, backbone="mine", chunk_size=128).cache_hit


def test_nan_rows_are_recorded_not_ok_and_excluded_by_studies(extracted, tmp_path):
    _, X, obs = extracted
    X = X.copy()
    X[[3, 70], 5] = np.nan
    X[100, 0] = np.inf
    r = embedcache.import_features(tmp_path / "s.zarr", X, obs, backbone="mine")
    assert r.not_ok == 3
    fs = embedcache.open_store(tmp_path / "s.zarr").dataset().find_feature_set("mine")
    assert np.flatnonzero(~fs.ok()).tolist() == [3, 70, 100]
    assert set(fs.errors().iloc[[3, 70, 100]]) == {NON_FINITE}
    cells = open_cells(tmp_path / "s.zarr", "mine")
    assert cells.excluded["not_ok:mine"] == 3 and len(cells.obs) == 597
    assert "3 of 600 cells excluded: not ok in mine (unreadable image or NaN/inf features" in cells.exclusion_lines()[0]


def test_bad_imports_are_clear_errors(tmp_path):
    X = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="50 feature rows but 40 labels"):
        embedcache.import_features(tmp_path / "a.zarr", X, labels=["a"] * 40, backbone="m")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        embedcache.import_features(tmp_path / "a.zarr", X[0], backbone="m")
    with pytest.raises(ValueError, match="floating point"):
        embedcache.import_features(tmp_path / "a.zarr", X.astype(int), backbone="m")
    big = X.copy()
    big[7, 2] = 1e6
    with pytest.raises(ValueError, match="row 7 .*float16 range.*store_dtype='float32'"):
        embedcache.import_features(tmp_path / "a.zarr", big, backbone="m")
    r = embedcache.import_features(
        tmp_path / "b.zarr", big, labels=["a", "b"] * 25, backbone="m", store_dtype="float32"
    )
    assert embedcache.open_store(tmp_path / "b.zarr").dataset().find_feature_set("m").to_numpy()[7, 2] == 1e6
    assert r.n_cells == 50
    with pytest.raises(ValueError, match="unique"):
        embedcache.import_features(tmp_path / "c.zarr", X, pd.DataFrame({"id": ["x"] * 50}), backbone="m")


def test_imported_features_cannot_embed_new_images(extracted, tmp_path):
    from embedcache.extraction.new_images import embed_images

    _, X, obs = extracted
    embedcache.import_features(tmp_path / "s.zarr", X, obs, backbone="mine")
    fs = embedcache.open_store(tmp_path / "s.zarr").dataset().find_feature_set("mine")
    with pytest.raises(StoreError, match="imported features"):
        embed_images(fs, [obs["path"].iat[0]])


def test_cli_import_npz_with_two_pools(extracted, tmp_path):
    from embedcache_cli.embedcache_app import app

    _, X, obs = extracted
    np.savez(tmp_path / "f.npz", cls=X, mean=X[:, ::-1])
    obs.to_csv(tmp_path / "cells.csv", index=False)
    args = [
        "import",
        "--features",
        str(tmp_path / "f.npz"),
        "--cells",
        str(tmp_path / "cells.csv"),
        "--model",
        "mine",
        "--out",
        str(tmp_path / "s.zarr"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "wrote" in r.output, r.output
    fs = embedcache.open_store(tmp_path / "s.zarr").dataset().find_feature_set("mine")
    assert np.array_equal(fs.to_numpy("mean"), X[:, ::-1])
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "cache hit" in r.output, r.output
    r = CliRunner().invoke(
        app, ["import", "--features", str(tmp_path / "missing.npy"), "--model", "m", "--out", str(tmp_path / "t.zarr")]
    )
    assert r.exit_code == 1 and "error" in r.output
