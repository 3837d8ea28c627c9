"""Nothing lost, nothing silently wrong: checksummed chunks, verify/repair, crash-safe metadata,
cooperating writers, read-only stores, foreign folders, side data outside the Zarr tree.

Faults are real: chunk files deleted, zeroed, truncated or bit-flipped on disk, and child
processes killed with SIGKILL at named points (``EMBEDCACHE_KILL_AT``, :mod:`embedcache.faults`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import embedcache
from embedcache.store import ChunkDamaged, StoreError, open_store, side_url
from embedcache.store.records import MetadataLost
from embedcache.store.verify import verify
from tests.paths import REPO as _REPO

REPO = _REPO
KEY = "timm-test_vit@random/32-bicubic/clean"
EXTRACT = dict(weights="random", input_size=32, chunk_size=64, batch_size=32, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, chula_cells):
    """A finished store of 192 real cells (3 row-chunks of 64) and its features as written."""
    root = tmp_path_factory.mktemp("finished")
    manifest = root / "cells.csv"
    chula_cells.iloc[:192].to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract("timm:test_vit", manifest, out, dataset="cells", **EXTRACT)
    fs = open_store(out).dataset("cells").feature_set(KEY)
    return manifest, out, fs.to_numpy("cls", dtype=np.float16), fs.ok()


@pytest.fixture
def store_copy(tmp_path, finished):
    manifest, out, reference, ok = finished
    copy = tmp_path / "cache.zarr"
    shutil.copytree(out, copy)
    return manifest, copy, reference, ok


def _chunk_file(store: Path, array: str, c: int) -> Path:
    arr = zarr.open_array(store / "cells" / "features" / KEY / array, mode="r")
    coords = (c,) + (0,) * (arr.ndim - 1)
    return store / "cells" / "features" / KEY / array / arr.metadata.encode_chunk_key(coords)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
    elif how == "zero":
        path.write_bytes(bytes(len(data)))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bitflip":
        mid = len(data) // 2
        for i in range(4):
            data[mid + i] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["delete", "zero", "truncate", "bitflip"])
def test_damaged_feature_chunk_is_an_error_then_repaired_to_the_same_array(store_copy, how):
    manifest, store, reference, _ = store_copy
    _damage(_chunk_file(store, "cls", 1), how)
    fs = open_store(store).dataset("cells").feature_set(KEY)
    with pytest.raises(ChunkDamaged, match=r"chunk 1 \(rows 64-127\) of 'cells/.*cls' is damaged"):
        fs.to_numpy("cls")
    with pytest.raises(ChunkDamaged, match="chunk 1"):
        fs.to_numpy("cls", rows=np.array([70, 5]))
    assert fs.to_numpy("cls", rows=np.arange(64)).shape == (64, reference.shape[1])  # other chunks still serve
    info = open_store(store).info(verify=True)["datasets"]["cells"]["feature_sets"][KEY]
    assert info["status"] == "damaged" and any("chunk 1" in d for d in info["damage"])
    if how == "delete":  # the quick check (no data read) sees a missing object too
        assert open_store(store).info()["datasets"]["cells"]["feature_sets"][KEY]["status"] == "damaged"

    report = embedcache.verify(str(store))
    assert [(d.array, d.chunk) for d in report.damaged] == [("cls", 1)] and report.chunks_checked == 3
    assert open_store(store).dataset("cells").feature_set(KEY).is_complete()  # verify alone changes nothing
    repaired = embedcache.verify(str(store), repair=True)
    assert repaired.repaired
    fs = open_store(store).dataset("cells").feature_set(KEY)
    assert fs.pending_chunks(["cls"]) == [1]
    again = embedcache.extract("timm:test_vit", manifest, store, dataset="cells", **EXTRACT)
    assert not again.cache_hit and again.chunks_written == 1
    fixed = open_store(store).dataset("cells").feature_set(KEY)
    assert np.array_equal(fixed.to_numpy("cls", dtype=np.float16), reference)
    assert embedcache.verify(str(store)).ok


def test_damaged_ok_chunk_is_an_error_not_skipped_cells(store_copy):
    manifest, store, _, ok = store_copy
    assert ok.all()
    _damage(_chunk_file(store, "ok", 2), "delete")  # Zarr would serve 64 cells as "not ok"
    fs = open_store(store).dataset("cells").feature_set(KEY)
    with pytest.raises(ChunkDamaged, match="chunk 2 .*ok/error"):
        fs.ok()
    report = embedcache.verify(str(store), repair=True)
    assert [(d.array, d.chunk) for d in report.damaged] == [("rows", 2)]
    embedcache.extract("timm:test_vit", manifest, store, dataset="cells", **EXTRACT)
    assert open_store(store).dataset("cells").feature_set(KEY).ok().all()


def test_verify_cli_exit_codes_and_repair(store_copy):
    from typer.testing import CliRunner

    from embedcache_cli.embedcache_app import app

    manifest, store, reference, _ = store_copy
    runner = CliRunner()
    clean = runner.invoke(app, ["verify", str(store)])
    assert clean.exit_code == 0 and "checked 3 chunks" in _flat(clean.output) and "no damage" in _flat(clean.output)
    _damage(_chunk_file(store, "cls", 0), "bitflip")
    bad = runner.invoke(app, ["verify", str(store), "--json"])
    assert bad.exit_code == 1
    assert [d["chunk"] for d in json.loads(bad.output)["damaged"]] == [0]
    info = runner.invoke(app, ["info", str(store), "--verify"])
    assert info.exit_code == 0 and "damaged" in info.output and "--repair" in _flat(info.output)
    fixed = runner.invoke(app, ["verify", str(store), "--repair"])
    assert fixed.exit_code == 0 and "repaired" in fixed.output
    embedcache.extract("timm:test_vit", manifest, store, dataset="cells", **EXTRACT)
    assert np.array_equal(
        open_store(store).dataset("cells").feature_set(KEY).to_numpy("cls", dtype=np.float16), reference
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- kills at named points -------------------------------------------------------------------------


def _run_child(code: str, kill_at: str | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMBEDCACHE_KILL_AT"}
    if kill_at:
        env["EMBEDCACHE_KILL_AT"] = kill_at
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _import_store(path: Path, n: int = 300, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    labels = [f"class{i % 3}" for i in range(n)]
    embedcache.import_features(path, feats, backbone="toy", labels=labels, dataset="cells", chunk_size=64)
    return feats, labels


RELABEL = """
import embedcache, pandas as pd
ds = embedcache.open_store("cache.zarr", "a").dataset("cells")
corr = pd.DataFrame({"id": ["000001", "000004", "000007", "000010"], "new_label": ["X", "Y", "X", "Z"],
                     "note": ["a", "b", "c", "d"]})
