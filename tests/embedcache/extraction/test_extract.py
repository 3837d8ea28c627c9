"""The extraction pipeline and the store, on real cells with a tiny random-init ViT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import embedcache
from embedcache import ExtractionError, StoreBusyError, StoreError, open_store
from embedcache.backbones.devices import default_dtype
from embedcache.store import FeatureSetConflict
from embedcache.store.describe import provenance_line
from embedcache_cli import embedcache_app
from tests.conftest import REPO, bundled

KEY = "timm-test_vit@random/160-bicubic/clean"


def _extract(data, out, **kw):
    kw.setdefault("weights", "random")
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    return embedcache.extract("timm:test_vit", data, out, **kw)


def _reference_cls(backbone, image: np.ndarray, size: int = 160) -> np.ndarray:
    """An independent per-image path: PIL-free torch resize + normalise, model.forward_features."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255) / 255
    mean = torch.tensor(backbone.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return backbone.model.forward_features((x - mean) / std)[0, 0].numpy()


def test_imagefolder_variable_sizes_end_to_end(tmp_path, tiny_vit, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SeCrEt0123456789")
    root = bundled("bccd_wbc")  # 19 white cells, 173-336 px
    out = tmp_path / "cache.zarr"
    r = _extract(root, out, chunk_size=5, batch_size=4)
    assert not r.cache_hit and r.cells_computed == 19 and r.chunks_written == 4
    ds = open_store(out).dataset("bccd_wbc")
    assert ds.feature_keys() == [KEY]
    obs = ds.obs
    assert len(obs) == 19 and obs["label"].value_counts()["Basophil"] == 3
    fs = ds.feature_set(KEY)
    feats = fs.to_numpy("cls")
    assert feats.shape == (19, 64) and np.isfinite(feats).all() and fs.ok().all()
    assert fs.array("cls").dtype == np.float16
    # each stored vector matches an independent per-image computation (fp16 storage tolerance)
    src = embedcache.open_source(root)
    for i in (0, 9, 18):
        ref = _reference_cls(tiny_vit, src.load(i))
        np.testing.assert_allclose(feats[i], ref, rtol=2e-2, atol=2e-2)
    prov = fs.attrs["provenance"]
    assert prov["backbone"]["arch"] == "test_vit" and prov["weights"]["source"] == "random"
    assert prov["preprocessing"]["size"] == 160 and prov["preprocessing"]["interpolation"] == "bicubic"
    # auto on this CPU: bf16 where it has native bf16 (AVX-512 bf16 / AMX), else fp32
    assert prov["compute"]["device"] == "cpu" and prov["compute"]["dtype"] == default_dtype(torch.device("cpu"))
    assert {"torch", "timm", "embedcache"} <= set(prov["versions"])
    assert not [
        p for p in out.rglob("*") if p.is_file() and b"hf_SeCrEt" in p.read_bytes()
    ]  # never a token in the store
    # dask view agrees with numpy
    np.testing.assert_array_equal(fs.to_dask("cls").compute().astype(np.float32), feats)


def test_rerun_is_a_cache_hit_and_new_pooling_or_preprocessing_sits_beside(tmp_path):
    path = bundled("chula_rbc12") / "manifest.csv"
    df = pd.read_csv(path).iloc[:96]
    df["path"] = [str(path.parent / p) for p in df["path"]]
    df.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "c.zarr"
    first = _extract(tmp_path / "m.csv", out, chunk_size=32)
    chunk_file = out / "m" / "features" / KEY / "cls" / "c" / "0" / "0"
    assert chunk_file.exists()
    mtime = chunk_file.stat().st_mtime_ns
    again = _extract(tmp_path / "m.csv", out, chunk_size=32)
    assert again.cache_hit and again.cells_computed == 0
    assert chunk_file.stat().st_mtime_ns == mtime
    # asking for mean too adds it to the same feature set
    both = _extract(tmp_path / "m.csv", out, chunk_size=32, pool="cls,mean")
    assert not both.cache_hit
    fs = open_store(out).dataset().feature_set(KEY)
    assert fs.pools == ["cls", "mean"] and fs.is_complete()
    # another interpolation is another feature set beside the first
    _extract(tmp_path / "m.csv", out, chunk_size=32, interpolation="bilinear")
    assert open_store(out).dataset().feature_keys() == [KEY, "timm-test_vit@random/160-bilinear/clean"]
    assert first.key == KEY


def test_other_weights_under_the_same_key_conflict(tmp_path, chula_subset):
    from safetensors.torch import save_file

    m = chula_subset(20)
    out = tmp_path / "c.zarr"
    _extract(m, out)
    b = embedcache.load_backbone("timm:test_vit", weights="random")
    sd = {k: v + 1.0 for k, v in b.model.state_dict().items()}
    save_file(sd, tmp_path / "other.safetensors")
    r = _extract(m, out, weights=str(tmp_path / "other.safetensors"))
    assert r.key.startswith("timm-test_vit@")  # a local file gets its own key, beside the random-init one
    with pytest.raises(FeatureSetConflict, match="store_dtype"):
        _extract(m, out, store_dtype="float32")
    # a short name instead of timm-test_vit@<sha>: studies take it as the model
    named = _extract(m, out, weights=str(tmp_path / "other.safetensors"), name="vit-plus1")
    assert named.key == "vit-plus1/160-bicubic/clean"
    fs = open_store(out).dataset().find_feature_set("vit-plus1")
    assert fs.key == named.key and fs.attrs["provenance"]["name"] == "vit-plus1"
    np.testing.assert_array_equal(fs.to_numpy(), open_store(out).dataset().feature_set(r.key).to_numpy())
    with pytest.raises(FeatureSetConflict):  # the name is taken by other weights
        _extract(m, out, name="vit-plus1")
    with pytest.raises(ValueError, match="'uni' is a registry backbone"):
        _extract(m, out, name="uni")
    with pytest.raises(ValueError, match="name must be letters, digits"):
        _extract(m, out, name="lab/vit")


def test_bad_images_fail_by_default_and_skip_is_recorded(tmp_path, chula_cells):
    good = chula_cells["path"].iloc[:3].tolist()
    (tmp_path / "zero.jpg").write_bytes(b"")
    data = Path(good[0]).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    rows = good + [
        str(tmp_path / "zero.jpg"),
        str(tmp_path / "trunc.jpg"),
        str(tmp_path / "text.jpg"),
        str(tmp_path / "missing.jpg"),
    ]
    pd.DataFrame({"path": rows, "label": ["a"] * len(rows)}).to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "c.zarr"
    with pytest.raises(ExtractionError, match=r"zero\.jpg.*zero-byte"):
        _extract(tmp_path / "bad.csv", out, chunk_size=4)
    r = _extract(tmp_path / "bad.csv", out, chunk_size=4, on_error="skip")
    by_path = dict(zip(embedcache.open_source(tmp_path / "bad.csv").table["path"], open_store(out).dataset().obs["id"]))
    reasons = dict(r.skipped)  # keyed by cell id (the path below the manifest paths' common folder)
    assert len(reasons) == 4
    assert "zero-byte" in reasons[by_path[str(tmp_path / "zero.jpg")]]
    assert "truncated" in reasons[by_path[str(tmp_path / "trunc.jpg")]]
    assert "missing" in reasons[by_path[str(tmp_path / "missing.jpg")]]
    fs = open_store(out).dataset().feature_set(KEY)
    assert fs.ok().tolist() == [True] * 3 + [False] * 4
    assert fs.info()["skipped_cells"] == 4 and fs.is_complete()
    assert (fs.to_numpy()[3:] == 0).all() and np.abs(fs.to_numpy()[:3]).sum() > 0
    assert "zero-byte" in fs.errors().iat[3]


def test_npz_and_fsspec_urls(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "mnist.npz",
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=np.arange(10),
    )
    mem = _extract(tmp_path / "mnist.npz", "memory://embedcache-test/c.zarr", chunk_size=4)
    assert mem.cells_computed == 10
    store = open_store("memory://embedcache-test/c.zarr")
    a = store.dataset("mnist").feature_set(KEY).to_numpy()
    url = f"file://{tmp_path}/f.zarr"
    _extract(tmp_path / "mnist.npz", url, chunk_size=4)
    b = open_store(url).dataset("mnist").feature_set(KEY).to_numpy()
    np.testing.assert_array_equal(a, b)
    assert store.dataset("mnist").obs["id"].iat[0] == "train/000000"


def test_workers_and_batch_size_do_not_change_features(tmp_path, chula_subset):
    m = chula_subset(64)
    a = _extract(m, tmp_path / "a.zarr", chunk_size=64, batch_size=64)
    b = _extract(m, tmp_path / "b.zarr", chunk_size=64, batch_size=16, num_workers=2)
    fa = open_store(a.store).dataset().feature_set(KEY).to_numpy()
    fb = open_store(b.store).dataset().feature_set(KEY).to_numpy()
    np.testing.assert_allclose(fa, fb, atol=2e-3)


def test_reading_an_unfinished_or_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no embedcache store"):
        open_store(tmp_path / "none.zarr")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.embedcache_app", *args]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, chula_cells):
    n, chunk = len(chula_cells), 16  # 832 bundled cells: 52 chunks, killed after the third
    df = chula_cells
    df.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "killed.zarr"
    args = [
        "extract",
        "--model",
        "timm:test_vit",
        "--weights",
        "random",
        "--data",
        str(tmp_path / "m.csv"),
        "--out",
        str(out),
        "--chunk-size",
        str(chunk),
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(_cli(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_dir = out / "m" / "features" / KEY / "done_cls" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (done_dir.exists() and len(list(done_dir.iterdir())) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    # while it runs, a second writer of the same feature set is refused with a clear message
    with pytest.raises(StoreBusyError, match="another embedcache process"):
        _extract(tmp_path / "m.csv", out, chunk_size=chunk, batch_size=32)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_store(out)  # opens after SIGKILL
    fs = store.dataset().feature_set(KEY)
    written = int(fs.done("cls").sum())
    assert 3 <= written < fs.n_chunks, "the run must be killed mid-way"
    assert store.info()["datasets"]["m"]["feature_sets"][KEY]["status"] == "partial"
    with pytest.raises(StoreError, match="incomplete"):
        fs.to_numpy()
    resumed = _extract(tmp_path / "m.csv", out, chunk_size=chunk, batch_size=32)
    assert resumed.chunks_written == fs.n_chunks - written
    assert resumed.cells_computed < n
    clean = _extract(tmp_path / "m.csv", tmp_path / "clean.zarr", chunk_size=chunk, batch_size=32)
    a = open_store(out).dataset().feature_set(KEY).to_numpy()
    b = open_store(clean.store).dataset().feature_set(KEY).to_numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_cli_extract_and_info(tmp_path, chula_subset):
    m = chula_subset(40)
    out = tmp_path / "c.zarr"
    res = subprocess.run(
        _cli(
            "extract",
            "-m",
            "timm:test_vit",
            "--weights",
            "random",
            "-d",
            str(m),
            "-o",
            str(out),
            "--pool",
            "cls,mean",
            "-q",
            "--workers",
            "0",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and KEY in res.stdout
    res = subprocess.run(
        _cli(
            "extract",
            "-m",
            "timm:test_vit",
            "--weights",
            "random",
            "-d",
            str(m),
            "-o",
            str(out),
            "--pool",
            "cls,mean",
            "-q",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert "cache hit" in res.stdout
    res = subprocess.run(_cli("info", str(out)), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "complete" in res.stdout and "40×64" in res.stdout
    res = subprocess.run(
        _cli("extract", "-m", "no-such-model", "-d", str(m), "-o", str(out)), cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 1 and "error" in res.stderr and "Traceback" not in res.stderr


def test_perturbed_feature_sets_cover_the_test_split_and_are_reused(tmp_path, chula_subset):
    m = chula_subset(48, split=["train"] * 32 + ["test"] * 16)
    out = tmp_path / "c.zarr"
    r = _extract(m, out, chunk_size=16, working_size=40, perturb=["blur-post:0,1.6", "blur-pre:1.6"])
    keys = [v.key for v in r.variants]
    base = "timm-test_vit@random/160-bicubic-ws40"
    assert r.key == f"{base}/clean" and keys == [f"{base}/blur-post-0", f"{base}/blur-post-1.6", f"{base}/blur-pre-1.6"]
    ds = open_store(out).dataset()
    clean = ds.feature_set(r.key).to_numpy()
    test = ds.obs["split"].to_numpy() == "test"
    for v in r.variants:
        fs = ds.feature_set(v.key)
        assert fs.is_complete() and (fs.ok() == test).all()
        assert fs.info()["rows"] == "split == test" and fs.info()["skipped_cells"] == 0
        assert v.cells_computed == 16
    # σ = 0 is the identity: same features as clean on the test cells
    np.testing.assert_array_equal(ds.feature_set(keys[0]).to_numpy()[test], clean[test])
    blurred = ds.feature_set(keys[1]).to_numpy()[test]
    assert np.abs(blurred - clean[test]).mean() > 1e-3
    again = _extract(m, out, chunk_size=16, working_size=40, perturb=["blur-post:0,1.6", "blur-pre:1.6"])
    assert again.cache_hit and all(v.cache_hit for v in again.variants)


def test_label_corrections_keep_history_and_never_touch_the_original(tmp_path, chula_subset):
    m = chula_subset(30)
    out = tmp_path / "c.zarr"
    _extract(m, out)
    ds = open_store(out).dataset()
    ids = ds.obs["id"].tolist()
    orig = ds.obs["label"].tolist()
    fixes = pd.DataFrame({"id": [ids[2], ids[5]], "new_label": ["7", orig[5]], "note": ["teardrop", "unchanged"]})
    fixes.to_csv(tmp_path / "fixes.csv", index=False)
    assert ds.apply_corrections(tmp_path / "fixes.csv") == 1  # the second row changes nothing
    obs = open_store(out).dataset().obs
    assert obs["label"].iat[2] == "7" and obs["label_original"].tolist() == orig
    hist = open_store(out).dataset().label_history()
    assert hist[["id", "old", "new", "note"]].values.tolist() == [[ids[2], orig[2], "7", "teardrop"]]
    assert hist["source"].iat[0].endswith("fixes.csv")
    info = json.loads(CliRunner().invoke(embedcache_app.app, ["info", str(out), "--json"]).stdout)
    (entry,) = info["datasets"][ds.name]["label_history"]  # the history README promises in info --json
    assert info["datasets"][ds.name]["label_corrections"] == 1
    assert [entry[k] for k in ("id", "old", "new", "note")] == [ids[2], orig[2], "7", "teardrop"] and entry["time"]
    with pytest.raises(StoreError, match="not cells of"):
        ds.apply_corrections(pd.DataFrame({"id": ["nope"], "new_label": ["1"]}))
    assert len(open_store(out).dataset().label_history()) == 1  # a refused batch writes nothing


def test_embed_images_matches_stored_features(tmp_path, chula_subset):
    from embedcache.extraction.new_images import embed_images

    m = chula_subset(20)
    out = tmp_path / "c.zarr"
    _extract(m, out, working_size=40)
    ds = open_store(out).dataset()
    fs = ds.find_feature_set("timm:test_vit")
    q = embed_images(fs, [ds.obs["path"].iat[3], ds.obs["path"].iat[11]])
    np.testing.assert_array_equal(q, fs.to_numpy()[[3, 11]])


def test_blur_pre_and_post_differ_without_working_size_on_the_input_size_grid(tmp_path, chula_subset):
    """Issue 28: without --working-size both blurs used to blur the 64-px original at σ (bitwise-equal
    features). S now defaults to the backbone's input size (160), recorded with where it came from."""
    m = chula_subset(32, split=["train"] * 16 + ["test"] * 16)
    out = tmp_path / "c.zarr"
    r = _extract(m, out, chunk_size=16, perturb=["blur-pre:1.6", "blur-post:1.6"])
    base = "timm-test_vit@random/160-bicubic"
    assert r.key == f"{base}/clean" and [v.key for v in r.variants] == [f"{base}/blur-pre-1.6", f"{base}/blur-post-1.6"]
    assert any("working size 160" in n and "input size" in n for n in r.notes), r.notes
    ds = open_store(out).dataset()
    test = ds.obs["split"].to_numpy() == "test"
    pre, post = (ds.feature_set(v.key) for v in r.variants)
    assert not np.array_equal(pre.to_numpy()[test], post.to_numpy()[test])
    for fs in (pre, post):
        prov = fs.attrs["provenance"]
        assert prov["working_size"] == 160 and prov["working_size_from"] == "the backbone's input size (default)"
        assert "working size 160 (the backbone's input size (default))" in provenance_line(prov)
    clean = ds.feature_set(r.key).attrs["provenance"]
    assert clean["working_size"] is None and clean["working_size_from"] is None  # the clean set is unchanged
    explicit = _extract(m, tmp_path / "d.zarr", chunk_size=16, working_size=40, perturb=["blur-post:1.6"])
    prov = open_store(tmp_path / "d.zarr").dataset().feature_set(explicit.variants[0].key).attrs["provenance"]
    assert prov["working_size"] == 40 and prov["working_size_from"] == "--working-size / working_size="


def test_perturbations_without_working_size_refuse_a_non_squash_fit(tmp_path, chula_subset):
    """The default S squashes each cell to the input size; with --fit crop the clean set would crop: refused."""
    m = chula_subset(8)
    with pytest.raises(ValueError, match=r"--fit crop.*--working-size"):
        _extract(m, tmp_path / "c.zarr", fit="crop", perturb=["blur-post:1"])
    assert not (tmp_path / "c.zarr").exists()
