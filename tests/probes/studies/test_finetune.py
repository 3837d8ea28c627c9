"""Fine-tunes as study probes, on real bundled Chula cells with a tiny random-init ViT (timm:test_vit, 64 px):
`probes scale` / `probes eval` / `probes finetune` with lp, ft-last, lora and scratch-vit, their tables,
training curves, adapters, and the clear errors of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import embedcache
import probes
from embedcache.backbones.loading import load_backbone
from embedcache.backbones.preprocess import Preprocessing
from embedcache.backbones.tail import tail_tokens
from embedcache.store import open_store, tokens_name
from probes.errors import ProbeError
from probes.studies.finetune import finetune
from probes.tuning import load_adapter, read_adapter_meta
from probes.tuning.augment import CellImages, augment_image, parse_augment
from probes.tuning.scratch import scratch_vit
from probes.tuning.study_inputs import RowsReader

MODEL = "timm:test_vit"
SIZE = 64
FAST = dict(epochs=2, batch_size=64, device="cpu", quiet=True)


def _extract(root, df, name="cache.zarr"):
    manifest = root / "cells.csv"
    df.to_csv(manifest, index=False)
    out = root / name
    embedcache.extract(
        MODEL,
        manifest,
        out,
        weights="random",
        input_size=SIZE,
        label_column="label_name",
        progress=False,
        num_workers=0,
        chunk_size=64,
        batch_size=64,
    )
    return out


def add_tail_tokens(store_path, k: int, poison_row: int | None = None) -> np.ndarray:
    """Cache the tokens entering the last ``k`` blocks in the store's feature set, computed from the real cells
    by :func:`embedcache.backbones.tail.tail_tokens` (what ``embedcache extract --tail-blocks k`` stores)."""
    ds = open_store(store_path, "a").dataset()
    fs = ds.find_feature_set(MODEL)
    prov = fs.attrs["provenance"]
    bb = load_backbone(MODEL, weights="random")
    p = prov["preprocessing"]
    prep = Preprocessing(p["size"], p["interpolation"], tuple(p["mean"]), tuple(p["std"]), p["fit"])
    x = torch.from_numpy(CellImages(ds.obs["path"].tolist(), prep).read(np.arange(ds.n)))
    tokens = tail_tokens(bb, x, k).numpy().astype(np.float16)
    if poison_row is not None:
        tokens[poison_row] = np.inf  # the tail's LayerNorm turns it into NaN
    fs = ds.require_feature_set(
        fs.key,
        width=int(fs.attrs["width"]),
        pools=fs.pools,
        chunk_size=fs.chunk_size,
        dtype=fs.attrs["dtype"],
        provenance=prov,
        fingerprint=fs.attrs["fingerprint_fields"],
        tokens={tokens_name(k): tokens.shape[1:]},
    )
    ok, err = fs.ok(), fs.errors().to_numpy()
    for c in range(fs.n_chunks):
        r = fs.chunk_rows(c)
        fs.write_chunk(c, {tokens_name(k): tokens[r]}, ok[r], err[r])
    return tokens


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """130 real cells (10 per class, 13 classes) extracted with the tiny ViT, tail tokens k=1 and k=2 cached."""
    root = tmp_path_factory.mktemp("ftstudy")
    df = chula_cells.groupby("label_name").head(10).reset_index(drop=True)
    out = _extract(root, df)
    add_tail_tokens(out, 1)
    add_tail_tokens(out, 2)
    return out


def test_fine_tunes_sit_beside_probes_in_one_scale_study(store, tmp_path):
    res = probes.scale(
        store, MODEL, limits="5,10", probes="knn,lp,ft-last", seeds=2, tail_blocks=1, out=tmp_path / "s", **FAST
    )
    r = res.results[(res.results["metric"] == "macro_f1")]
    assert set(r["probe"]) == {"knn", "lp", "ft-last"}
    # the same splits for every probe: same limits, seeds, train and test sizes
    sizes = r.groupby(["probe"])[["limit", "seed", "n_train", "n_test"]].apply(
        lambda g: tuple(map(tuple, g.sort_values(["limit", "seed"]).to_numpy()))
    )
    assert sizes["lp"] == sizes["ft-last"] == sizes["knn"]
    assert ((r["value"] >= 0) & (r["value"] <= 1)).all()
    # fits.csv: the fine-tunes' chosen epoch and trainable parameter count; epochs.csv: the training curves
    fits = pd.read_csv(tmp_path / "s" / "fits.csv")
    ft = fits[fits["probe"] == "ft-last"]
    assert len(ft) == 4 and (ft["epochs_run"] == 2).all() and ft["best_epoch"].between(1, 2).all()
    assert (ft["n_trainable"] > fits.loc[fits["probe"] == "lp", "n_trainable"].max()).all()
    assert fits.loc[fits["probe"] == "knn", "epochs_run"].isna().all()
    ep = pd.read_csv(tmp_path / "s" / "epochs.csv")
    assert set(ep["probe"]) == {"lp", "ft-last"} and len(ep) == 2 * 2 * 2 * 2  # probes x limits x seeds x epochs
    assert np.isfinite(ep["train_loss"]).all() and ep["val_macro_f1"].between(0, 1).all()
    png = tmp_path / "s" / "training_curves.png"
    assert png.stat().st_size > 5000 and (tmp_path / "s" / "scaling.png").exists()
    assert "training_curves.png" in json.loads((tmp_path / "s" / "study.json").read_text())["files"]
    assert json.loads((tmp_path / "s" / "study.json").read_text())["params"]["finetune"]["tail_blocks"] == 1


def test_lora_on_two_cached_blocks_with_a_token_head_and_focal_loss(store, tmp_path):
    res = probes.scale(
        store,
        MODEL,
        limits="8",
        probes="lora",
        seeds=1,
        tail_blocks=2,
        lora_rank=4,
        head="decoder",
        loss="focal",
        gamma=2.0,
        out=tmp_path / "l",
        **FAST,
    )
    fits = res.fits
    assert list(fits["probe"]) == ["lora"] and fits["n_trainable"].iat[0] > 0
    assert res.epochs is not None and len(res.epochs) == 2


def test_cli_scale_with_fine_tunes(store, tmp_path):
    from embedcache_cli.probes_app import app

    res = CliRunner().invoke(
        app,
        [
            "scale",
            "-s",
            str(store),
            "-m",
            MODEL,
            "--limits",
            "8",
            "--probes",
            "lp,ft-last",
            "--seeds",
            "1",
            "--tail-blocks",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--head",
            "mlp",
            "-o",
            str(tmp_path / "c"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "c" / "results.csv")["probe"]) == {"lp", "ft-last"}
    assert (tmp_path / "c" / "training_curves.png").exists()


def test_eval_save_adapter_writes_loadable_files_with_provenance(store, tmp_path):
    res = probes.evaluate(
        store, MODEL, probes="ft-last", tail_blocks=1, save_adapter=tmp_path / "ad", out=tmp_path / "e", **FAST
    )
    meta = read_adapter_meta(tmp_path / "ad")
    bb = load_backbone(MODEL, weights="random")
    assert meta["method"] == "ft-last" and meta["backbone"] == MODEL and meta["k"] == 1
    assert meta["weights"]["sha256"] == bb.weights["sha256"] and len(meta["data_digest"]) == 64
    ad = load_adapter(tmp_path / "ad")
    assert ad.classes == sorted(set(res.results["class"]) - {""})  # the trained classes, in code order
    # the adapter's unfrozen last block differs from the base: training changed it and the file holds it
    base, tuned = bb.model.state_dict(), ad.backbone.model.state_dict()
    assert not torch.equal(base["blocks.5.mlp.fc1.weight"], tuned["blocks.5.mlp.fc1.weight"])
    assert torch.equal(base["blocks.0.mlp.fc1.weight"], tuned["blocks.0.mlp.fc1.weight"])


def test_finetune_lora_all_blocks_from_images_with_augmentations_and_hierarchical_loss(store, tmp_path, chula_cells):
    classes = sorted(chula_cells["label_name"].unique())
    yaml = tmp_path / "lineage.yaml"
    yaml.write_text(
        f"lineages:\n  a: [{classes[0]}, {classes[1]}, {classes[2]}]\npenalties:\n"
        f"  - {{true: {classes[0]}, pred: {classes[3]}, weight: 5}}\nsmoothing: 0.1\ngamma: 2\n"
    )
    res = finetune(
        store,
        MODEL,
        method="lora",
        blocks="all",
        augment="flip,rot90,color,blur",
        loss="hierarchical-focal",
        hierarchy=yaml,
        lora_rank=2,
        out=tmp_path / "f",
        **FAST,
    )
    fits = res.fits
    assert list(fits["probe"]) == ["lora"] and fits["epochs_run"].iat[0] == 2
    assert set(res.results["metric"]) >= {"macro_f1", "accuracy"}
    assert (tmp_path / "f" / "training_curves.png").exists() and (tmp_path / "f" / "epochs.csv").exists()
    assert json.loads((tmp_path / "f" / "study.json").read_text())["params"]["finetune"]["augment"] == [
        "flip",
        "rot90",
        "color",
        "blur",
    ]


def test_scratch_vit_is_the_papers_1_89_m_parameter_network():
    net = scratch_vit(20)
    n = sum(p.numel() for p in net.parameters())
    assert 1.88e6 < n < 1.90e6, n  # the paper: 1.89 M
    assert net.patch_embed.num_patches == 25 and net.embed_dim == 160 and len(net.blocks) == 6
    assert net.blocks[0].attn.num_heads == 4 and net.blocks[0].mlp.fc1.out_features == 640
    assert net(torch.zeros(2, 3, 40, 40)).shape == (2, 20)


def test_scratch_vit_trains_on_the_cells_in_the_same_results_table(store, tmp_path):
    res = finetune(
        store, MODEL, method="scratch-vit", epochs=1, batch_size=64, device="cpu", quiet=True, out=tmp_path / "sv"
    )
    assert list(res.fits["probe"]) == ["scratch-vit"] and 1.88e6 < res.fits["n_trainable"].iat[0] < 1.90e6
    assert set(res.results.columns) >= {"backbone", "probe", "metric", "value", "n_train"}


def test_augmentations_are_seeded_and_change_only_training_reads(chula_cells):
    img = np.asarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3)), dtype=np.uint8)
    a = augment_image(img, parse_augment("flip,rot90,color,blur"), np.random.default_rng(3))
    b = augment_image(img, parse_augment("flip,rot90,color,blur"), np.random.default_rng(3))
    assert np.array_equal(a, b) and a.dtype == np.uint8 and a.shape == img.shape
    with pytest.raises(ValueError, match="unknown augmentation.*shear.*flip, rot90"):
        parse_augment("flip,shear")
    prep = Preprocessing(32, "bicubic", (0.5,) * 3, (0.5,) * 3)
    paths = chula_cells["path"].tolist()[:8]
    r1, r2 = (
        CellImages(paths, prep, augment="flip,rot90,color", seed=1),
        CellImages(paths, prep, augment="color", seed=1),
    )
    rows = np.arange(8)
    assert np.array_equal(r1.read(rows), CellImages(paths, prep).read(rows))  # hold-out reads: never augmented
    assert not np.array_equal(r1.read_train(rows), r1.read(rows))
    assert np.array_equal(
        CellImages(paths, prep, augment="flip,rot90,color", seed=1).read_train(rows),
        CellImages(paths, prep, augment="flip,rot90,color", seed=1).read_train(rows),
    )
    assert r2.read_train(rows).shape == (8, 3, 32, 32)


def test_rows_reader_restricts_and_keeps_the_order():
    base = np.arange(20, dtype=np.float32).reshape(10, 2)
    from probes.tuning import ArrayTokens

    view = RowsReader(ArrayTokens(base), np.array([7, 2, 9, 2]))
    assert len(view) == 4 and view.kind == "tokens"
    np.testing.assert_array_equal(view.read(np.array([0, 1, 3])), base[[7, 2, 2]])
    np.testing.assert_array_equal(RowsReader(view, np.array([2, 0])).read(np.array([0, 1])), base[[9, 7]])


# -------------------------------------------------------------------------------------------- bad input


def test_no_cached_tail_tokens_names_the_extract_flag(store, tmp_path):
    with pytest.raises(ProbeError, match="--tail-blocks 3"):
        probes.scale(store, MODEL, limits="8", probes="ft-last", seeds=1, tail_blocks=3, out=tmp_path / "x", **FAST)
    with pytest.raises(ProbeError, match="give --tail-blocks K"):
        probes.scale(store, MODEL, limits="8", probes="ft-last", seeds=1, out=tmp_path / "y", **FAST)


def test_tail_blocks_beyond_the_depth(store, tmp_path):
    with pytest.raises(ProbeError, match=r"k=7 blocks does not fit .* 6 blocks: use 1..6"):
        probes.scale(store, MODEL, limits="8", probes="lora", seeds=1, tail_blocks=7, out=tmp_path / "x", **FAST)


def test_images_gone_for_blocks_all(tmp_path, chula_cells):
    df = chula_cells.groupby("label_name").head(3).reset_index(drop=True)
    cells = tmp_path / "cells"
    cells.mkdir()
    for p in df["path"]:
        shutil.copy(p, cells / p.split("/")[-1])
    df["path"] = [str(cells / p.split("/")[-1]) for p in df["path"]]
    out = _extract(tmp_path, df)
    shutil.rmtree(cells)
    with pytest.raises(ProbeError, match=r"re-reads the cell images .*39 of 39 images are gone"):
        finetune(out, MODEL, method="lora", blocks="all", out=tmp_path / "f", **FAST)
    assert not (tmp_path / "f").exists()  # refused before anything was written


def test_weights_other_than_the_cached_tokens_are_refused(store, tmp_path):
    st = open_store(store, "a")
    fs = st.dataset().find_feature_set(MODEL)
    prov = fs.attrs["provenance"]
    forged = {**prov, "weights": {**prov["weights"], "sha256": "0" * 64}}
    fs.group.update_attributes({"provenance": forged})
    try:
        with pytest.raises(ProbeError, match="token cache made by other weights than the ones loaded"):
            probes.scale(store, MODEL, limits="8", probes="ft-last", seeds=1, tail_blocks=1, out=tmp_path / "x", **FAST)
    finally:
        fs.group.update_attributes({"provenance": prov})


def test_nan_loss_stops_the_study_naming_the_epoch(tmp_path, chula_cells):
    df = chula_cells.groupby("label_name").head(6).reset_index(drop=True)
    out = _extract(tmp_path, df)
    add_tail_tokens(out, 1, poison_row=0)
    with pytest.raises(ProbeError, match=r"ft-last.*loss became nan at epoch 1"):
        probes.evaluate(out, MODEL, probes="ft-last", tail_blocks=1, out=tmp_path / "e", **FAST)
    assert not (tmp_path / "e" / "results.csv").exists()


def test_bad_options_are_clear(store, tmp_path):
    with pytest.raises(ProbeError, match="unknown head 'conv'"):
        probes.scale(store, MODEL, limits="8", probes="ft-last", tail_blocks=1, head="conv", out=tmp_path / "a", **FAST)
    with pytest.raises(ProbeError, match="needs --hierarchy"):
        probes.scale(store, MODEL, limits="8", probes="lp", loss="hierarchical-focal", out=tmp_path / "b", **FAST)
    with pytest.raises(ProbeError, match="saves a fine-tune"):
        probes.evaluate(store, MODEL, probes="logistic", save_adapter=tmp_path / "ad", out=tmp_path / "c", **FAST)


def test_cli_finetune_and_eval_save_adapter(store, tmp_path):
    from embedcache_cli.probes_app import app

    run = CliRunner().invoke
    res = run(
        app,
        [
            "finetune",
            "-s",
            str(store),
            "-m",
            MODEL,
            "--method",
            "ft-last",
            "--blocks",
            "1",
            "--augment",
            "flip,rot90",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "f"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(tmp_path / "f" / "fits.csv")["probe"]) == ["ft-last"]
    res = run(
        app,
        [
            "eval",
            "-s",
            str(store),
            "-m",
            MODEL,
            "--probe",
            "lora",
            "--tail-blocks",
            "1",
            "--lora-rank",
            "2",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--save-adapter",
            str(tmp_path / "ad"),
            "-o",
            str(tmp_path / "e"),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert read_adapter_meta(tmp_path / "ad")["lora"]["rank"] == 2
    res = run(
        app,
        ["finetune", "-s", str(store), "-m", MODEL, "--method", "ft-last", "--blocks", "9", "-o", str(tmp_path / "g")],
    )
    assert res.exit_code == 1 and "use 1..6" in res.output


def test_hierarchy_naming_an_unknown_class_is_refused_with_its_line_and_restricted_per_fit(
    store, tmp_path, chula_cells
):
    from probes.tuning.losses import load_hierarchy
    from probes.tuning.study_inputs import restrict_hierarchy

    bad = tmp_path / "bad.yaml"
    bad.write_text("lineages:\n  a: [normal, blast]\nsmoothing: 0.1\n")
    with pytest.raises(ProbeError, match=r"line 2: unknown class 'blast'"):
        probes.scale(
            store, MODEL, limits="8", probes="lp", loss="hierarchical-focal", hierarchy=bad, out=tmp_path / "x", **FAST
        )
    classes = sorted(chula_cells["label_name"].unique())
    good = tmp_path / "good.yaml"
    good.write_text(
        f"lineages:\n  a: [{classes[0]}, {classes[1]}, {classes[2]}]\npenalties:\n"
        f"  - {{true: {classes[0]}, pred: {classes[3]}, weight: 5}}\nsmoothing: 0.2\n"
    )
    h = restrict_hierarchy(load_hierarchy(good), classes[1:])  # classes[0] left out at some limit
    Q, P = h.matrices(classes[1:])
    assert P.abs().sum() == 0 and Q[0, 1] == pytest.approx(0.2) and Q[0, 0] == pytest.approx(0.8)
