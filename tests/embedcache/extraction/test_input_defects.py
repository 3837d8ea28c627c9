"""Bad input is a clear error or a recorded, reported skip: dangling symlinks in an ImageFolder, images too
large to be a cell (refused from the header, before decoding), label spellings of one number."""

from __future__ import annotations

import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache import ExtractionError, open_source, open_store
from embedcache.inputs.images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, read_image
from embedcache.inputs.sources import LabelSpellingWarning, label_collisions
from tests.conftest import bundled

SIZE = 32  # model input: the tiny ViT at 2x2 patches keeps each extract well under a second


def _extract(data, out, **kw):
    kw.setdefault("weights", "random")
    kw.setdefault("progress", False)
    kw.setdefault("num_workers", 0)
    kw.setdefault("input_size", SIZE)
    return embedcache.extract("timm:test_vit", data, out, **kw)


def _cli(*args: str):
    from embedcache_cli.embedcache_app import app

    return CliRunner().invoke(app, list(args))


def _cli_extract(data: Path, out: Path, *extra: str):
    """``embedcache extract`` of timm:test_vit with random weights at the tests' size, through the CLI."""
    return _cli("extract", "-m", "timm:test_vit", "--weights", "random", "-d", str(data), "-o", str(out),
                "--input-size", str(SIZE), *extra)  # fmt: skip


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (8-bit grey) but that holds no pixel data at all:
    decoding it can only fail, so a size error proves the check ran on the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def wbc_folder(tmp_path) -> Path:
    """An ImageFolder of 4 real BCCD white cells (2 classes) plus a dangling link ``Neutrophil/gone.jpeg``."""
    src = bundled("bccd_wbc")
    root = tmp_path / "wbc"
    for cls in ("Lymphocyte", "Neutrophil"):
        (root / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    (root / "Neutrophil" / "gone.jpeg").symlink_to(tmp_path / "deleted" / "cell.jpeg")
    return root


# -- dangling symbolic links --------------------------------------------------------------------------------


def test_dangling_symlink_is_listed_with_its_link_path(wbc_folder):
    src = open_source(wbc_folder)
    assert len(src) == 5
    row = src.table.set_index("id").loc["Neutrophil/gone.jpeg"]
    assert row["path"] == str(wbc_folder / "Neutrophil" / "gone.jpeg") and row["label"] == "Neutrophil"
    with pytest.raises(ImageDecodeError, match="dangling symbolic link") as e:
        src.load(int(np.flatnonzero(src.table["id"] == "Neutrophil/gone.jpeg")[0]))
    assert e.value.path.endswith("gone.jpeg") and "deleted" in e.value.reason


def test_dangling_symlink_fails_under_fail_naming_it(wbc_folder, tmp_path):
    with pytest.raises(ExtractionError, match=r"Neutrophil/gone\.jpeg.*dangling symbolic link.*--on-error skip"):
        _extract(wbc_folder, tmp_path / "c.zarr")
    res = _cli_extract(wbc_folder, tmp_path / "cli.zarr", "--workers", "0", "-q")
    assert res.exit_code == 1 and "gone.jpeg" in res.output and "dangling" in res.output, res.output


def test_dangling_symlink_is_a_recorded_reported_skip_under_skip(wbc_folder, tmp_path):
    out = tmp_path / "c.zarr"
    r = _extract(wbc_folder, out, on_error="skip")
    assert [cid for cid, _ in r.skipped] == ["Neutrophil/gone.jpeg"] and "dangling" in r.skipped[0][1]
    ds = open_store(out).dataset()
    fs = ds.find_feature_set("timm:test_vit")
    ids = ds.obs["id"].tolist()
    assert fs.ok().tolist() == [i != "Neutrophil/gone.jpeg" for i in ids]
    assert "dangling" in fs.errors().iat[ids.index("Neutrophil/gone.jpeg")]
    res = _cli_extract(wbc_folder, tmp_path / "cli.zarr", "--workers", "0", "-q", "--on-error", "skip")
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable cells" in res.output and "Neutrophil/gone.jpeg" in res.output


# -- image size limit -----------------------------------------------------------------------------------------


def test_huge_image_refused_from_its_header(tmp_path):
    big = png_header(tmp_path / "big.png", 12000, 12000)  # 144 megapixels
    with pytest.raises(ImageDecodeError, match=r"12000x12000 = 144\.0 megapixels.*limit is 50\.0.*--max-image-pixels"):
        read_image(big)
    assert DEFAULT_MAX_IMAGE_PIXELS == 50_000_000
    # without a limit the header passes and decoding is tried (and fails: the file has no pixels)
    with pytest.raises(ImageDecodeError) as e:
        read_image(big, max_pixels=None)
    assert "megapixels" not in e.value.reason
    # beyond PIL's own bomb limit (179 megapixels) our message still names the option ...
    bigger = png_header(tmp_path / "bigger.png", 20000, 20000)
    with pytest.raises(ImageDecodeError, match="max-image-pixels"):
        read_image(bigger)
    # ... and raising ours lifts PIL's for that read only
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError) as e:
        read_image(bigger, max_pixels=10**9)
    assert "megapixels" not in e.value.reason and "bomb" not in e.value.reason
    assert Image.MAX_IMAGE_PIXELS == limit


