"""Selective prediction: confidences, risk-coverage and AURC against hand and reference computations,
the threshold chosen on validation cells only, and the ``selective`` study (Python and CLI) on a store of
real Chula features."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from probes import selective
from probes.errors import ProbeError
from probes.heads import make_probe
from probes.studies.confidence import (
    abstention_by_class,
    agreement,
    aurc,
    choose_threshold,
    e_aurc,
    entropy_confidence,
    keep_top,
    margin,
    msp,
    oracle_aurc,
    oracle_aurc_approx,
    risk_coverage,
    risks_at_k,
    scores_at_coverages,
)
from tests.conftest import REPO
from tests.probes.studies.decision_stores import column_split, decision_store, permute_test_labels


def fast_probe(name, seed=0, device="cpu"):
    """The registry's probes; logistic with one C (its sweep is slow on a loaded 2-core machine)."""
    return make_probe(name, seed=seed, device=device, **({"Cs": (1.0,)} if name == "logistic" else {}))


def test_confidences():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(msp(p), [0.7, 0.4])
    np.testing.assert_allclose(margin(p), [0.5, 0.05])
    np.testing.assert_allclose(entropy_confidence(p), [(p[i] * np.log(p[i])).sum() for i in range(2)])
    votes = agreement(np.array(["A", "B", "C"]), [np.array(["A", "A", "C"]), np.array(["A", "B", "B"])])
    np.testing.assert_allclose(votes, [1, 2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="at least 3"):
        agreement(np.array(["A"]), [np.array(["A"])])


def test_aurc_and_e_aurc_equal_hand_computations():
    conf, correct = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])
    np.testing.assert_allclose(risks_at_k(conf, correct), [0, 1 / 2, 1 / 3, 1 / 2])
    assert aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert oracle_aurc(correct) == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert e_aurc(conf, correct) == pytest.approx(0.125)
    # ties: the two cells at 0.9 (one right, one wrong) count at their expected risk, whatever their order
    tied = np.array([0.9, 0.9, 0.5])
    assert aurc(tied, np.array([True, False, True])) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert aurc(tied, np.array([False, True, True])) == aurc(tied, np.array([True, False, True]))
    rc = risk_coverage(tied, np.array([True, False, True]))
    assert rc["coverage"].tolist() == pytest.approx([2 / 3, 1]) and rc["risk"].tolist() == pytest.approx([0.5, 1 / 3])


def test_aurc_equals_the_reference_on_real_sized_random_cases():
    rng = np.random.default_rng(0)
    conf = rng.random(3000)
    correct = rng.random(3000) < conf  # confident cells are more often right
    order = np.argsort(-conf)
    reference = np.mean([(~correct[order[:k]]).mean() for k in range(1, 3001)])  # Geifman et al.'s definition
    assert aurc(conf, correct) == pytest.approx(reference, rel=1e-12)
    big = rng.random(200_000) < 0.8
    assert oracle_aurc(big) == pytest.approx(oracle_aurc_approx(1 - big.mean()), abs=1e-3)
    assert e_aurc(conf, correct) > 0 and e_aurc(np.where(correct, 1.0, 0.0), correct) == pytest.approx(0)


def test_threshold_coverages_and_abstention_on_hand_cases():
    conf, correct = np.array([0.95, 0.9, 0.8, 0.7, 0.6]), np.array([True, True, True, False, True])
    assert choose_threshold(conf, correct, 1.0) == {"threshold": 0.8, "val_coverage": 0.6, "val_accuracy": 1.0}
    assert choose_threshold(conf, correct, 0.8)["threshold"] == 0.6  # all five cells: accuracy 0.8
    assert choose_threshold(conf, ~correct, 0.99)["threshold"] == np.inf  # no threshold reaches it
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            choose_threshold(conf, correct, bad)
    assert keep_top(conf, 0.67).sum() == 3 and keep_top(conf, 0.5)[:3].tolist() == [True, True, False]
    y_true, y_pred = np.array(list("AABBA")), np.array(list("AABAA"))
    at = scores_at_coverages(y_true, y_pred, conf, ["A", "B"], [1.0, 0.6])
    v = at.set_index(["coverage", "metric"])["value"]
    assert v[(1.0, "accuracy")] == pytest.approx(0.8) and v[(0.6, "accuracy")] == 1.0 and v[(0.6, "n_kept")] == 3
    assert {"macro_f1", "weighted_f1", "weighted_precision", "macro_recall"} <= set(at["metric"])
    ab = abstention_by_class(y_true, conf >= 0.8, ["A", "B"])
    assert ab["n_abstained"].tolist() == [1, 1] and ab["abstention_rate"].tolist() == pytest.approx([1 / 3, 1 / 2])


@pytest.fixture(scope="module")
def stores(chula_features, tmp_path_factory):
    """Two stores of the same real cells and test split (the second with its test labels shuffled), and
    three feature sets each (two halves of the features and all of them) for agreement between backbones."""
    X, y = chula_features
    split = column_split(y)
    views = {"a": slice(0, 32), "b": slice(32, 64), "vit": slice(None)}
    root = tmp_path_factory.mktemp("sel")
    return (
        decision_store(root / "a.zarr", X, y, split=split, views=views),
        decision_store(root / "b.zarr", X, permute_test_labels(y, split), split=split, views=views),
    )


