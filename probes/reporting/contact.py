"""Contact sheets: PNG grids of cells, each query or suspect beside its nearest neighbours.

Every row starts with the cell in question (outlined red) followed by its neighbours; each
tile carries the cell's label (and, for neighbours, the cosine similarity). Neighbours whose
label differs from the query's given label are outlined orange. Images are read from
``obs.path`` through :func:`embedcache.inputs.images.read_image`; a missing file becomes a grey tile.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from probes.reporting.text import one_line

TILE = 96
CAPTION = 30
PAD = 4
QUERY_COLOUR = (200, 30, 30)
DIFFERENT_COLOUR = (240, 140, 0)
SAME_COLOUR = (170, 170, 170)


@dataclass
class Tile:
    """One cell of a sheet: an image path and up to two caption lines."""

    path: str
    top: str
    bottom: str = ""
    colour: tuple[int, int, int] = SAME_COLOUR


@lru_cache(maxsize=4)
def _font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def thumbnail(path: str | os.PathLike, size: int = TILE) -> Image.Image:
    """The cell image fitted into a ``size`` square (aspect kept, white margin); grey when unreadable."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    try:
        from embedcache.inputs.images import read_image

        im = Image.fromarray(read_image(path))
    except Exception:  # noqa: BLE001  any unreadable image becomes a grey tile, the sheet still renders
        canvas.paste((200, 200, 200), (0, 0, size, size))
        ImageDraw.Draw(canvas).text((6, size // 2 - 6), "no image", fill=(80, 80, 80), font=_font())
        return canvas
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas


def fit_caption(text: str, width: int, draw: ImageDraw.ImageDraw, size: int = 11) -> str:
    """``text`` on one line, cut (with "…") to fit ``width`` pixels.

    Control characters become escapes first (:func:`one_line`: a newline cannot make the caption
    multi-line). The cut is a binary search on the length, each step one measurement of a prefix
    no longer than ``width`` characters (no glyph is narrower than a pixel), so a 100,000-character
    label costs about ten short measurements, not one per character.
    """
    font = _font(size)
    text = one_line(text)
    head = text[: max(width, 1) + 1]  # longer prefixes cannot fit
    if len(head) == len(text) and draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(head)  # the longest prefix + "…" that fits has length in [lo, hi)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if draw.textlength(head[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid
    return head[:lo] + "…"


def render(
    rows: Sequence[Sequence[Tile]], path: str | os.PathLike | None = None, title: str = "", *, tile: int = TILE
) -> Image.Image:
    """Draw ``rows`` of ``tile``-pixel tiles as one PNG (written to ``path`` when given); returns the image."""
    ncol = max((len(r) for r in rows), default=1)
    cw, ch = tile + 2 * PAD, tile + CAPTION + 2 * PAD
    head = 22 if title else 0
    sheet = Image.new("RGB", (max(ncol * cw, 200), head + max(len(rows), 1) * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, 4), fit_caption(title, sheet.width - 2 * PAD, draw, 13), fill=(0, 0, 0), font=_font(13))
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            x, y = c * cw + PAD, head + r * ch + PAD
            sheet.paste(thumbnail(t.path, tile), (x, y))
            draw.rectangle(
                (x - 2, y - 2, x + tile + 1, y + tile + 1), outline=t.colour, width=3 if t.colour != SAME_COLOUR else 1
            )
            draw.text((x, y + tile + 2), fit_caption(t.top, tile, draw), fill=(0, 0, 0), font=_font())
            if t.bottom:
                draw.text((x, y + tile + 15), fit_caption(t.bottom, tile, draw), fill=(60, 60, 60), font=_font())
    if path is not None:
        sheet.save(path, compress_level=3)
    return sheet


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    """The image as PNG (fast compression) or JPEG (quality 88) bytes."""
    buf = io.BytesIO()
    if fmt.upper() == "PNG":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of ``data`` (base64), for an image inlined in a page."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def suspect_rows(suspects: pd.DataFrame, neighbours: pd.DataFrame, n_neighbours: int = 8) -> list[list[Tile]]:
    """One row per suspect (``id, path, given_label, proposed_label, score, rank``) and its neighbours.

    ``neighbours`` holds ``query, rank, id, label, similarity, path`` rows (one backbone's).
    """
    by_query = {q: g.sort_values("rank") for q, g in neighbours.groupby("query", sort=False)}
    rows = []
    for s in suspects.itertuples(index=False):
        given = str(s.given_label)
        row = [Tile(str(s.path), f"#{s.rank} {given}", f"→ {s.proposed_label} {s.score:.2f}", QUERY_COLOUR)]
        g = by_query.get(str(s.id))
        if g is not None:
            for nb in g.head(n_neighbours).itertuples(index=False):
                colour = DIFFERENT_COLOUR if str(nb.label) != given else SAME_COLOUR
                row.append(Tile(str(nb.path), str(nb.label), f"cos {nb.similarity:.3f}", colour))
        rows.append(row)
    return rows


def suspect_sheet(
    suspects: pd.DataFrame, neighbours: pd.DataFrame, path: str | os.PathLike, *, title: str = "", n_neighbours: int = 8
) -> Path:
    """Contact sheet of the ranked suspects beside their nearest neighbours."""
    render(suspect_rows(suspects, neighbours, n_neighbours), path, title)
    return Path(path)


def neighbor_rows(table: pd.DataFrame, queries: pd.DataFrame, k: int | None = None) -> list[list[Tile]]:
    """One row per query (``query, label, path``) and its neighbours from ``table``, in rank order."""
    rows = []
    for q in queries.itertuples(index=False):
        given = str(q.label)
        row = [Tile(str(q.path), _short(str(q.query)), given, QUERY_COLOUR)]
        g = table[table["query"] == q.query].sort_values("rank")
        for nb in (g if k is None else g.head(k)).itertuples(index=False):
            colour = DIFFERENT_COLOUR if given != "(new image)" and str(nb.label) != given else SAME_COLOUR
            row.append(Tile(str(nb.path), str(nb.label), f"cos {nb.similarity:.3f}", colour))
        rows.append(row)
    return rows


def neighbor_sheet(table: pd.DataFrame, queries: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """Contact sheet of ``probes neighbors``: each query, then its neighbours in rank order."""
    render(neighbor_rows(table, queries), path, title or "query (red) and nearest neighbours (cosine)")
    return Path(path)


def _short(text: str) -> str:
    """A query's caption: the file name of an image path, else the id itself."""
    return Path(text).name if os.sep in text and "\n" not in text else text