print(ds.apply_corrections(corr, source="review-1"))
"""
RELABEL_POINTS = [
    "relabel:version-created",
    "relabel:current-written",
    "relabel:history-column#1",
    "relabel:history-column#3",
    "relabel:history-column#6",
    "relabel:before-switch",
    "relabel:after-switch",
]


@pytest.mark.slow
@pytest.mark.parametrize("first", [False, True], ids=["first-relabel", "second-relabel"])
def test_relabel_killed_at_every_point_leaves_old_or_new_and_the_rerun_converges(tmp_path, first):
    base = tmp_path / "base"
    base.mkdir()
    _import_store(base / "cache.zarr")
    original = open_store(base / "cache.zarr").dataset("cells").obs["label"].to_numpy()
    if first:  # a committed earlier correction must survive a killed later one
        open_store(base / "cache.zarr", "a").dataset("cells").apply_corrections(
            __import__("pandas").DataFrame({"id": ["000002"], "new_label": ["W"]}), source="earlier"
        )
    before = open_store(base / "cache.zarr").dataset("cells").obs["label"].to_numpy()
    after = before.copy()
    after[[1, 4, 7, 10]] = ["X", "Y", "X", "Z"]
    for point in RELABEL_POINTS:
        work = tmp_path / point.replace(":", "_").replace("#", "_")
        shutil.copytree(base, work)
        killed = _run_child(RELABEL, point, work)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        ds = open_store(work / "cache.zarr").dataset("cells")
        labels, history = ds.obs["label"].to_numpy(), ds.label_history()
        assert np.array_equal(labels, before) or np.array_equal(labels, after), point
        n_old = int(first)
        assert len(history) in (n_old, n_old + 4), point  # consistent columns, old or new history
        assert (len(history) == n_old + 4) == np.array_equal(labels, after), point
        rerun = _run_child(RELABEL, None, work)
        assert rerun.returncode == 0, rerun.stderr
        assert rerun.stdout.strip() == ("0" if np.array_equal(labels, after) else "4"), point
        ds = open_store(work / "cache.zarr").dataset("cells")
        assert np.array_equal(ds.obs["label"].to_numpy(), after), point
        assert np.array_equal(ds.obs["label_original"].to_numpy(), original), point
        h = ds.label_history()
        assert len(h) == n_old + 4
        assert list(h["old"].iloc[n_old:]) == list(before[[1, 4, 7, 10]]), point  # never old=''
        assert list(h["new"].iloc[n_old:]) == ["X", "Y", "X", "Z"] and list(h["note"].iloc[n_old:]) == list("abcd")
        # leftovers of the killed version are gone after the rerun's commit
        assert sorted(zarr.open_group(work / "cache.zarr" / "cells" / "labels").group_keys()) == [
            f"v{ds.group['labels'].attrs['version']}"
        ]


IMPORT = """
import numpy as np, embedcache
rng = np.random.default_rng(0)
feats = rng.normal(size=(300, 16)).astype(np.float32)
embedcache.import_features("cache.zarr", feats, backbone="toy", labels=[f"class{i % 3}" for i in range(300)],
                           dataset="cells", chunk_size=64)
