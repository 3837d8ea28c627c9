"""Every byte a result depends on is verified, not only the feature chunks (the fault cases of issue 26, 1-3):
lost metadata is damage to repair and never a dataset created afresh over its data; the cell table and the
labels are checked against checksums and the cell-list digest; array metadata is compared with its record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache.store import ChunkDamaged, StoreError, open_store
from embedcache.store.records import MetadataAltered, MetadataLost
from embedcache.store.verify import verify
from embedcache_cli.embedcache_app import app

KW = dict(weights="random", input_size=32, chunk_size=32, batch_size=32, num_workers=0, progress=False)
KEY = "timm-test_vit@random/32-bicubic/clean"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, chula_cells):
    """A store of 120 real cells: extracted features, an imported feature set and one label correction."""
    root = tmp_path_factory.mktemp("meta")
    manifest = root / "cells.csv"
    chula_cells.iloc[:120].to_csv(manifest, index=False)
    store = root / "cache.zarr"
    embedcache.extract("timm:test_vit", manifest, store, dataset="cells", **KW)
    ds = open_store(store).dataset()
    ids = ds.obs["id"].to_numpy()
    embedcache.import_features(store, np.ones((120, 8), np.float32), pd.DataFrame({"id": ids}), backbone="theirs")
    ds.apply_corrections(pd.DataFrame({"id": ids[:3], "new_label": ["X", "Y", "Z"]}), source="review")
    return root, manifest


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    root, _ = pristine
    shutil.copytree(root / "cache.zarr", tmp_path / "cache.zarr")
    return tmp_path / "cache.zarr"


def _rerun(pristine, store):
    return embedcache.extract("timm:test_vit", pristine[1], store, dataset="cells", **KW)


def _verify_cli(store: Path, *extra: str):
    return CliRunner().invoke(app, ["verify", str(store), *extra])


def test_a_lost_dataset_zarr_json_is_damage_and_never_a_dataset_recreated(pristine, store):
    (store / "cells" / "zarr.json").unlink()
    res = _verify_cli(store)
    assert res.exit_code == 1 and "dataset 'cells'" in res.output and "lost" in res.output
    assert "lost" in open_store(store).info()
    with pytest.raises(MetadataLost, match="verify .*--repair"):
        _rerun(pristine, store)  # the old code recreated the dataset: its imported set and labels were gone
    assert (store / "cells" / "features" / "theirs").exists()
    fixed = _verify_cli(store, "--repair")
    assert fixed.exit_code == 0 and "restored from its record" in fixed.output
    assert _verify_cli(store).exit_code == 0
    assert _rerun(pristine, store).cache_hit
    ds = open_store(store).dataset("cells")
    assert "theirs/imported/clean" in ds.feature_keys() and len(ds.label_history()) == 3


@pytest.mark.parametrize("lost", ["feature set", "done flags", "checksums"])
def test_a_lost_feature_set_or_array_zarr_json_is_damage_repaired_from_the_record(pristine, store, lost):
    fs_dir = store / "cells" / "features" / Path(KEY)
    target = {"feature set": fs_dir, "done flags": fs_dir / "done_cls", "checksums": fs_dir / "crc_rows"}[lost]
    (target / "zarr.json").unlink()
    report = verify(str(store))
    assert not report.ok and report.metadata, report  # the old code: "checked 0 chunks ... no damage"
    if lost == "checksums":  # the old code turned checksums off for the set ("written by an older embedcache")
        fs = open_store(store).dataset().feature_set(KEY)
        assert fs.has_checksums
        with pytest.raises(MetadataLost, match="crc_rows"):
            fs.ok()
    else:
        with pytest.raises(StoreError):
            _rerun(pristine, store)
    assert verify(str(store), repair=True).restored
    assert verify(str(store)).ok
    again = _rerun(pristine, store)
    assert again.cache_hit and open_store(store).dataset().feature_set(KEY).to_numpy("cls").shape == (120, 64)


def _chunk_file(array_dir: Path) -> Path:
    return next(p for p in (array_dir / "c").rglob("*") if p.is_file())


def test_a_flipped_bit_in_the_labels_is_an_error_not_another_label(store):
    path = _chunk_file(store / "cells" / "obs" / "label")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkDamaged, match=r"obs/label"):
        _ = open_store(store).dataset().obs


def test_a_deleted_cell_table_chunk_is_an_error_not_unlabelled_cells(store):
    _chunk_file(store / "cells" / "obs" / "label").unlink()  # Zarr would serve "" for every label
    with pytest.raises(ChunkDamaged, match="obs/label"):
        _ = open_store(store).dataset().obs
    assert any("obs/label" in line for line in verify(str(store)).metadata)


def test_swapped_rows_of_the_cell_table_are_refused(store):
    g = __import__("zarr").open_group(str(store / "cells" / "obs"), mode="a")
    for col in ("id", "path", "label"):
        values = np.asarray(g[col][:])
        values[[0, 1]] = values[[1, 0]]
        g[col][:] = values  # cells 0 and 1 would now be attached to each other's features
    with pytest.raises(ChunkDamaged):
        _ = open_store(store).dataset().obs


def test_a_damaged_label_store_is_an_error_with_the_originals_named(store):
    labels = store / "cells" / "labels"
    version = json.loads((labels / "zarr.json").read_text())["attributes"]["version"]
    _chunk_file(labels / f"v{version}" / "history" / "id").unlink()
    with pytest.raises(ChunkDamaged, match="history/id"):
        open_store(store).dataset().label_history()


def test_current_labels_of_the_wrong_length_are_a_clear_error(store):
    labels = store / "cells" / "labels"
    version = json.loads((labels / "zarr.json").read_text())["attributes"]["version"]
    g = __import__("zarr").open_group(str(labels / f"v{version}"), mode="a")
    g.create_array("current", shape=(7,), dtype=str, overwrite=True)[:] = np.array(["a"] * 7)
    with pytest.raises(ChunkDamaged, match="7 values for 120 cells"):
        _ = open_store(store).dataset().obs


def test_an_edited_dtype_is_refused_not_served(store):
    meta_path = store / "cells" / "features" / Path(KEY) / "cls" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "int16"  # the raw bytes pass a CRC; the values would be +-30,000
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MetadataAltered, match="data_type: recorded 'float16', found 'int16'"):
        open_store(store).dataset().feature_set(KEY).to_numpy("cls")
    res = CliRunner().invoke(app, ["info", str(store), "--verify"])
    assert "damaged" in res.output
    verify(str(store), repair=True)
    assert open_store(store).dataset().feature_set(KEY).to_numpy("cls").dtype == np.float32
    assert verify(str(store)).ok


def test_an_edited_shape_is_refused(store):
    meta_path = store / "cells" / "features" / Path(KEY) / "cls" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [240, meta["shape"][1]]
    meta_path.write_text(json.dumps(meta))
    assert not verify(str(store)).ok  # the old code verified it clean
    with pytest.raises(MetadataAltered, match="shape"):
        open_store(store).dataset().feature_set(KEY).to_numpy("cls")
