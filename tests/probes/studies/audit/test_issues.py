"""``probes audit --issues``: duplicates, leaks and outliers of a store's cells, one report with a tab each.

Real features (EfficientNet-Lite0, ImageNet) of 240 bundled Chula red cells with planted issues: 4 exact copies
re-saved as PNG (same pixels, other file), 4 copies shifted by one pixel (edge repeated) and re-encoded, each
copy on the other side of the split column from its original, and 6 BCCD white cells and platelets (another
data set) as outliers."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import embedcache
from probes.errors import ProbeError
from probes.studies.audit import audit
from tests.conftest import bundled

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, chula_cells):
    root = tmp_path_factory.mktemp("issues")
    base = chula_cells.sample(240, random_state=1).reset_index(drop=True)
    df = pd.DataFrame({"path": base["path"], "label": base["label_name"], "group": base["smear"]})
    df["split"] = np.where(np.arange(len(df)) % 4 == 0, "test", "train")
    rows = []
    for j in range(8):  # copies of train cells, put in test
        src = df.iloc[4 * j + 1]
        img = Image.open(src["path"]).convert("RGB")
        if j < 4:
            path = root / f"copy-{j}.png"  # the same pixels in another file
            img.save(path)
        else:
            path = root / f"shifted-{j}.jpg"  # moved by one pixel, re-encoded
            a = np.asarray(img)
            Image.fromarray(np.concatenate([a[:, :1], a[:, :-1]], axis=1)).save(path, quality=98)
        rows.append({"path": str(path), "label": src["label"], "group": f"copy{j}", "split": "test", "of": src["path"]})
    bccd = bundled("bccd_cells")
    foreign = sorted((bccd / "Platelets").glob("*.jpg"))[:3] + sorted((bccd / "WBC").glob("*.jpg"))[:3]
    rows += [{"path": str(p), "label": "normal", "group": f"bccd{i}", "split": "train"} for i, p in enumerate(foreign)]
    extra = pd.DataFrame(rows)
    manifest = root / "cells.csv"
    pd.concat([df, extra.drop(columns="of")], ignore_index=True).to_csv(manifest, index=False)
    store = root / "cache.zarr"
    embedcache.extract(MODEL, manifest, store, progress=False)
    obs = embedcache.open_store(store).dataset().obs
    name = dict(zip(obs["path"], obs["id"]))
    copies = [(name[r["of"]], name[r["path"]]) for r in rows[:8]]
    return store, copies, [name[str(p)] for p in foreign]


def test_duplicates_leaks_and_outliers_are_found_and_reported(planted, tmp_path):
    store, copies, foreign = planted
    res = audit(store, MODEL, issues="duplicate,leak,outlier", split="column", out=tmp_path / "a", quiet=True)
    t = pd.read_csv(tmp_path / "a" / "issues.csv", keep_default_na=False).set_index("id")
    assert {"duplicate_flag", "leak_flag", "outlier_flag", "outlier_why"} <= set(t.columns)
    assert not (tmp_path / "a" / "suspects.csv").exists()  # the label audit was not asked for
    pairs = res.issues.duplicates.pairs
    evidence = {tuple(sorted(p)): e for p, e in zip(zip(pairs["id_i"], pairs["id_j"]), pairs["evidence"])}
    found = set(evidence)
    exact, shifted = copies[:4], copies[4:]
    for a, b in exact:  # same pixels: found by the digests extraction recorded, named as such
        assert evidence.get(tuple(sorted((a, b)))) == "pixel"
    assert sum(tuple(sorted(c)) in found for c in shifted) >= 3  # a 1 px shift: near-duplicates by cosine
    for a, b in exact:
        assert t.at[a, "leak_flag"] and t.at[b, "leak_flag"] and "spans" in t.at[b, "leak_why"]
    assert t.loc[[c for pair in exact for c in pair], "duplicate_flag"].all()
    ranked = res.issues.outliers.ranking()["id"].tolist()
    assert sum(f in ranked[:15] for f in foreign) >= 4, [ranked.index(f) for f in foreign]
    html = (tmp_path / "a" / "report.html").read_text()
    assert re.findall(r"<button class=tab data-tab=(\w+)>", html) == ["duplicates", "leaks", "outliers"]
    for table in ("duplicates", "leaks", "outliers"):
        assert f"<table id={table} class=sortable>" in html
    assert html.count("data:image/jpeg;base64,") >= 10 and "http" not in html.split("<script>")[0]


def test_label_audit_and_issues_share_one_report_and_table(planted, tmp_path):
    store, _, _ = planted
    res = audit(store, MODEL, probes="knn", seeds=1, folds=3, out=tmp_path / "b", quiet=True, cache=False)
    t = pd.read_csv(tmp_path / "b" / "issues.csv")
    assert {"label_score", "label_flag", "label_rank", "duplicate_flag", "leak_flag", "outlier_flag"} <= set(t.columns)
    assert len(t) == len(res.table) and (tmp_path / "b" / "suspects.csv").exists()
    html = (tmp_path / "b" / "report.html").read_text()
    assert re.findall(r"<button class=tab data-tab=(\w+)>", html) == ["labels", "duplicates", "leaks", "outliers"]
    assert res.params["issues"] == ["label", "duplicate", "leak", "outlier"]


def test_the_cli_audits_issues(planted, tmp_path):
    from embedcache_cli.probes_app import app

    store, _, _ = planted
    args = ["audit", "--store", str(store), "--model", MODEL, "--issues", "duplicate,outlier"]
    args += ["--out", str(tmp_path / "c")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "duplicates:" in r.output and "outliers:" in r.output and "leaks:" not in r.output
    assert (tmp_path / "c" / "issues.csv").exists()
    bad = CliRunner().invoke(app, [*args[:5], "--issues", "labels,dupes", "--out", str(tmp_path / "d")])
    assert bad.exit_code != 0 and "unknown issue(s) labels, dupes" in bad.output


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(duplicate_threshold=0.0), "duplicate_threshold must be > 0"),
        (dict(duplicate_threshold=1.5), "duplicate_threshold must be <= 1"),
        (dict(issues="leak", split="sideways"), "leak_split"),
        (dict(issues="outlier", outlier_k=0), "outlier_k must be >= 1"),
    ],
)
def test_bad_issue_options_are_named(planted, tmp_path, kw, match):
    store, _, _ = planted
    with pytest.raises(ProbeError, match=match):
        audit(store, MODEL, out=tmp_path / "x", quiet=True, **kw)


def test_a_split_the_store_lacks_is_a_clear_error(tmp_path, chula_subset):
    store = tmp_path / "s.zarr"
    embedcache.extract("timm:test_vit", chula_subset(40), store, weights="random", progress=False, input_size=32)
    with pytest.raises(ProbeError, match="no split column values"):
        audit(store, "timm:test_vit", issues="leak", split="column", out=tmp_path / "x", quiet=True)
    res = audit(store, "timm:test_vit", issues="leak", out=tmp_path / "y", quiet=True)  # auto: a group split
    assert any("group split" in n for n in res.params["issue_notes"])
