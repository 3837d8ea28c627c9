"""Calibration metrics against hand computations, temperature scaling on real held-out cells, and the
``calibrate`` study (Python and CLI) on a store of real Chula features."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from probes import calibrate
from probes.calibration import (
    bin_ids,
    brier,
    calibration_metrics,
    ece,
    fit_temperature,
    mce,
    nll,
    reliability,
    scale_temperature,
)
from probes.errors import ProbeError
from probes.heads import make_probe
from tests.conftest import REPO
from tests.probes.studies.decision_stores import column_split, decision_store

# confidences 0.9, 0.8, 0.6, 0.7, 0.55; correct: yes, no, yes, yes, no
P = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
Y = np.array([0, 1, 0, 1, 0])


def fast_probe(name, seed=0, device="cpu"):
    """The registry's probes; logistic with one C (its sweep is slow on a loaded 2-core machine)."""
    return make_probe(name, seed=seed, device=device, **({"Cs": (1.0,)} if name == "logistic" else {}))


def test_ece_and_mce_equal_hand_computations():
    # equal width, 5 bins: (0.4, 0.6] {0.6, 0.55}: conf 0.575, acc 0.5; (0.6, 0.8] {0.8, 0.7}: conf 0.75, acc 0.5;
    # (0.8, 1] {0.9}: conf 0.9, acc 1  ->  ECE = (2 * 0.075 + 2 * 0.25 + 0.1) / 5 = 0.15, MCE = 0.25
    assert ece(P, Y, 5, "width") == pytest.approx(0.15)
    assert mce(P, Y, 5, "width") == pytest.approx(0.25)
    assert ece(P, Y, 2, "width") == pytest.approx(abs(0.6 - 0.71))  # one bin (0.5, 1]
    # equal mass, 2 bins over the sorted confidences: {0.55, 0.6, 0.7} conf 0.6167 acc 2/3; {0.8, 0.9} conf 0.85 acc 0.5
    assert ece(P, Y, 2, "mass") == pytest.approx((3 * abs(2 / 3 - 1.85 / 3) + 2 * 0.35) / 5)
    assert mce(P, Y, 2, "mass") == pytest.approx(0.35)
    t = reliability(P, Y, 5, "width")
    assert t["n"].tolist() == [2, 2, 1] and t["bin"].tolist() == [2, 3, 4]
    assert bin_ids(np.array([0.0, 0.2, 0.2000001, 1.0]), 5).tolist() == [0, 0, 1, 4]  # (lo, hi], 0 in the first


def test_brier_and_nll_equal_hand_computations():
    sq = [(0.1**2) * 2, (0.8**2) * 2, (0.4**2) * 2, (0.3**2) * 2, (0.55**2) * 2]
    assert brier(P, Y) == pytest.approx(np.mean(sq))
    assert nll(P, Y) == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.6, 0.7, 0.45])))
    from sklearn.metrics import log_loss

    assert nll(P, Y) == pytest.approx(log_loss(Y, P))
    m = calibration_metrics(P, Y, 5)
    assert set(m) == {"ece_width", "ece_mass", "mce_width", "mce_mass", "brier", "nll"}
    with pytest.raises(ValueError, match="integer class codes"):
        nll(P, np.array([0, 1, 2, 0, 0]))


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(20000, 5))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p_true])
    overconfident = scale_temperature(p_true, 0.5)  # logits doubled
    assert fit_temperature(overconfident, y) == pytest.approx(2.0, rel=0.05)
    assert (scale_temperature(overconfident, 2.0).argmax(1) == overconfident.argmax(1)).all()


def test_temperature_scaling_lowers_nll_on_held_out_real_cells(chula_features):
    X, y = chula_features
    rng = np.random.default_rng(1)
    part = rng.permutation(len(y)) % 3  # fit / validation / test thirds
    est = fast_probe("logistic").fit(X[part == 0], y[part == 0])
    codes = {c: i for i, c in enumerate(est.classes_)}
    p_val, p_test = est.predict_proba(X[part == 1]), est.predict_proba(X[part == 2])
    y_val = np.array([codes[c] for c in y[part == 1]])
    y_test = np.array([codes[c] for c in y[part == 2]])
    t = fit_temperature(p_val, y_val)  # fitted on validation cells only
    assert t != pytest.approx(1.0, abs=0.05)
    assert nll(scale_temperature(p_test, t), y_test) < nll(p_test, y_test) - 0.01
    assert ece(scale_temperature(p_test, t), y_test) < ece(p_test, y_test)


@pytest.fixture(scope="module")
def store(chula_features, tmp_path_factory):
    X, y = chula_features
    return decision_store(tmp_path_factory.mktemp("cal") / "c.zarr", X, y, split=column_split(y))


def test_calibrate_study_writes_tables_and_diagrams(store, tmp_path, capsys):
    res = calibrate(store, "vit", probes="logistic,knn", seeds=2, out=tmp_path / "c", show=True, make_probe=fast_probe)
    printed = capsys.readouterr().out
    assert "ECE (width)" in printed and "before" in printed and "after" in printed and "wrote" in printed
    for f in (
        "results.csv",
        "results.parquet",
        "summary.csv",
        "reliability.csv",
        "fits.csv",
        "study.json",
        "reliability-vit-logistic.png",
        "reliability-vit-knn.png",
    ):
        assert (tmp_path / "c" / f).stat().st_size > 0, f
    r = pd.read_parquet(tmp_path / "c" / "results.parquet")
    assert {
        "ece_width",
        "ece_mass",
        "mce_width",
        "brier",
        "nll",
        "temperature",
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "weighted_precision",
        "macro_recall",
    } <= set(r["metric"])
    s = res.summary[res.summary["class"] == ""].set_index(["probe", "stage", "metric"])["mean"]
    assert s[("logistic", "after", "val_nll")] <= s[("logistic", "before", "val_nll")]  # T minimises it there
    assert s[("logistic", "after", "nll")] < s[("logistic", "before", "nll")]  # and it carries to test cells
    rel = res.reliability
    assert set(rel["binning"]) == {"width", "mass"} and set(rel["stage"]) == {"before", "after"}
    n_test = r["n_test"].iat[0]
    assert (rel.groupby(["probe", "seed", "stage", "binning"])["n"].sum() == n_test).all()
    doc = json.loads((tmp_path / "c" / "study.json").read_text())
    assert doc["kind"] == "calibrate" and "reliability-vit-knn.png" in doc["files"]


def test_calibrate_bad_input_and_cli(store, tmp_path):
    from sklearn.linear_model import RidgeClassifier  # no predict_proba

    with pytest.raises(ProbeError, match="'logistic' gives no class probabilities"):
        calibrate(
            store, "vit", out=tmp_path / "x", quiet=True, make_probe=lambda n, seed=0, device="cpu": RidgeClassifier()
        )
    with pytest.raises(ProbeError, match="val_fraction"):
        calibrate(store, "vit", probes="knn", val_fraction=1.5, out=tmp_path / "x", quiet=True)
    out = tmp_path / "cli"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.probes_app",
            "calibrate",
            "--store",
            str(store),
            "--model",
            "vit",
            "--probe",
            "knn",
            "--split",
            "column",
            "--out",
            str(out),
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr
    assert "ECE" in p.stdout and "weighted F1" in p.stdout and "wrote" in p.stdout
    assert (out / "reliability-vit-knn.png").stat().st_size > 0 and len(pd.read_csv(out / "results.csv")) > 0