def test_size_limit_applies_to_real_cells_and_can_be_raised(chula_cells):
    path = chula_cells["path"].iat[0]
    cell = read_image(path)
    h, w, _ = cell.shape
    with pytest.raises(ImageDecodeError, match=f"{w}x{h}"):
        read_image(path, max_pixels=h * w - 1)
    np.testing.assert_array_equal(read_image(path, max_pixels=h * w), cell)


def test_huge_image_in_extract_fails_or_is_skipped(tmp_path, chula_cells):
    big = png_header(tmp_path / "big.png", 12000, 12000)
    rows = chula_cells["path"].iloc[:3].tolist() + [str(big)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": rows, "label": ["a", "b", "a", "b"]}).to_csv(manifest, index=False)
    with pytest.raises(ExtractionError, match=r"big\.png.*144\.0 megapixels.*max_image_pixels="):
        _extract(manifest, tmp_path / "c.zarr")
    r = _extract(manifest, tmp_path / "c.zarr", on_error="skip")
    big_id = open_store(tmp_path / "c.zarr").dataset().obs["id"].iat[3]  # the id the manifest gave big.png
    assert big_id.endswith("big.png") and [cid for cid, _ in r.skipped] == [big_id] and "megapixels" in r.skipped[0][1]
    assert open_store(tmp_path / "c.zarr").dataset().find_feature_set("timm:test_vit").ok().tolist() == [True] * 3 + [
        False
    ]
    with pytest.raises(ValueError, match="max_image_pixels"):
        _extract(manifest, tmp_path / "d.zarr", max_image_pixels=0)


def test_cli_max_image_pixels_option(tmp_path, chula_cells):
    manifest = tmp_path / "m.csv"
    chula_cells.iloc[:2][["path", "label"]].to_csv(manifest, index=False)
    h, w, _ = read_image(chula_cells["path"].iat[0]).shape
    base = [
        "extract",
        "-m",
        "timm:test_vit",
        "--weights",
        "random",
        "-d",
        str(manifest),
        "--input-size",
        str(SIZE),
        "--num-workers",
        "0",
        "--no-progress",
    ]
    res = _cli(*base, "-o", str(tmp_path / "a.zarr"), "--max-image-pixels", str(h * w - 1), "--on-error", "skip")
    assert res.exit_code == 0 and "skipped 2 unreadable cells" in res.output and "too large" in res.output, res.output
    res = _cli(*base, "-o", str(tmp_path / "b.zarr"), "--max-image-pixels", str(h * w))
    assert res.exit_code == 0 and "skipped" not in res.output, res.output


# -- label spellings of one number ----------------------------------------------------------------------------


def test_label_collisions_names_every_spelling():
    notes = label_collisions(["1", "01", "1.0", "2", "3", "3", "x", "nan", "NaN", "2.5"])
    assert len(notes) == 1 and all(repr(s) in notes[0] for s in ("1", "01", "1.0")) and "'2'" not in notes[0]
    assert label_collisions(["0", "1", "10", "a"]) == []


def test_colliding_labels_are_reported_not_changed(tmp_path, chula_cells):
    manifest = tmp_path / "m.csv"
    labels = ["1", "01", "1.0", "2", "2", "3"]
    pd.DataFrame({"path": chula_cells["path"].iloc[:6], "label": labels}).to_csv(manifest, index=False)
    with pytest.warns(LabelSpellingWarning, match=r"'01', '1', '1\.0'"):
        src = open_source(manifest)
    assert src.table["label"].tolist() == labels  # kept as given: three classes, not silently merged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelSpellingWarning)
        r = _extract(manifest, tmp_path / "c.zarr")
    assert len(r.notes) == 1 and "'1.0'" in r.notes[0]
    assert sorted(open_store(tmp_path / "c.zarr").dataset().obs["label"].unique()) == ["01", "1", "1.0", "2", "3"]
    res = _cli_extract(manifest, tmp_path / "c.zarr", "-q")
    assert res.exit_code == 0 and "cache hit" in res.output, res.output
    assert "note:" in res.output and "'01', '1', '1.0'" in res.output and "distinct classes" in res.output


def test_distinct_numeric_labels_give_no_note(tmp_path, chula_cells):
    manifest = tmp_path / "m.csv"
    chula_cells.iloc[:4][["path", "label"]].to_csv(manifest, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelSpellingWarning)
        r = _extract(manifest, tmp_path / "c.zarr")
    assert r.notes == []