"""


@pytest.mark.parametrize(
    "point",
    [
        "dataset:obs-written",
        "feature-set:arrays-created",
        "chunk:data-written#2",
        "chunk:checksums-written#3",
        "chunk:done#1",
    ],
)
def test_kill_during_metadata_or_chunk_writes_opens_says_what_is_incomplete_and_rerun_repairs(tmp_path, point):
    killed = _run_child(IMPORT, point, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = open_store(tmp_path / "cache.zarr")
    summary = store.info()  # never a KeyError on a half-made group
    if point.startswith("dataset"):
        assert summary["datasets"] == {} and summary["incomplete"] == ["cells (dataset)"]
    elif point.startswith("feature-set"):
        assert summary["incomplete"] == ["cells/toy/imported/clean (feature set)"]
        assert summary["datasets"]["cells"]["feature_sets"] == {}
    else:
        assert summary["datasets"]["cells"]["feature_sets"]["toy/imported/clean"]["status"] == "partial"
    rerun = _run_child(IMPORT, None, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    fs = open_store(tmp_path / "cache.zarr").dataset("cells").feature_set("toy/imported/clean")
    expected = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32).astype(np.float16)
    assert fs.is_complete() and np.array_equal(fs.to_numpy("cls", dtype=np.float16), expected)
    assert "incomplete" not in open_store(tmp_path / "cache.zarr").info()
    assert embedcache.verify(str(tmp_path / "cache.zarr")).ok


def test_half_written_attributes_are_damage_repaired_from_the_record_never_a_dataset_recreated(tmp_path):
    """Older versions wrote attributes key by key: a kill could leave ``kind`` without ``n``. A dataset that holds
    written features is never created afresh over them (that deleted its feature sets and label history):
    it is damage, which ``verify --repair`` writes back from the store's record; then the rerun is a cache hit."""
    _import_store(tmp_path / "cache.zarr")
    meta = json.loads((tmp_path / "cache.zarr" / "cells" / "zarr.json").read_text())
    meta["attributes"] = {"kind": "dataset"}  # what the old attrs.update left after its first key
    (tmp_path / "cache.zarr" / "cells" / "zarr.json").write_text(json.dumps(meta))
    summary = open_store(tmp_path / "cache.zarr").info()
    assert summary["incomplete"] == ["cells (dataset)"] and summary["datasets"] == {}
    assert summary["lost"] == ["cells (dataset): metadata lost; run embedcache verify --repair"]
    with pytest.raises(MetadataLost, match="verify .*--repair"):
        _import_store(tmp_path / "cache.zarr")
    report = verify(str(tmp_path / "cache.zarr"))
    assert not report.ok and any("dataset 'cells'" in line for line in report.metadata)
    repaired = verify(str(tmp_path / "cache.zarr"), repair=True)
    assert repaired.restored and verify(str(tmp_path / "cache.zarr")).ok
    feats, labels = _import_store(tmp_path / "cache.zarr")
    fs = open_store(tmp_path / "cache.zarr").dataset("cells").feature_set("toy/imported/clean")
    assert np.array_equal(fs.to_numpy("cls"), feats.astype(np.float16).astype(np.float32))


# -- writers that start together -------------------------------------------------------------------

