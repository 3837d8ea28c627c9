"""Any id or label text is safe in every output: captions fit linearly, newlines never break a row."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import embedcache
from probes.reporting.contact import TILE, Tile, _font, fit_caption, render
from probes.reporting.text import one_line

RESNET = "timm:test_resnet"


def test_one_line_escapes_every_control_character():
    assert one_line("a\nb\r\tc\x00d\x7f\u2028e") == "a\\nb\\r\\tc\\x00d\\x7f\\u2028e"
    assert one_line("plain [bold] text ü") == "plain [bold] text ü"


def test_a_100000_character_label_renders_and_its_caption_fits_the_tile():
    label = "metamyelocyte-" * 7143  # 100,002 characters
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    cap = fit_caption(label, TILE, draw)
    assert cap.endswith("…") and 1 < len(cap) < 40
    assert draw.textlength(cap, font=_font()) <= TILE
    assert label.startswith(cap[:-1])
    # the longest prefix that fits: one more character would not
    assert draw.textlength(label[: len(cap)] + "…", font=_font()) > TILE
    sheet = render([[Tile("/no/such/file.png", label, "x\n" * 50_000)]])
    assert sheet.size[0] >= TILE
    assert fit_caption("short", TILE, draw) == "short"


@pytest.fixture(scope="module")
def newline_store(tmp_path_factory, chula_manifest):
    """240 real Chula cells; the first cell's id holds a newline and a control character."""
    root = tmp_path_factory.mktemp("newline")
    df = chula_manifest.groupby("label_name").head(20).head(240).copy()
    df["label"] = df["label_name"]
    df["id"] = [f"cell-{i}" for i in range(len(df))]
    df.iloc[0, df.columns.get_loc("id")] = "two\nlines\x07 [red]id[/]"
    manifest = root / "m.csv"
    df[["id", "path", "label"]].to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(
        RESNET,
        manifest,
        out,
        input_size=64,
        weights="random",
        progress=False,
        num_workers=0,
        chunk_size=256,
        batch_size=64,
    )
    return out


def test_an_id_with_a_newline_through_neighbors_its_sheet_and_the_audit_html(newline_store, tmp_path):
    import probes
    from embedcache_cli.probes_app import app

    store = tmp_path / "cache.zarr"
    shutil.copytree(newline_store, store)
    odd = "two\nlines\x07 [red]id[/]"
    ids = embedcache.open_store(store).dataset().obs["id"].tolist()
    assert odd in ids

    res = probes.neighbors(store, RESNET, id=odd, k=4, pool="mean", out=tmp_path / "nb")
    assert (res.table["query"] == odd).all() and len(res.table) == 4
    assert Image.open(res.files["neighbors.png"]).size[0] > 4 * TILE
    back = pd.read_csv(res.files["neighbors.csv"], keep_default_na=False)
    assert (back["query"] == odd).all()  # the CSV keeps the id exactly

    r = CliRunner().invoke(
        app, ["neighbors", "--store", str(store), "--model", RESNET, "--pool", "mean", "--id", odd, "-k", "3"]
    )
    assert r.exit_code == 0, r.output
    assert "two\\nlines\\x07 [red]id[/]" in r.output  # printed as one line, markup shown as text

    aud = probes.audit(
        store,
        RESNET,
        pool="mean",
        probes="knn",
        seeds=1,
        folds=3,
        top=240,
        out=tmp_path / "a",
        cache=False,
        quiet=True,
        threads=1,
    )
    html = (tmp_path / "a" / "report.html").read_text(encoding="utf-8")
    assert "two\\nlines\\x07 [red]id[/]" in html and odd not in html and "\x07" not in html
    assert Image.open(aud.files["suspects.png"]).size[0] > TILE
    suspects = pd.read_csv(aud.files["suspects.csv"], keep_default_na=False)
    assert odd in set(suspects["id"])
    assert np.isfinite(suspects["score"]).all()
