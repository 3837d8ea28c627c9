"""Image sources: ImageFolder, manifests, arrays; stable ids; clear errors naming rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedcache.inputs.sources import SourceError, open_source
from tests.conftest import bundled


def test_imagefolder_real_cells_have_stable_ids_and_class_labels():
    root = bundled("bccd_wbc")
    src = open_source(root)
    assert len(src) == 19
    assert src.kind == "imagefolder" and src.name == "bccd_wbc"
    counts = src.table["label"].value_counts().to_dict()
    assert counts == {"Neutrophil": 4, "Eosinophil": 4, "Lymphocyte": 4, "Monocyte": 4, "Basophil": 3}
    assert src.table["id"].iat[0] == "Basophil/" + sorted(p.name for p in (root / "Basophil").iterdir())[0]
    assert open_source(root).digest() == src.digest()  # stable across opens
    img = src.load(0)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_manifest_relative_paths_and_optional_columns(chula_subset, chula_cells):
    root = bundled("chula_rbc12")
    src = open_source(root / "manifest.csv")
    assert len(src) == 832 and src.table["label"].nunique() == 13
    # absolute, symlinks resolved (shared/ may be a link)
    assert Path(src.table["path"].iat[0]) == (root / "cells/001_000.jpg").resolve()
    assert src.table["id"].iat[0] == "cells/001_000.jpg"
    path = chula_subset(50, split=["train"] * 40 + ["test"] * 10)
    sub = open_source(path, label_column="label_name")
    assert set(sub.table["split"]) == {"train", "test"}
    assert sub.table["group"].iat[0] == chula_cells["smear"].iat[0]
    assert sub.table["label"].iat[0] == "normal"
    assert sub.load(3).shape == (64, 64, 3)


def test_parquet_manifest(tmp_path, chula_cells):
    df = chula_cells.iloc[:20][["path", "label"]].copy()
    df["id"] = [f"cell-{i}" for i in range(20)]
    df.to_parquet(tmp_path / "m.parquet")
    src = open_source(tmp_path / "m.parquet")
    assert src.table["id"].tolist() == df["id"].tolist()


@pytest.mark.parametrize("bad_label", ["", "NaN", "  "])
def test_manifest_missing_label_names_the_row(tmp_path, bad_label):
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "label": ["x", bad_label, "y"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    with pytest.raises(SourceError, match=r"m\.csv row 2 \(line 3\).*b\.png"):
        open_source(tmp_path / "m.csv")


def test_manifest_without_label_column_explains(tmp_path):
    pd.DataFrame({"path": ["a.png"], "class": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SourceError, match="no 'label' column.*--label-column"):
        open_source(tmp_path / "m.csv")
    assert open_source(tmp_path / "m.csv", label_column="class").table["label"].tolist() == ["x"]
    assert open_source(tmp_path / "m.csv", label_column=None).table["label"].tolist() == [""]


def test_manifest_duplicate_ids_and_missing_path_column(tmp_path):
    pd.DataFrame({"path": ["a.png", "a.png"], "label": ["x", "y"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SourceError, match="unique"):
        open_source(tmp_path / "d.csv")
    pd.DataFrame({"file": ["a.png"], "label": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(SourceError, match="no 'path' column"):
        open_source(tmp_path / "p.csv")


def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 255, (6, 28, 28, 3), dtype=np.uint8),
        "train_labels": np.arange(6).reshape(6, 1),
        "test_images": rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8),
        "test_labels": np.arange(4).reshape(4, 1),
    }
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    src = open_source(tmp_path / "bloodmnist.npz")
    assert len(src) == 10
    assert src.table["id"].tolist()[:2] == ["train/000000", "train/000001"] and src.table["id"].iat[6] == "test/000000"
    assert src.table["split"].tolist() == ["train"] * 6 + ["test"] * 4
    assert src.table["label"].tolist() == [str(i) for i in range(6)] + [str(i) for i in range(4)]
    np.testing.assert_array_equal(src.load(7), arrays["test_images"][1])


def test_in_memory_grayscale_uint16_arrays():
    imgs = np.full((3, 8, 8), 65535, dtype=np.uint16)
    src = open_source(imgs, labels=["a", "b", "c"])
    out = src.load(1)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out == 255).all()
    with pytest.raises(SourceError, match="3 images but 2 labels"):
        open_source(imgs, labels=["a", "b"])


def test_missing_data_and_unknown_suffix(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        open_source(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SourceError, match="cannot tell"):
        open_source(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(tmp_path / "empty")


def test_urls_carrying_credentials_are_refused_before_anything_is_stored(tmp_path):
    """A presigned URL or user:password@ would be written into the store's obs/path and into logs."""
    import pandas as pd

    from embedcache.inputs.sources import SourceError, open_source

    signed = "https://bucket.s3.amazonaws.com/cells/a.png?X-Amz-Credential=AKIA123&X-Amz-Signature=abc"
    for bad in (signed, "https://user:hunter2@example.org/cells/a.png"):
        pd.DataFrame({"path": [bad], "label": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
        with pytest.raises(SourceError, match="carries credentials") as e:
            open_source(tmp_path / "m.csv")
        assert "hunter2" not in str(e.value) and "AKIA123" not in str(e.value)
    with pytest.raises(SourceError, match="carries credentials") as e:
        open_source("s3://bucket/manifest.csv?X-Amz-Security-Token=SECRETTOKEN")
    assert "SECRETTOKEN" not in str(e.value)


@pytest.mark.parametrize(
    "flag, url",
    [
        ("--data", "s3://u:SECRETKEY123@lab/m.csv"),
        ("--out", "s3://u:SECRETKEY123@lab/cache.zarr"),
        ("--data", "https://host/m.csv?X-Amz-Signature=SECRETKEY123"),
    ],
)
def test_credentials_in_any_url_are_refused_and_never_printed(flag, url, tmp_path):
    """The refusal names the URL with the secret replaced (the old code printed it; botocore too, for --out)."""
    from typer.testing import CliRunner

    from embedcache_cli.embedcache_app import app

    args = {"--data": str(tmp_path / "m.csv"), "--out": str(tmp_path / "c.zarr"), flag: url}
    res = CliRunner().invoke(app, ["extract", "-m", "timm:test_vit", "--weights", "random", *sum(args.items(), ())])
    assert res.exit_code == 1 and "carries credentials" in res.output, res.output
    assert "SECRETKEY123" not in res.output and "***" in res.output


def test_a_store_url_with_credentials_is_refused_redacted():
    from embedcache.store import StoreError, open_store

    with pytest.raises(StoreError, match=r"s3://\*\*\*@lab/c.zarr carries credentials") as e:
        open_store("s3://u:SECRETKEY123@lab/c.zarr")
    assert "SECRETKEY123" not in str(e.value)
