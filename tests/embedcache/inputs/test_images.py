"""embedcache.inputs.images: every PIL mode / numpy layout to (H, W, 3) uint8, and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from embedcache.inputs.images import ImageDecodeError, read_image, to_rgb_uint8
from tests.conftest import bundled


def _check(out: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    assert out.dtype == np.uint8 and out.shape == (*shape, 3) and out.flags.c_contiguous
    return out


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


# -- 8-bit modes ---------------------------------------------------------------------------------


def test_rgb_png_passes_through_exactly(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = _check(read_image(_save(Image.fromarray(a), tmp_path / "rgb.png")), (7, 9))
    np.testing.assert_array_equal(out, a)


def test_grayscale_png_replicated(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (5, 6), dtype=np.uint8)
    out = _check(read_image(_save(Image.fromarray(g), tmp_path / "l.png")), (5, 6))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_bilevel_png(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    out = _check(read_image(_save(img, tmp_path / "b.png")), (2, 4))
    assert out[0, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_grayscale_jpeg(tmp_path):
    out = _check(read_image(_save(Image.new("L", (16, 16), 100), tmp_path / "g.jpg")), (16, 16))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert abs(int(out.mean()) - 100) <= 2


def test_rgba_transparent_region_is_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (10, 20, 30)
    a[:2, :, 3] = 255  # top opaque
    a[2, :, 3] = 0  # fully transparent
    a[3, :, 3] = 128  # half
    out = _check(read_image(_save(Image.fromarray(a, "RGBA"), tmp_path / "rgba.png")), (4, 4))
    assert (out[:2] == (10, 20, 30)).all()
    assert (out[2] == 255).all()
    expect = [round((v * 128 + 255 * 127) / 255) for v in (10, 20, 30)]
    assert out[3, 0].tolist() == expect


def test_la_composited_over_white(tmp_path):
    img = Image.new("LA", (3, 1), (40, 255))
    img.putpixel((1, 0), (40, 0))
    out = _check(read_image(_save(img, tmp_path / "la.png")), (1, 3))
    assert out[0, 0].tolist() == [40] * 3 and out[0, 1].tolist() == [255] * 3


PALETTE = [(200, 30, 60), (20, 150, 240), (5, 5, 5), (250, 250, 10)]


def _palette_image() -> tuple[Image.Image, np.ndarray]:
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return img, idx


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_maps_to_rgb(tmp_path, ext):
    img, idx = _palette_image()
    out = _check(read_image(_save(img, tmp_path / f"p.{ext}")), idx.shape)
    np.testing.assert_array_equal(out, np.array(PALETTE, np.uint8)[idx])


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_transparency_is_white(tmp_path, ext):
    img, idx = _palette_image()
    out = read_image(_save(img, tmp_path / f"pt.{ext}", transparency=1))
    expect = np.array(PALETTE, np.uint8)[idx]
    expect[idx == 1] = 255
    np.testing.assert_array_equal(out, expect)


def test_pa_mode_in_memory():
    img, idx = _palette_image()
    pa = img.convert("PA")
    alpha = Image.fromarray(np.where(idx == 2, 0, 255).astype(np.uint8))
    pa.putalpha(alpha)
    assert pa.mode == "PA"
    out = _check(to_rgb_uint8(pa), idx.shape)
    expect = np.array(PALETTE, np.uint8)[idx]
    expect[idx == 2] = 255
    np.testing.assert_array_equal(out, expect)


# -- 16 / 32-bit and float -------------------------------------------------------------------------

U16 = np.array([[0, 65535, 32896], [257, 385, 386]], np.uint16)
U16_EXPECT = np.array([[0, 255, 128], [1, 1, 2]], np.uint8)  # round(v / 257), no clipping at 255


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_uint16_file_scaled_by_dtype_range(tmp_path, ext):
    img = Image.fromarray(U16)
    assert img.mode == "I;16"
    path = _save(img, tmp_path / f"u16.{ext}")
    assert Image.open(path).mode in ("I;16", "I")  # older Pillow opens 16-bit PNG as "I"
    out = _check(read_image(path), U16.shape)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], U16_EXPECT)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B"])
def test_uint16_modes_in_memory(mode):
    dtype = {"I;16": "=u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    img = Image.frombytes(mode, (3, 2), U16.astype(dtype).tobytes())
    assert img.mode == mode
    np.testing.assert_array_equal(to_rgb_uint8(img)[..., 1], U16_EXPECT)


def test_int32_mode_i(tmp_path):
    small = Image.fromarray(U16.astype(np.int32))  # 16-bit data held as "I"
    assert small.mode == "I"
    np.testing.assert_array_equal(read_image(_save(small, tmp_path / "i.tif"))[..., 0], U16_EXPECT)
    big = np.array([[0, 2**31 - 1, 2**30, -5, 70000]], np.int32)  # true 32-bit range
    out = to_rgb_uint8(Image.fromarray(big))[0, :, 0]
    assert out.tolist() == [0, 255, 128, 0, round(70000 * 255 / (2**31 - 1))]


def test_float_mode_f(tmp_path):
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    img = Image.fromarray(unit)
    assert img.mode == "F"
    assert read_image(_save(img, tmp_path / "f.tif"))[0, :, 2].tolist() == [0, 128, 255]
    wide = np.array([[-3.0, 100.4, 300.0, np.nan]], np.float32)  # max > 1: clip to [0, 255]
    assert to_rgb_uint8(Image.fromarray(wide))[0, :, 0].tolist() == [0, 100, 255, 0]


# -- other colour spaces ---------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    img.paste((255, 0, 0, 0), (8, 0, 16, 8))  # cyan on the right
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    out = _check(read_image(path), (8, 16))
    with Image.open(path) as ref:
        assert ref.mode == "CMYK"
        np.testing.assert_array_equal(out, np.asarray(ref.convert("RGB")))
    assert (np.abs(out[:, :6].astype(int) - 255) <= 3).all()
    assert np.abs(out[:, 10:].astype(int) - (0, 255, 255)).max() <= 6


@pytest.mark.parametrize(
    "mode,value,expect",
    [("YCbCr", (255, 128, 128), (255, 255, 255)), ("HSV", (0, 255, 255), (255, 0, 0)), ("LAB", (255, 128, 128), None)],
)
def test_other_colour_spaces_use_pil_convert(mode, value, expect):
    img = Image.new(mode, (2, 2), value)
    out = _check(to_rgb_uint8(img), (2, 2))
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))
    if expect is not None:
        assert out[0, 0].tolist() == list(expect)


# -- EXIF orientation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_exif_orientation_applied(tmp_path, ext):
    a = np.full((16, 32, 3), 255, np.uint8)
    a[:, :16] = 0  # left half black
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    path = _save(img, tmp_path / f"o.{ext}", exif=exif.tobytes())
    out = _check(read_image(path), (32, 16))  # width and height swap
    assert out[:12].max() < 30 and out[20:].min() > 225  # the left half is now on top
    with Image.open(path) as ref:
        np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(ref).convert("RGB")))


# -- numpy input --------------------------------------------------------------------------------------


def test_numpy_layouts():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for arr in (g, g[..., None]):
        out = _check(to_rgb_uint8(arr), (3, 4))
        assert (out == g[..., None]).all()
    rgb = np.random.default_rng(2).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb), rgb)
    rgba = np.concatenate([rgb, np.zeros((3, 4, 1), np.uint8)], axis=2)
    rgba[0, :, 3] = 255
    out = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out[0], rgb[0])
    assert (out[1:] == 255).all()


def test_numpy_uint16_and_float():
    out = to_rgb_uint8(np.stack([U16] * 3, axis=2))
    np.testing.assert_array_equal(out[..., 2], U16_EXPECT)
    assert to_rgb_uint8(np.array([[0.0, 0.25, 1.0]]))[0, :, 0].tolist() == [0, 64, 255]
    assert to_rgb_uint8(np.array([[0.0, 2.0, 254.6, 999.0]], np.float32))[0, :, 0].tolist() == [0, 2, 255, 255]
    assert to_rgb_uint8(U16.astype(np.int32))[..., 0].tolist() == U16_EXPECT.tolist()


def test_numpy_non_contiguous_input():
    rgb = np.random.default_rng(3).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    view = rgb.transpose(1, 0, 2)
    out = _check(to_rgb_uint8(view), (5, 4))
    np.testing.assert_array_equal(out, view)


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((4, 4), np.int8),
        np.zeros((4, 4, 3), np.int64),
        np.zeros((4, 4), np.complex64),
    ],
    ids=["2ch", "5ch", "4d", "1d", "int8", "int64", "complex"],
)
def test_numpy_unsupported(arr):
    with pytest.raises(ImageDecodeError) as ei:
        to_rgb_uint8(arr)
    assert ei.value.reason.startswith("unsupported array shape/dtype") and ei.value.path is None


# -- bad files -----------------------------------------------------------------------------------------


def _bad(path) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as ei:
        read_image(path)
    assert ei.value.path == str(path) and str(path) in str(ei.value)
    return ei.value


def test_missing_file(tmp_path):
    assert _bad(tmp_path / "nope.png").reason == "missing file"


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").touch()
    assert _bad(tmp_path / "empty.png").reason == "zero-byte file"


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file(tmp_path, ext):
    a = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(Image.fromarray(a), tmp_path / f"full.{ext}").read_bytes()
    (tmp_path / f"half.{ext}").write_bytes(full[: len(full) // 2])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert _bad(tmp_path / f"half.{ext}").reason == "truncated image"


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    err = _bad(tmp_path / "notes.jpg")
    assert err.reason.startswith("unreadable image: ") and "cannot identify" in err.reason


def test_directory_is_unreadable(tmp_path):
    assert _bad(tmp_path).reason.startswith("unreadable image")


def test_error_pickles_intact():
    err = pickle.loads(pickle.dumps(ImageDecodeError("truncated image", "/x/y.png")))
    assert (err.reason, err.path, str(err)) == ("truncated image", "/x/y.png", "truncated image: /x/y.png")


def test_accepts_str_and_pathlike(tmp_path):
    path = _save(Image.new("RGB", (3, 2), (1, 2, 3)), tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(str(path)), read_image(path))


# -- real cells ------------------------------------------------------------------------------------------


def test_real_bccd_cells_variable_sizes():
    files = sorted(bundled("bccd_cells").glob("*/*.jpg"))  # 4 RBC, 4 WBC, 4 platelet crops, 35-230 px, not square
    assert len(files) == 12
    for f in files:
        out = read_image(f)
        with Image.open(f) as ref:
            _check(out, (ref.height, ref.width))
            np.testing.assert_array_equal(out, np.asarray(ref.convert("RGB")))


def test_real_chula_cells_64px():
    files = sorted((bundled("chula_rbc12") / "cells").glob("*.jpg"))[:5]
    assert len(files) == 5
    for f in files:
        _check(read_image(f), (64, 64))
