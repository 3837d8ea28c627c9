"""A newcomer's flows (issue 17): piped output keeps every number, a backbone name picks its clean set,
per-backbone pooling, imports beside extracted cells, limit notes, hints naming what the user typed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import embedcache
from embedcache_cli.embedcache_app import app as embedcache_app
from embedcache_cli.probes_app import app as probes_app
from tests.paths import REPO

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """104 real Chula cells (8 per class, a split column): test_vit at working size 40 with two blurred
    copies (cls by default), test_resnet (mean by default), both at 32 px."""
    root = tmp_path_factory.mktemp("newcomer")
    df = chula_cells.groupby("label").head(8).reset_index(drop=True)
    df["split"] = ["test" if i % 4 == 0 else "train" for i in range(len(df))]
    df[["path", "label", "split"]].to_csv(root / "cells.csv", index=False)
    out = root / "cache.zarr"
    kw = dict(weights="random", input_size=32, progress=False, num_workers=0)
    embedcache.extract("timm:test_vit", root / "cells.csv", out, working_size=40, perturb=["blur-post:0.4,0.8"], **kw)
    embedcache.extract("timm:test_resnet", root / "cells.csv", out, **kw)
    return out


def _run(app, args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_models_table_keeps_every_hub_id_when_piped():
    from embedcache.backbones.registry import list_models

    out = _run(embedcache_app, ["models"])
    for s in list_models():
        assert s.name in out
        if s.hub_id:
            assert s.hub_id in out, f"{s.hub_id} cut from the piped table"
    assert "…" not in out


def test_piped_console_is_wide_and_tables_fold():
    from embedcache_cli.common import LOG_WIDTH, Table, make_console

    assert make_console().width >= LOG_WIDTH  # pytest captures stdout: not a terminal
    t = Table()
    t.add_column("x")
    assert t.columns[0].overflow == "fold"


def test_robustness_table_prints_every_sigma_and_number(store, tmp_path):
    out = _run(
        probes_app,
        [
            "robustness",
            "--store",
            store,
            "--model",
            "timm:test_vit",
            "--perturb",
            "blur-post",
            "--out",
            tmp_path / "rob",
            "-q",
        ],
    )
    for sigma in ("σ=0", "σ=0.4", "σ=0.8"):
        assert sigma in out
    summary = pd.read_csv(tmp_path / "rob" / "summary.csv")
    for v in summary["macro_f1"]:
        assert f"{v:.3f}" in out
    for v in summary.loc[summary["sigma"] > 0, "delta_macro_f1"]:
        assert f"({v:+.3f})" in out


def test_scale_summary_keeps_every_number_per_backbone_pooling_and_limit_note(store, tmp_path):
    out = _run(
        probes_app,
        [
            "scale",
            "--store",
            store,
            "--model",
            "timm:test_vit,timm:test_resnet",
            "--limits",
            "3..6",
            "--split",
            "column",
            "--seeds",
            "1",
            "--out",
            tmp_path / "sc",
            "-q",
        ],
    )
    res = pd.read_csv(tmp_path / "sc" / "results.csv")
    pools = res.groupby("backbone")["pool"].first().to_dict()
    assert pools == {"timm:test_vit": "cls", "timm:test_resnet": "mean"}  # each backbone's own default
    f1 = res[res["metric"] == "macro_f1"]
    for v in f1["value"]:
        assert f"{v:.3f}" in out
    assert "--limits 3..6 means the powers of two from 3 to 6: 4" in out


def test_pool_per_backbone_form(store, tmp_path):
    from probes.errors import ProbeError
    from probes.features.cells import open_cells, parse_pool

    cells = open_cells(store, "timm:test_resnet,timm:test_vit", pool="timm:test_resnet=mean,cls")
    assert cells.pools == {"timm:test_resnet": "mean", "timm:test_vit": "cls"}
    assert cells.features("timm:test_resnet", np.arange(3)).shape[0] == 3
    assert parse_pool("mean", ["a"]) == ("mean", {})
    with pytest.raises(ProbeError, match="not among --model"):
        parse_pool("timm:nope=mean", ["timm:test_vit"])
    with pytest.raises(ProbeError, match="has no 'cls' features.*--pool timm:test_resnet=mean"):
        open_cells(store, "timm:test_resnet", pool="cls")


def test_backbone_name_picks_its_clean_set_not_a_perturbed_one(store, tmp_path):
    ds = embedcache.open_store(store).dataset()
    assert ds.find_feature_set("timm:test_vit").key.endswith("/clean")
    _run(
        probes_app,
        ["eval", "--store", store, "--model", "timm:test_vit", "--split", "column", "--out", tmp_path / "ev", "-q"],
    )
    res = pd.read_csv(tmp_path / "ev" / "results.csv")
    assert set(res["feature_key"]) == {"timm-test_vit@random/32-bicubic-ws40/clean"}


def test_several_clean_sets_say_how_to_select_one(store, tmp_path):
    import shutil

    copy = tmp_path / "two.zarr"
    shutil.copytree(store, copy)
    cells = tmp_path / "cells.csv"
    obs = embedcache.open_store(copy).dataset().obs
    obs[["path", "label", "split"]].to_csv(cells, index=False)
    embedcache.extract(
        "timm:test_vit",
        cells,
        copy,
        dataset=embedcache.open_store(copy).datasets()[0],
        weights="random",
        input_size=32,
        progress=False,
        num_workers=0,
    )
    ds = embedcache.open_store(copy).dataset()
    with pytest.raises(embedcache.store.StoreError, match=r"2 clean feature sets.*--model timm-test_vit@random/32"):
        ds.find_feature_set("timm:test_vit")
    assert ds.find_feature_set("timm:test_vit@random/32-bicubic-ws40").key.endswith("ws40/clean")
    assert ds.find_feature_set("timm-test_vit@random/32-bicubic").key == "timm-test_vit@random/32-bicubic/clean"


def test_missing_backbone_hint_uses_the_name_as_typed(store):
    r = runner.invoke(probes_app, ["scale", "--store", str(store), "--model", "timm:resnet18", "-q"])
    assert r.exit_code == 1
    assert "run: embedcache extract --model timm:resnet18 " in r.output
    assert "timm-resnet18 ..." not in r.output


def test_limits_note_only_when_reinterpreted():
    from probes.sampling import limits_note, parse_limits

    assert parse_limits("100..300") == [128, 256]
    assert "128, 256" in limits_note("100..300", [128, 256])
    assert limits_note("256..1024", parse_limits("256..1024")) is None
    assert limits_note("100,300", [100, 300]) is None


def test_import_id_only_cell_list_goes_beside_the_extracted_cells(store, tmp_path):
    import shutil

    copy = tmp_path / "imp.zarr"
    shutil.copytree(store, copy)
    ds = embedcache.open_store(copy).dataset()
    ids = ds.obs["id"].to_numpy()
    x = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    perm = np.random.default_rng(1).permutation(len(ids))
    pd.DataFrame({"id": ids[perm]}).to_csv(tmp_path / "ids.csv", index=False)
    np.save(tmp_path / "x.npy", x[perm])
    _run(
        embedcache_app,
        [
            "import",
            "--features",
            tmp_path / "x.npy",
            "--cells",
            tmp_path / "ids.csv",
            "--model",
            "theirs",
            "--out",
            copy,
        ],
    )
    st = embedcache.open_store(copy)
    assert st.datasets() == [ds.name]  # beside the extracted cells, not a dataset named after the CSV
    back = st.dataset().find_feature_set("theirs").to_numpy("cls")
    np.testing.assert_allclose(back, x.astype(np.float16), rtol=0, atol=0)  # reordered to the store's order
    pd.DataFrame({"id": np.r_[ids[:-1], ["stranger"]]}).to_csv(tmp_path / "bad.csv", index=False)
    r = runner.invoke(
        embedcache_app,
        [
            "import",
            "--features",
            str(tmp_path / "x.npy"),
            "--cells",
            str(tmp_path / "bad.csv"),
            "--model",
            "other",
            "--out",
            str(copy),
        ],
    )
    assert r.exit_code == 1
    flat = re.sub(r"\s+", " ", r.output)
    assert "different cell list" in flat and "1 of the dataset's ids are not in it" in flat and "stranger" in flat


def test_export_anndata_obs_labels_and_obsm_shapes(store, tmp_path):
    anndata = pytest.importorskip("anndata")
    from embedcache.store.export import obsm_name

    _run(embedcache_app, ["export", store, "--anndata", tmp_path / "cells.h5ad"])
    a = anndata.read_h5ad(tmp_path / "cells.h5ad")
    ds = embedcache.open_store(store).dataset()
    assert a.n_obs == ds.n
    assert list(a.obs["label"]) == list(ds.obs["label"])
    for key in ds.feature_keys():
        fs = ds.feature_set(key)
        for p in fs.pools:
            assert a.obsm[obsm_name(key, p)].shape == (ds.n, fs.attrs["width"])
    assert set(a.uns["embedcache"]["feature_sets"]) == set(a.obsm.keys())


def test_info_json_has_provenance_perturbed_counts_and_corrections(store):
    import json

    out = _run(embedcache_app, ["info", store, "--json"])
    d = json.loads(out)
    (ds,) = d["datasets"].values()
    assert ds["label_corrections"] == 0
    for key, fs in ds["feature_sets"].items():
        prov = fs["provenance"]
        assert {"preprocessing", "versions", "compute", "created"} <= set(prov)
        if "blur-post" in key:
            assert fs["perturbed_cells"] == 26  # the test split: every 4th of 104 cells
    text = _run(embedcache_app, ["info", store])
    assert "perturbed" in text and "working size 40" in text


def test_blur_identity_benchmark_measures_real_cells(chula_cells):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from blur_identity import measure

    rows = measure([__import__("pathlib").Path(p) for p in chula_cells["path"][:3]], 40, [0.1, 0.8])
    assert rows[0]["max_abs_delta"] <= rows[1]["max_abs_delta"]
    assert rows[1]["unchanged_pixel_share"] < 1.0  # sigma 0.8 moves pixels of a real cell


def test_manifest_of_absolute_paths_gets_short_ids_and_old_stores_still_match(tmp_path, chula_cells):
    df = chula_cells.head(6)[["path", "label"]]
    assert all(p.startswith("/") for p in df["path"])
    df.to_csv(tmp_path / "cells.csv", index=False)
    src = embedcache.open_source(tmp_path / "cells.csv")
    assert src.table["id"].tolist() == [p.split("/")[-1] for p in df["path"]]  # below the common folder
    # a store written when ids were the absolute paths still matches the same manifest
    old = embedcache.open_source(tmp_path / "cells.csv")
    old.table["id"] = df["path"].tolist()
    embedcache.open_store(tmp_path / "old.zarr", mode="a").require_dataset(old, name="cells")
    ds = embedcache.open_store(tmp_path / "old.zarr", mode="a").require_dataset(src, name="cells")
    assert ds.obs["id"].tolist() == df["path"].tolist()  # the store's own ids stay
    # extracting into the old store reports cells by the store's ids (here: the one it cannot read)
    broken = df.copy()
    gone = str(Path(broken["path"].iat[2]).with_name("no_such_cell.jpg"))  # in the same folder: short ids
    broken.loc[broken.index[2], "path"] = gone
    broken.to_csv(tmp_path / "broken.csv", index=False)
    moved = embedcache.open_source(tmp_path / "broken.csv")
    old_moved = embedcache.open_source(tmp_path / "broken.csv")
    old_moved.table["id"] = broken["path"].tolist()
    embedcache.open_store(tmp_path / "old2.zarr", mode="a").require_dataset(old_moved, name="cells")
    res = embedcache.extract(
        "timm:test_vit",
        moved,
        tmp_path / "old2.zarr",
        dataset="cells",
        weights="random",
        input_size=32,
        on_error="skip",
        progress=False,
        num_workers=0,
    )
    assert moved.cell_id(2) == "no_such_cell.jpg" and moved.legacy_ids is not None
    assert [cell for cell, _ in res.skipped] == [gone]
    other = embedcache.open_source(tmp_path / "cells.csv")
    other.table["id"] = [f"x{i}" for i in range(6)]
    other.legacy_ids = None
    with pytest.raises(embedcache.StoreError, match="different cell list"):
        embedcache.open_store(tmp_path / "old.zarr", mode="a").require_dataset(other, name="cells")


def test_study_notes_labels_that_are_one_number_spelt_two_ways(tmp_path):
    import probes

    rng = np.random.default_rng(0)
    labels = np.array(["1", "01", "2"] * 20)
    x = rng.normal(size=(60, 8)).astype(np.float32) + (labels == "2")[:, None]
    cells = pd.DataFrame({"id": [f"c{i}" for i in range(60)], "label": labels})
    embedcache.import_features(tmp_path / "s.zarr", x, cells, backbone="theirs")
    res = probes.scale(tmp_path / "s.zarr", "theirs", limits="8", seeds=1, quiet=True, out=tmp_path / "scale")
    assert any("'01', '1' are one number spelt 2 ways" in n for n in res.notes), res.notes
