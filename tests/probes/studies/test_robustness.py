"""Robustness study on real Chula RBC-12 cells: clean training, blurred test cells at the 40×40 grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import embedcache
from embedcache_cli.probes_app import app
from probes import robustness
from probes.errors import ProbeError
from probes.studies.robustness import drop_slope

MODEL = "timm:test_vit"
SIGMAS = "0.4,1.6"


@pytest.fixture(scope="module")
def store(tmp_path_factory, chula_cells):
    """The 832 bundled Chula cells, test split by smear, clean + blur-pre/blur-post at S = 40 for the test cells."""
    root = tmp_path_factory.mktemp("robust")
    df = chula_cells.copy()
    df["split"] = np.where(df["smear"].astype(int) % 4 == 0, "test", "train")
    manifest = root / "chula.csv"
    df.to_csv(manifest, index=False)
    out = root / "cache.zarr"
    embedcache.extract(
        MODEL,
        manifest,
        out,
        weights="random",
        input_size=48,
        working_size=40,
        perturb=[f"blur-pre:{SIGMAS}", f"blur-post:{SIGMAS}"],
        progress=False,
        num_workers=1,
        chunk_size=400,
        batch_size=100,
    )
    return out


def test_slope_matches_a_hand_calculation():
    sig = [0, 0.4, 1.6]
    y = [0.9, 0.85, 0.5]
    x = np.log2(1 + np.array(sig))  # 0, 0.48543, 1.37851
    xm, ym = x.mean(), np.mean(y)
    hand = ((x - xm) * (np.array(y) - ym)).sum() / ((x - xm) ** 2).sum()
    assert drop_slope(sig, y) == pytest.approx(hand)
    assert drop_slope([0, 1, 3], [1.0, 0.8, 0.6]) == pytest.approx(-0.2)  # x = 0, 1, 2: exactly linear
    assert np.isnan(drop_slope([0.4], [0.5]))


def test_robustness_scores_the_same_test_cells_clean_and_perturbed(store, tmp_path):
    res = robustness(
        store, MODEL, perturb="blur-pre,blur-post", probes="logistic,knn", seeds=2, out=tmp_path / "r", quiet=True
    )
    r = res.results
    assert res.params["split"] == "column"  # the store's split column: the cells the perturbed sets cover
    obs = embedcache.open_store(store).dataset().obs
    n_test = int((obs["split"] == "test").sum())
    assert (r["n_test"] == n_test).all() and r["n_test"].nunique() == 1
    assert set(r["perturbation"]) == {"clean", "blur-pre", "blur-post"}
    assert sorted(r.loc[r.perturbation == "blur-post", "sigma"].unique()) == [0.4, 1.6]
    assert r.loc[r.perturbation == "blur-post", "feature_key"].str.endswith(("/blur-post-0.4", "/blur-post-1.6")).all()
    s = res.summary
    # the clean score is shared: delta 0 at sigma 0; the delta is the difference of seed means
    assert (s.loc[s.sigma == 0, "delta_macro_f1"].abs() < 1e-12).all()
    for row in s[s.sigma > 0].itertuples():
        sel = (r.backbone == row.backbone) & (r.probe == row.probe) & (r.metric == "macro_f1")
        mean = r[sel & (r.perturbation == row.perturbation) & (r.sigma == row.sigma)]["value"].mean()
        clean = r[sel & (r.perturbation == "clean")]["value"].mean()
        assert row.macro_f1 == pytest.approx(mean) and row.delta_macro_f1 == pytest.approx(mean - clean)
    for row in res.slopes.itertuples():
        g = s[(s.probe == row.probe) & (s.perturbation == row.perturbation)].sort_values("sigma")
        assert row.slope == pytest.approx(drop_slope(g.sigma, g.macro_f1))
    # heavy blur changes what the probe sees: some prediction-level score moves
    assert not np.allclose(s[s.sigma == 1.6]["macro_f1"], s[s.sigma == 0]["macro_f1"])
    for f in ("results.csv", "results.parquet", "summary.csv", "slopes.csv", "study.json", "robustness.png"):
        assert (res.out / f).is_file()
    assert Image.open(res.out / "robustness.png").size[0] > 800  # two panels side by side
    # intervals over test cells: each score's, the seed mean's, and Δ's paired interval
    agg = r[r.metric.isin(["macro_f1", "accuracy"])]
    assert ((agg.low <= agg.value) & (agg.value <= agg.high)).all()
    assert ((s.macro_f1_low <= s.macro_f1) & (s.macro_f1 <= s.macro_f1_high)).all()
    blurred = s[s.sigma > 0]
    assert ((blurred.delta_low <= blurred.delta_macro_f1) & (blurred.delta_macro_f1 <= blurred.delta_high)).all()
    assert s.loc[s.sigma == 0, "delta_low"].isna().all()
    # compare.csv: every perturbed level against clean, per fit (backbone x probe x seed), nothing else
    c = pd.read_csv(res.out / "compare.csv")
    assert len(c) == 2 * 2 * 4 and (c.perturbation_a == "clean").all() and (c.perturbation_b != "clean").all()
    one = c[(c.probe == "knn") & (c.seed == c.seed.min())]
    knn = r[(r.probe == "knn") & (r.seed == c.seed.min()) & (r.metric == "macro_f1")].set_index(
        ["perturbation", "sigma"]
    )
    for row in one.itertuples():
        assert row.diff == pytest.approx(
            knn.loc[(row.perturbation_b, row.sigma_b), "value"] - knn.loc[("clean", 0.0), "value"]
        )


def test_missing_perturbation_is_a_clear_error(store, tmp_path):
    with pytest.raises(ProbeError, match="no 'jpeg' feature sets.*--perturb jpeg"):
        robustness(store, MODEL, perturb="jpeg", out=tmp_path / "x", quiet=True)


def test_cli_robustness(store, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "robustness",
            "--store",
            str(store),
            "--model",
            MODEL,
            "--perturb",
            "blur-post",
            "--probe",
            "logistic",
            "--out",
            str(tmp_path / "cli"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "slope" in res.output and (tmp_path / "cli" / "slopes.csv").is_file()
    slopes = pd.read_csv(tmp_path / "cli" / "slopes.csv")
    assert list(slopes.perturbation) == ["blur-post"]
    bad = CliRunner().invoke(app, ["robustness", "--store", str(store), "--model", "nope"])
    assert bad.exit_code == 1 and "no features for 'nope'" in bad.output
