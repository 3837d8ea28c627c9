"""Decode microscopy images of any common mode/dtype to ``(H, W, 3)`` uint8 RGB.

Conventions (the cache depends on them, so they are fixed here):

* Alpha (RGBA / LA / PA / palette transparency) is composited over a **white**
  background, because the background of bright-field microscopy is white.
* 16-bit integers are scaled by their dtype range (``round(v / 257)``), never
  clipped at 255 as ``PIL.Image.convert("L")`` would do. 32-bit integers
  (mode ``I``) whose values fit in ``[0, 65535]`` are treated as 16-bit data
  (older Pillow opens 16-bit PNGs as mode ``I``); otherwise they are scaled by
  ``[0, 2**31 - 1]`` with negatives clipped to 0.
* Floats: if ``max <= 1`` the range is ``[0, 1]``, else values are clipped to
  ``[0, 255]``; NaN becomes 0.
* EXIF orientation is applied (``ImageOps.exif_transpose``).
* A path may be an fsspec URL (``s3://bucket/cells/a.png``): the bytes are fetched, then decoded alike.
* An image over ``max_pixels`` (default :data:`DEFAULT_MAX_IMAGE_PIXELS`, 50 megapixels; a
  single cell is far smaller) is refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageDecodeError", "to_rgb_uint8", "read_image", "is_url", "DEFAULT_MAX_IMAGE_PIXELS"]

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(Exception):
    """An image could not be decoded; ``.reason`` says why, ``.path`` where."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        path = None if path is None else os.fspath(path)
        super().__init__(reason, path)  # args kept so the error pickles intact
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return f"{self.reason}: {self.path}" if self.path else self.reason


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite uint8 ``rgb`` (H,W,3) with uint8 ``alpha`` (H,W) over white."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a bool/uint8/uint16/int32/uint32/float array to uint8 (see module doc)."""
    kind, dt = arr.dtype.kind, arr.dtype
    if dt == np.bool_:
        return arr.astype(np.uint8) * 255
    if kind == "u" and dt.itemsize == 1:
        return arr.astype(np.uint8, copy=False)
    if kind == "u" and dt.itemsize == 2:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if kind == "u" and dt.itemsize == 4:
        return np.rint(arr.astype(np.float64) * (255.0 / 0xFFFFFFFF)).astype(np.uint8)
    if kind == "i" and dt.itemsize == 4:
        if arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
            return _scale_to_uint8(arr.astype(np.uint16))
        scaled = np.clip(arr.astype(np.float64), 0, None) * (255.0 / 0x7FFFFFFF)
        return np.rint(scaled).astype(np.uint8)
    if kind == "f":
        f = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        return np.rint(np.clip(f, 0.0, 255.0)).astype(np.uint8)
    raise ImageDecodeError(f"unsupported array shape/dtype {arr.shape} {dt}")


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Numpy (H,W), (H,W,1), (H,W,3) or (H,W,4) array of a supported dtype -> RGB uint8."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageDecodeError(f"unsupported array shape/dtype {arr.shape} {arr.dtype}")
    u8 = _scale_to_uint8(arr)
    if u8.ndim == 2:
        u8 = u8[..., None]
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    elif u8.shape[2] == 4:
        u8 = _composite_white(u8[..., :3], u8[..., 3])
    return np.ascontiguousarray(u8)