def test_selective_study_threshold_is_chosen_on_validation(stores, tmp_path, capsys):
    kw = dict(
        probes="logistic",
        confidence="msp,margin,entropy,agreement",
        heads="knn,svm",
        target_accuracy=0.5,
        seeds=2,
        split="column",
        make_probe=fast_probe,
    )
    res = selective(stores[0], "vit", out=tmp_path / "s1", show=True, **kw)
    printed = capsys.readouterr().out
    assert "AURC" in printed and "test cov." in printed and "sent to a human" in printed and "wrote" in printed
    for f in (
        "results.csv",
        "results.parquet",
        "summary.csv",
        "thresholds.csv",
        "abstention.csv",
        "curves.csv",
        "fits.csv",
        "study.json",
        "risk_coverage.png",
    ):
        assert (tmp_path / "s1" / f).stat().st_size > 0, f
    r = res.results
    assert {"aurc", "e_aurc", "accuracy", "macro_f1", "weighted_f1", "weighted_recall"} <= set(r["metric"])
    assert sorted(r["coverage"].dropna().unique()) == [0.5, 0.67, 0.8, 0.9, 1.0]
    thr = res.thresholds
    found = np.isfinite(thr["threshold"])
    assert len(thr) == 2 * 4 and found[thr["confidence"] == "msp"].all()
    assert (thr.loc[found, "val_accuracy"] >= 0.5).all() and thr["test_coverage"].between(0, 1).all()
    assert (thr.loc[~found, "test_coverage"] == 0).all()  # no threshold reaches the target: every cell abstains
    # what the threshold keeps on test carries its 95% interval over test cells
    kept_some = thr[thr["n_kept"] > 0]
    for m in ("coverage", "accuracy"):
        low, high, v = kept_some[f"test_{m}_low"], kept_some[f"test_{m}_high"], kept_some[f"test_{m}"]
        assert ((low <= v) & (v <= high)).all() and (low < high).any()
    # shuffling the test labels changes what the threshold scores on test, never the threshold itself
    other = selective(stores[1], "vit", out=tmp_path / "s2", quiet=True, **kw)
    cols = ["seed", "confidence", "threshold", "val_coverage", "val_accuracy", "test_coverage"]
    pd.testing.assert_frame_equal(thr[cols], other.thresholds[cols])
    assert not np.allclose(thr["test_accuracy"], other.thresholds["test_accuracy"])
    ab = res.abstention
    assert ab["class"].nunique() == 13 and ab["abstention_rate"].between(0, 1).all()
    kept = thr.set_index(["seed", "confidence"])["n_kept"]
    sent = ab.groupby(["seed", "confidence"])["n_abstained"].sum()
    assert ((kept + sent.reindex(kept.index)) == thr.set_index(["seed", "confidence"])["n_test"]).all()


def test_agreement_between_backbones_and_bad_input(stores, tmp_path):
    res = selective(
        stores[0],
        "a,b,vit",
        probes="knn",
        confidence="agreement,msp",
        agree_with="backbones",
        target_accuracy=0.4,
        split="column",
        out=tmp_path / "bb",
        quiet=True,
    )
    assert set(res.thresholds["backbone"]) == {"a", "b", "vit"}
    with pytest.raises(ProbeError, match="at least 3 heads"):
        selective(stores[0], "vit", probes="knn", confidence="agreement", heads="knn1", out=tmp_path / "x", quiet=True)
    with pytest.raises(ProbeError, match="at least 3 backbones"):
        selective(
            stores[0],
            "a,vit",
            probes="knn",
            confidence="agreement",
            agree_with="backbones",
            out=tmp_path / "x",
            quiet=True,
        )
    for bad in (0, 1.01, -1):
        with pytest.raises(ProbeError, match=r"\(0, 1\]"):
            selective(stores[0], "vit", probes="knn", target_accuracy=bad, out=tmp_path / "x", quiet=True)
    with pytest.raises(ProbeError, match="unknown confidence"):
        selective(stores[0], "vit", probes="knn", confidence="msp,vibes", out=tmp_path / "x", quiet=True)
    from sklearn.linear_model import RidgeClassifier  # no predict_proba

    with pytest.raises(ProbeError, match="gives no class probabilities"):
        selective(
            stores[0],
            "vit",
            out=tmp_path / "x",
            quiet=True,
            make_probe=lambda n, seed=0, device="cpu": RidgeClassifier(),
        )


def test_selective_cli(stores, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "cli.probes_app",
        "selective",
        "--store",
        str(stores[0]),
        "--model",
        "vit",
        "--probe",
        "knn",
        "--confidence",
        "msp,margin,agreement",
        "--heads",
        "knn1,svm",
        "--target-accuracy",
        "0.6",
        "--split",
        "column",
        "--out",
        str(out),
        "--quiet",
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "AURC" in p.stdout and "67%" in p.stdout and "wrote" in p.stdout
    assert (out / "risk_coverage.png").stat().st_size > 0 and len(pd.read_parquet(out / "results.parquet")) > 0
    bad = [*cmd[:8], "--probe", "knn", "--target-accuracy", "1.5", "--out", str(tmp_path / "bad")]
    p = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "(0, 1]" in p.stderr