CONCURRENT = """
import sys, time, pathlib, embedcache
while not pathlib.Path("go").exists():
    time.sleep(0.005)
try:
    r = embedcache.extract(sys.argv[1], "cells.csv", "cache.zarr", dataset="cells", weights="random", input_size=32,
                           chunk_size=64, batch_size=32, num_workers=0, progress=False)
    print("cache hit" if r.cache_hit else "written")
except embedcache.StoreBusyError as e:
    print("busy:", e)
"""


def _start(tmp_path: Path, model: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EMBEDCACHE_KILL_AT", None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CONCURRENT), model],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(tmp_path: Path, procs) -> list[tuple[int, str, str]]:
    import time

    time.sleep(6)  # both children import torch and timm, then spin on the start file
    (tmp_path / "go").touch()
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_two_extracts_of_different_backbones_into_one_new_store_both_succeed(tmp_path, chula_cells):
    chula_cells.iloc[:64].to_csv(tmp_path / "cells.csv", index=False)
    results = _wait_ready(tmp_path, [_start(tmp_path, "timm:test_vit"), _start(tmp_path, "timm:test_resnet")])
    for code, out, err in results:
        assert code == 0 and out.strip() == "written", err
    ds = open_store(tmp_path / "cache.zarr").dataset("cells")
    assert len(ds.feature_keys()) == 2 and all(ds.feature_set(k).is_complete() for k in ds.feature_keys())
    assert embedcache.verify(str(tmp_path / "cache.zarr")).ok


@pytest.mark.slow
def test_two_extracts_of_the_same_feature_set_one_writes_the_other_is_refused_or_a_cache_hit(tmp_path, chula_cells):
    chula_cells.iloc[:192].to_csv(tmp_path / "cells.csv", index=False)
    results = _wait_ready(tmp_path, [_start(tmp_path, "timm:test_vit"), _start(tmp_path, "timm:test_vit")])
    outs = sorted(out.strip() for code, out, _ in results)
    assert all(code == 0 for code, _, _ in results), [e for _, _, e in results]
    assert outs[1] == "written"
    assert outs[0] == "cache hit" or (outs[0].startswith("busy:") and "pid " in outs[0]), outs
    assert open_store(tmp_path / "cache.zarr").dataset("cells").feature_set(KEY).is_complete()


# -- read-only stores, foreign folders, side data ---------------------------------------------------


@pytest.fixture
def read_only_copy(tmp_path, finished):
    """The finished store (and its manifest) on a read-only bind mount."""
    manifest, out, _, _ = finished
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    shutil.copytree(out, src / "cache.zarr")
    shutil.copy(manifest, src / "cells.csv")
    ok = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {ok.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True, capture_output=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_store_serves_reads_cache_hits_and_verify(read_only_copy, finished):
    with pytest.raises(OSError):
        (read_only_copy / "probe").touch()
    r = embedcache.extract(
        "timm:test_vit", read_only_copy / "cells.csv", read_only_copy / "cache.zarr", dataset="cells", **EXTRACT
    )
    assert r.cache_hit
    fs = open_store(read_only_copy / "cache.zarr").dataset("cells").feature_set(KEY)
    assert np.array_equal(fs.to_numpy("cls", dtype=np.float16), finished[2])
    assert embedcache.verify(str(read_only_copy / "cache.zarr")).ok


def test_a_folder_that_is_not_a_store_is_never_taken_over(tmp_path, chula_subset):
    folder = tmp_path / "my_results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is not a Zarr store .*notes.txt"):
        embedcache.extract("timm:test_vit", chula_subset(8), folder, **EXTRACT)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        open_store(tmp_path / "a_file", "a")


def test_side_data_stays_out_of_the_zarr_tree(finished):
    import dask.array as da
    import xarray as xr

    _, store, reference, _ = finished
    assert Path(side_url(store, "locks")).is_dir() and not (store / ".locks").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(store, mode="r").members(max_depth=None))
        assert f"cells/features/{KEY}/cls" in members
        feats = xr.open_zarr(store / "cells" / "features" / KEY, consolidated=False)
        assert feats["cls"].dims == ("cell", "feature") and feats["ok"].dims == ("cell",)
        arr = da.from_zarr(str(store / "cells" / "features" / KEY / "cls"))
        assert np.array_equal(arr.compute(), reference)