def to_rgb_uint8(img: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or numpy array to a C-contiguous ``(H, W, 3)`` uint8 array.

    Alpha is composited over white; 16/32-bit and float data are range-scaled
    (module docstring). PIL images get their EXIF orientation applied. A numpy
    input that is already RGB uint8 and C-contiguous is returned without a copy.
    """
    if isinstance(img, np.ndarray):
        return _array_to_rgb(img)
    if not isinstance(img, Image.Image):
        raise ImageDecodeError(f"unsupported input type {type(img).__name__}")
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"  # palette / colour-key transparency
    if mode in ("LA", "La"):
        la = np.array(img.convert("LA") if mode == "La" else img)
        return _composite_white(np.repeat(la[..., :1], 3, axis=2), la[..., 1])
    if mode in ("RGBA", "RGBa", "PA"):
        rgba = np.array(img.convert("RGBA") if mode != "RGBA" else img)
        return _composite_white(rgba[..., :3], rgba[..., 3])
    if mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(img).astype(np.uint16))  # native byte order
    if mode not in ("RGB", "L", "I", "F"):  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageDecodeError(f"unsupported image mode {mode}: {e}") from e
    return _array_to_rgb(np.array(img))


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image file fully and return ``(H, W, 3)`` uint8 RGB (see :func:`to_rgb_uint8`).

    Raises :class:`ImageDecodeError` (with ``.path``) for a missing, zero-byte, truncated or
    unreadable file, a dangling symbolic link, or an image of more than ``max_pixels`` pixels
    (read from the header, before decoding; ``None``: no limit). Truncation is detected because
    the pixels are loaded eagerly and ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False.
    """
    p = os.fspath(path)
    if is_url(p):
        return _read_url(p, max_pixels)
    if not os.path.exists(p):
        if os.path.islink(p):
            raise ImageDecodeError(f"dangling symbolic link (its target {os.readlink(p)!r} does not exist)", p)
        raise ImageDecodeError("missing file", p)
    if os.path.isdir(p):
        raise ImageDecodeError("unreadable image: is a directory", p)
    if os.path.getsize(p) == 0:
        raise ImageDecodeError("zero-byte file", p)
    return _decode(p, p, max_pixels)


def pixel_digest(image: np.ndarray) -> int:
    """A non-zero int64 digest of a decoded image: the first 8 bytes of the SHA-1 of its shape, dtype and
    C-order pixels (what the store records per cell at extraction, 0 meaning "not recorded"). Equal digests
    mean equal pixels up to a 64-bit collision (~3e-8 for 10^6 cells); one changed pixel changes it."""
    a = np.ascontiguousarray(image)
    head = f"{'x'.join(map(str, a.shape))}:{a.dtype.str}:".encode()
    value = int.from_bytes(hashlib.sha1(head + a.tobytes()).digest()[:8], "little", signed=True)
    return value or 1


def is_url(path: str) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``https://``...) rather than a local path (``file://`` is local)."""
    return "://" in path and not path.startswith("file://")


class StorageFetchError(OSError):
    """An image at a URL could not be fetched for a reason that is not the image's (expired credentials,
    throttling, the network): the extraction stops instead of recording the cell as unreadable, so that the
    rerun fetches it again."""


def _read_url(url: str, max_pixels: int | None) -> np.ndarray:
    """Fetch an image from an fsspec URL, then decode it as a file would be."""
    import fsspec

    try:
        fs, where = fsspec.url_to_fs(url)
        data = fs.cat_file(where)
    except FileNotFoundError:
        raise ImageDecodeError("missing file", url) from None
    except IsADirectoryError:
        raise ImageDecodeError("unreadable image: is a directory", url) from None
    except Exception as e:
        raise StorageFetchError(f"cannot fetch {url}: {type(e).__name__}: {e}; nothing was recorded for it") from e
    if not data:
        raise ImageDecodeError("zero-byte file", url)
    return _decode(io.BytesIO(data), url, max_pixels)


def _decode(src: str | io.BytesIO, p: str, max_pixels: int | None) -> np.ndarray:
    """Decode the image at ``src`` (a path, or its bytes); errors name ``p``."""
    try:
        with _open(src, max_pixels) as img:
            _check_size(img.size, max_pixels, p)
            img.load()
            return to_rgb_uint8(img)
    except ImageDecodeError as e:
        raise ImageDecodeError(e.reason, p) from e
    except Image.DecompressionBombError as e:  # PIL's own, larger, limit fired while reading the header
        raise ImageDecodeError(_too_big(str(e), max_pixels), p) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        msg = (str(e) or type(e).__name__).replace(f" {p!r}", "")  # the path is in .path
        reason = "truncated image" if "truncated" in msg.lower() else f"unreadable image: {msg}"
        raise ImageDecodeError(reason, p) from e


def _open(p: str | io.BytesIO, max_pixels: int | None) -> Any:
    """``Image.open`` under our limit instead of PIL's (which warns at 89 and fails at 179 megapixels)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check follows
        if pil_limit is None or (max_pixels is not None and max_pixels <= 2 * pil_limit):
            return Image.open(p)
        with _PIL_LIMIT_LOCK:  # the caller allows more than PIL does: lift PIL's limit for this header
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(p)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit


def _check_size(size: tuple[int, int], max_pixels: int | None, p: str) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(_too_big(f"{w}x{h} = {w * h / 1e6:,.1f} megapixels", max_pixels), p)


def _too_big(what: str, max_pixels: int | None) -> str:
    return (
        f"image too large to be a cell ({what}; the limit is {(max_pixels or 0) / 1e6:,.1f} megapixels, "
        "checked before decoding); raise it with max_image_pixels= (--max-image-pixels) if it is meant"
    )
