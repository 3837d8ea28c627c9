"""The head-diverse ensemble: the paper's override rule on hand-built cases, its estimator and registry
names on real cells, and the ``ensemble`` study (Python and CLI) on a store of real Chula features."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from probes import ensemble, evaluate
from probes.engine.skeleton import check_probes
from probes.errors import ProbeError
from probes.heads import PROBES, make_probe
from probes.heads.ensemble_rules import auto_pairs, combine, override, parse_pairs
from tests.conftest import REPO
from tests.probes.studies.decision_stores import column_split, decision_store, permute_test_labels

HEADS = "svm,knn,knn1"  # three heads, fast on 2 CPU cores


# -- the rule on hand-built cases ---------------------------------------------------------------
def test_override_replaces_only_inside_a_pair_and_only_when_both_others_agree():
    pairs = parse_pairs("A:B", list("ABCD"))
    primary = np.array(["A", "A", "B", "C", "A", "A", "D"])
    other1 = np.array(["B", "B", "A", "D", "B", "C", "C"])
    other2 = np.array(["B", "C", "A", "D", "D", "C", "C"])
    out = override(primary, [other1, other2], pairs)
    # 0: both say B, (A, B) a pair -> B;  1: the others disagree -> A;  2: B -> A (pairs are unordered);
    # 3: both say D but (C, D) is no pair -> C;  4: one says B, one D -> A;  5: both say C, (A, C) no pair -> A;
    # 6: D is in no pair -> D
    assert out.tolist() == ["B", "A", "A", "C", "A", "A", "D"]


def test_a_class_in_two_pairs_goes_to_the_partner_both_others_name():
    pairs = parse_pairs("MY:PMY,MMY:MY", ["MB", "MMY", "MY", "PMY"])
    primary = np.array(["MY", "MY", "MY", "PMY"])
    others = [np.array(["MMY", "PMY", "MB", "MMY"]), np.array(["MMY", "PMY", "MB", "MMY"])]
    # MY -> MMY, MY -> PMY, MB is no partner of MY, PMY -> MMY is no pair
    assert override(primary, others, pairs).tolist() == ["MMY", "PMY", "MY", "PMY"]


def test_combine_rules_on_probabilities():
    classes = ["A", "B", "C"]
    p_primary = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    p1 = np.array([[0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]])
    p2 = np.array([[0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6]])
    labels, proba = combine("override", [p_primary, p1, p2], classes, primary=0, pairs=[("A", "B")])
    assert labels.tolist() == ["B", "A", "B"]  # cell 0: both others say B -> B; cell 1: they disagree
    np.testing.assert_allclose(proba[0], (p1[0] + p2[0]) / 2)  # replaced: the agreeing heads' mean
    np.testing.assert_allclose(proba[1:], p_primary[1:])
    labels, votes = combine("majority", [p_primary, p1, p2], classes)
    # cell 1: votes A, C, B (a three-way tie) -> the largest mean probability: B (0.433)
    assert labels.tolist() == ["B", "B", "C"] and votes[0].tolist() == [1 / 3, 2 / 3, 0]
    labels, mean = combine("mean", [p_primary, p1, p2], classes)
    np.testing.assert_allclose(mean, (p_primary + p1 + p2) / 3)
    assert labels.tolist() == ["B", "B", "C"]
    with pytest.raises(ValueError, match="at least 3 heads"):
        combine("override", [p_primary, p1], classes, pairs=[("A", "B")])


def test_pairs_are_checked_and_unordered():
    assert parse_pairs("B:A, A:B ,C:D", list("ABCD")) == [("A", "B"), ("C", "D")]
    with pytest.raises(ValueError, match="unknown class.*'X'"):
        parse_pairs("A:X", list("ABCD"))
    with pytest.raises(ValueError, match="one class twice"):
        parse_pairs("A:A", list("ABCD"))
    with pytest.raises(ValueError, match="CLASS:CLASS"):
        parse_pairs("A-B", list("ABCD"))
    assert auto_pairs(list("AABBCC"), list("BABACA"), 2) == [(("A", "B"), 2), (("A", "C"), 1)]


# -- the estimator and its registry names -------------------------------------------------------
def test_registry_accepts_parameterised_ensemble_names():
    assert "ensemble:mlp+logistic+cosine" in PROBES and "ensemble-mean:logistic+knn" in PROBES
    assert "ensemble:logistic+knn" not in PROBES  # the override rule needs three heads
    assert "ensemble:logistic+nope+knn" not in PROBES and "nope:logistic" not in PROBES
    assert check_probes("ensemble:logistic+knn+knn1") == ["ensemble:logistic+knn+knn1"]
    with pytest.raises(ProbeError, match="unknown probe"):
        check_probes("ensemble:logistic+knn")
    with pytest.raises(ValueError, match="unknown ensemble member"):
        make_probe("ensemble:logistic+nope+knn")


def test_ensemble_probe_is_the_rule_over_its_members(chula_features):
    X, y = chula_features
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), bool)
    test[rng.permutation(len(y))[:200]] = True
    est = make_probe("ensemble:knn+knn1+svm", seed=3, device="cpu").fit(X[~test], y[~test])
    assert est.pairs_ and len(est.pairs_) <= 4 and all(v > 0 for v in est.pair_counts_.values())
    labels = [m.predict(X[test]).astype(str) for m in est.members_]
    assert [type(m).__name__ for m in est.members_] == ["KNNProbe", "KNNProbe", "LinearSVMProbe"]
    expected = override(labels[0], labels[1:], est.pairs_)
    pred = est.predict(X[test])
    assert pred.tolist() == expected.tolist()
    assert (pred != labels[0]).any() or not (expected != labels[0]).any()
    proba = est.predict_proba(X[test])
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    fixed = make_probe("ensemble:knn+knn1+svm", seed=3, device="cpu")
    fixed.set_params(pairs="burr:teardrop").fit(X[~test], y[~test])
    assert fixed.pairs_ == [("burr", "teardrop")]
    with pytest.raises(ValueError, match="unknown class"):
        make_probe("ensemble:knn+knn1+svm", pairs="burr:nope").fit(X[~test], y[~test])


# -- the study ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(chula_features, tmp_path_factory):
    """Two stores of the same real cells and test split; the second with its test labels shuffled."""
    X, y = chula_features
    split = column_split(y)
    root = tmp_path_factory.mktemp("ens")
    return (
        decision_store(root / "a.zarr", X, y, split=split),
        decision_store(root / "b.zarr", X, permute_test_labels(y, split), split=split),
    )


def test_ensemble_study_tables_and_pairs_chosen_on_validation(stores, tmp_path, capsys):
    res = ensemble(stores[0], "vit", heads=HEADS, seeds=2, split="column", out=tmp_path / "e1", show=True)
    printed = capsys.readouterr().out
    assert "per-class F1" in printed and "best head" in printed and "override" in printed and "wrote" in printed
    for f in (
        "results.csv",
        "results.parquet",
        "specialisation.csv",
        "summary.csv",
        "pairs.csv",
        "fits.csv",
        "study.json",
        "specialisation-vit.png",
    ):
        assert (tmp_path / "e1" / f).stat().st_size > 0, f
    r = pd.read_parquet(tmp_path / "e1" / "results.parquet")
    assert {
        "macro_f1",
        "weighted_f1",
        "macro_precision",
        "weighted_precision",
        "macro_recall",
        "weighted_recall",
        "class_f1",
    } <= set(r["metric"])
    assert set(r["method"]) == {"svm", "knn", "knn1", "override", "majority", "mean"}
    assert {"ensemble:svm+knn+knn1", "ensemble-vote:svm+knn+knn1", "ensemble-mean:svm+knn+knn1"} <= set(r["probe"])
    spec = res.specialisation
    heads = spec[spec["kind"] == "head"]
    for _, g in heads.groupby("class"):  # the best head of every class is marked, and has the top mean
        assert g["best_head"].any() and g.loc[g["best_head"], "mean"].min() == g["mean"].max()
    assert not spec.loc[spec["kind"] == "ensemble", "best_head"].any()
    assert (spec["n_seeds"] == 2).all() and (spec["std"] >= 0).all()
    assert (res.pairs["source"] == "validation").all() and (res.pairs["val_confusions"] > 0).all()
    # pairs chosen on validation: shuffling the test labels changes the scores, not the pairs
    other = ensemble(stores[1], "vit", heads=HEADS, seeds=2, split="column", out=tmp_path / "e2", quiet=True)
    assert other.pairs[["seed", "pair", "val_confusions"]].equals(res.pairs[["seed", "pair", "val_confusions"]])
    a = res.summary.query("metric == 'accuracy'")["mean"].to_numpy()
    assert not np.allclose(a, other.summary.query("metric == 'accuracy'")["mean"].to_numpy())
    # every score carries its interval over test cells; compare.csv pairs every two heads / rules per seed
    agg = r[r["metric"].isin(["macro_f1", "accuracy", "weighted_f1"]) & (r["class"] == "")]
    assert ((agg["low"] <= agg["value"]) & (agg["value"] <= agg["high"])).all()
    m = res.summary[res.summary["metric"] == "macro_f1"]
    assert ((m["low"] <= m["mean"]) & (m["mean"] <= m["high"])).all()
    compare = pd.read_csv(tmp_path / "e1" / "compare.csv")
    assert len(compare) == 2 * 15  # seeds x pairs of 6 methods
    override = compare[(compare["method_a"] == "svm") & (compare["method_b"] == "override")]
    f1 = r[(r["metric"] == "macro_f1") & (r["class"] == "")].set_index(["seed", "method"])["value"]
    for row in override.itertuples():
        assert row.diff == pytest.approx(f1[(row.seed, "override")] - f1[(row.seed, "svm")])
    assert "paired comparisons" in printed


def test_ensemble_study_given_pairs_and_bad_input(stores, tmp_path):
    res = ensemble(
        stores[0], "vit", heads=HEADS, pairs="teardrop:burr", seeds=1, split="column", out=tmp_path / "g", quiet=True
    )
    assert res.pairs["pair"].tolist() == ["burr:teardrop"] and res.pairs["source"].tolist() == ["given"]
    r = res.results[(res.results["metric"] == "accuracy")].set_index("method")["value"]
    assert set(r.index) == {"svm", "knn", "knn1", "override", "majority", "mean"}
    with pytest.raises(ProbeError, match="unknown class.*'nope'"):
        ensemble(stores[0], "vit", heads=HEADS, pairs="burr:nope", out=tmp_path / "x", quiet=True)
    with pytest.raises(ProbeError, match="at least 3 heads"):
        ensemble(stores[0], "vit", heads="svm,knn", out=tmp_path / "x", quiet=True)
    with pytest.raises(ProbeError, match="primary head 'mlp'"):
        ensemble(stores[0], "vit", heads=HEADS, primary="mlp", out=tmp_path / "x", quiet=True)

    from sklearn.linear_model import RidgeClassifier  # no predict_proba

    def no_proba(name, seed=0, device="cpu"):
        return RidgeClassifier() if name == "knn1" else make_probe(name, seed=seed, device=device)

    with pytest.raises(ProbeError, match="'knn1' gives no class probabilities"):
        ensemble(stores[0], "vit", heads=HEADS, out=tmp_path / "x", quiet=True, make_probe=no_proba)


def test_ensemble_probe_in_eval_and_the_cli(stores, tmp_path):
    res = evaluate(
        stores[0],
        "vit",
        probes="ensemble:svm+knn+knn1,ensemble-mean:knn+knn1",
        split="column",
        out=tmp_path / "ev",
        quiet=True,
    )
    assert set(res.summary["probe"]) == {"ensemble:svm+knn+knn1", "ensemble-mean:knn+knn1"}
    assert res.fits["probe"].tolist() == ["ensemble:svm+knn+knn1", "ensemble-mean:knn+knn1"]
    out = tmp_path / "cli"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.probes_app",
            "ensemble",
            "--store",
            str(stores[0]),
            "--model",
            "vit",
            "--heads",
            HEADS,
            "--pairs",
            "burr:teardrop,macrocyte:normal",
            "--seeds",
            "1",
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
    assert "per-class F1" in p.stdout and "weighted F1" in p.stdout and "wrote" in p.stdout
    assert len(pd.read_csv(out / "pairs.csv")) == 2 and (out / "specialisation-vit.png").stat().st_size > 0
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.probes_app",
            "ensemble",
            "--store",
            str(stores[0]),
            "--model",
            "vit",
            "--heads",
            HEADS,
            "--pairs",
            "burr:nope",
            "--out",
            str(tmp_path / "bad"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 1 and p.stderr.startswith("error:") and "nope" in p.stderr and "Traceback" not in p.stderr