def test_older_stores_with_side_folders_inside_are_migrated(store_copy):
    _, store, _, _ = store_copy
    (store / ".locks").mkdir()
    (store / ".locks" / "0123456789abcdef.lock").write_text("pid 1")
    (store / ".probes").mkdir()
    (store / ".probes" / "audit-oof-cells.parquet").write_bytes(b"PAR1")
    with pytest.warns(UserWarning, match="not recognized"):  # what users of older stores saw
        dict(zarr.open_group(store, mode="r").members(max_depth=None))
    open_store(store, "a")
    assert not (store / ".locks").exists() and not (store / ".probes").exists()
    assert Path(side_url(store, "probes", "audit-oof-cells.parquet")).read_bytes() == b"PAR1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dict(zarr.open_group(store, mode="r").members(max_depth=None))


# -- cached tail tokens ----------------------------------------------------------------------------


def test_tail_tokens_are_stored_in_checksummed_subchunks_and_read_by_random_rows(tmp_path):
    from embedcache.store import tokens_name
    from embedcache.store.feature_set import token_subchunk

    store = open_store(tmp_path / "cache.zarr", "a")
    src = embedcache.open_source(np.zeros((64, 8, 8, 3), dtype=np.uint8), labels=["a"] * 64, name="cells")
    ds = store.require_dataset(src, name="cells")
    shape = (129, 1024)  # ~264 KB per cell
    fs = ds.require_feature_set(
        "toy/x/clean",
        width=4,
        pools=["cls"],
        chunk_size=32,
        dtype="float16",
        provenance={},
        fingerprint={"t": 1},
        tokens={tokens_name(1): shape},
    )
    sub = token_subchunk(32, shape)
    assert 32 % sub == 0 and 1 < sub < 32  # a few cells per stored object
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(64, *shape)).astype(np.float16)
    feats = rng.normal(size=(64, 4)).astype(np.float16)
    for c in fs.pending_chunks(["cls", tokens_name(1)]):
        r = fs.chunk_rows(c)
        fs.write_chunk(
            c,
            {"cls": feats[r], tokens_name(1): tokens[r]},
            np.ones(r.stop - r.start, bool),
            np.full(r.stop - r.start, ""),
        )
    fs = open_store(tmp_path / "cache.zarr").dataset("cells").feature_set("toy/x/clean")
    assert fs.pools == ["cls"] and fs.token_sets == [tokens_name(1)]
    reader = fs.tokens(1)
    rows = np.sort(rng.choice(64, size=20, replace=False))
    assert len(reader) == 64 and np.array_equal(reader.read(rows), tokens[rows])
    with pytest.raises(StoreError, match="--tail-blocks 2"):
        fs.tokens(2)
    # damage one stored token object: reads that touch it fail naming it, verify finds it
    arr = fs.group[tokens_name(1)]
    victim = (
        tmp_path
        / "cache.zarr"
        / "cells"
        / "features"
        / "toy/x/clean"
        / tokens_name(1)
        / arr.metadata.encode_chunk_key((5, 0, 0))
    )
    _damage(victim, "bitflip")
    with pytest.raises(ChunkDamaged, match=tokens_name(1)):
        reader.read(np.array([5 * sub]))
    assert np.array_equal(reader.read(np.array([0, 1])), tokens[[0, 1]])  # other objects still serve
    report = embedcache.verify(str(tmp_path / "cache.zarr"))
    assert [(d.array, d.chunk) for d in report.damaged] == [(tokens_name(1), 5 * sub // 32)]


def test_a_damaged_imported_set_is_repaired_by_importing_again(tmp_path):
    feats, _ = _import_store(tmp_path / "cache.zarr")
    key = "toy/imported/clean"
    path = tmp_path / "cache.zarr" / "cells" / "features" / key / "cls"
    arr = zarr.open_array(path, mode="r")
    _damage(path / arr.metadata.encode_chunk_key((2, 0)), "zero")
    with pytest.raises(ChunkDamaged, match="chunk 2"):
        open_store(tmp_path / "cache.zarr").dataset("cells").feature_set(key).to_numpy()
    assert [d.chunk for d in embedcache.verify(str(tmp_path / "cache.zarr"), repair=True).damaged] == [2]
    again = embedcache.import_features(
        tmp_path / "cache.zarr",
        feats,
        backbone="toy",
        labels=[f"class{i % 3}" for i in range(300)],
        dataset="cells",
        chunk_size=64,
    )
    assert again.chunks_written == 1
    fixed = open_store(tmp_path / "cache.zarr").dataset("cells").feature_set(key).to_numpy()
    assert np.array_equal(fixed, feats.astype(np.float16).astype(np.float32))
