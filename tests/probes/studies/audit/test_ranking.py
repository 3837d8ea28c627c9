"""The audit's ranking (calibrated ensemble -> cleanlab's confident learning -> score), the per-cell
"why" columns and the sortable, filterable report, on real Chula RBC-12 cells bundled in tests/data."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from probes.errors import ProbeError
from probes.studies.audit import (
    CANDIDATES,
    DEFAULT_RANKING,
    EVIDENCE_COLUMNS,
    OOF,
    Ranking,
    audit_arrays,
    calibrate_oof,
    evidence,
    why_columns,
    write_outputs,
)
from probes.studies.audit.ranking import cross_fit_temperatures, fit_smoothing


def flip_uniform(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pick = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    noisy = labels.copy()
    for i in pick:
        noisy[i] = rng.choice([c for c in classes if c != labels[i]])
    mask = np.zeros(len(labels), dtype=bool)
    mask[pick] = True
    return noisy, mask


@pytest.fixture(scope="module")
def flipped_audit(chula_features):
    """The audit (logistic + knn, 5 stratified folds) of the 832 bundled cells with 10 % of labels flipped."""
    x, y = chula_features
    noisy, mask = flip_uniform(y, 0.10, seed=5)
    res = audit_arrays({"vit": x}, noisy, probes="logistic,knn", seeds=1, folds=5, k=10, device="cpu", threads=1)
    return res, mask, y


def test_flipped_labels_are_found_far_better_than_chance(flipped_audit):
    from sklearn.metrics import roc_auc_score

    res, mask, _ = flipped_audit
    flipped = mask[res.table.index]  # table rows in rank order; index = audited position
    n = int(mask.sum())
    precision = flipped[:n].mean()
    auroc = roc_auc_score(flipped, res.table["score"])
    # chance: precision 0.10, AUROC 0.5 (a random-init ViT on 64 cells per class)
    assert precision >= 0.3, precision
    assert auroc >= 0.75, auroc
    assert res.params["ranking"] == DEFAULT_RANKING.name and res.params["formula"] == DEFAULT_RANKING.formula()
    assert res.table["score"].between(0, 1).all()
    assert list(res.table.columns[: len(EVIDENCE_COLUMNS)]) == EVIDENCE_COLUMNS


def test_ranking_candidates_reorder_and_the_cleanlab_flag_comes_from_cleanlab(flipped_audit):
    from cleanlab.filter import find_label_issues

    res, _, _ = flipped_audit
    labels = res.obs["label"].to_numpy()
    nd = res.table.sort_index()["neighbor_disagreement"].to_numpy()
    ev = evidence(res.oofs, labels, res.classes, nd, "cal|flag|n0|c0")
    ens = ev.attrs["ensemble"]
    y = pd.Index(res.classes).get_indexer(labels)
    expect = find_label_issues(y, ens.proba / ens.proba.sum(1, keepdims=True), n_jobs=1)
    np.testing.assert_array_equal(ev["confident_learning"].to_numpy(), expect)
    # flags first: every flagged cell scores above every other one
    s, f = ev["score"].to_numpy(), ev["confident_learning"].to_numpy()
    assert f.any() and (~f).any() and s[f].min() >= s[~f].max()
    # without flags first, with a neighbour weight: the documented combination
    ev2 = evidence(res.oofs, labels, res.classes, nd, Ranking(True, False, 0.2, 0.15))
    q = ev2["self_confidence"].to_numpy()
    np.testing.assert_allclose(ev2["score"], 0.65 * (1 - q) + 0.2 * nd + 0.15 * ev2["consensus"], rtol=1e-9)
    # uncalibrated: self-confidence is the plain mean probability of the given label
    ev3 = evidence(res.oofs, labels, res.classes, nd, "raw|all|n0|c0")
    raw = np.mean([o.proba / o.proba.sum(1, keepdims=True) for o in res.oofs], axis=0)
    np.testing.assert_allclose(ev3["self_confidence"], raw[np.arange(len(y)), y], rtol=1e-5)


def test_calibration_is_fitted_on_the_other_folds_never_the_scored_cells(flipped_audit):
    res, _, _ = flipped_audit
    knn = next(o for o in res.oofs if o.key["probe"] == "knn")
    y = pd.Index(res.classes).get_indexer(res.obs["label"])
    params = cross_fit_temperatures(knn.proba, y, knn.fold)
    # relabel every cell of fold 0 at random: fold 0's own calibration does not move, the others' do
    y2 = y.copy()
    in0 = knn.fold == 0
    y2[in0] = np.random.default_rng(1).integers(0, len(res.classes), int(in0.sum()))
    params2 = cross_fit_temperatures(knn.proba, y2, knn.fold)
    assert params2[0] == params[0]
    assert all(params2[f] != params[f] for f in params if f != 0)
    # the kNN votes hold exact zeros: smoothing is what calibration needs there, and it pays on held-out cells
    assert (knn.proba == 0).mean() > 0.3 and min(lam for lam, _ in params.values()) > 0.05
    cal, _ = calibrate_oof(knn.proba, y, knn.fold)
    rows = np.arange(len(y))
    nll_raw = -np.log(np.clip(knn.proba[rows, y], 1e-12, None)).mean()
    nll_cal = -np.log(cal[rows, y]).mean()
    assert nll_cal < 0.6 * nll_raw, (nll_raw, nll_cal)
    np.testing.assert_allclose(cal.sum(1), 1, rtol=1e-9)
    assert 0 < fit_smoothing(knn.proba[~in0], y[~in0]) < 1


def test_why_columns_name_the_disagreeing_models_and_neighbours():
    classes = ["a", "b", "c"]
    labels = np.array(["a", "a", "b", "c"])
    p1 = np.array([[0.9, 0.1, 0], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    p2 = np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    oofs = [
        OOF({"backbone": "timm:bb", "probe": "logistic"}, classes, p1, np.zeros(4)),
        OOF({"backbone": "timm:bb", "probe": "knn"}, classes, p2, np.zeros(4)),
    ]
    nbr_idx = np.array([[1, 2, 3], [0, 2, 3], [3, 1, 0], [2, 1, 0]])
    flagged = np.array([False, True, False, False])
    w = why_columns(
        oofs, np.stack([p1, p2]), labels, classes, {"timm:bb": (nbr_idx, None)}, np.array(list("wxyz")), flagged
    )
    assert w.loc[1, "models_disagreeing"] == "logistic→b 0.80; knn→c 0.60"
    assert w.loc[0, "models_disagreeing"] == "" and w.loc[2, "models_disagreeing"] == ""
    # cell 1 (label a): neighbours w (a), y (b), z (c): two of three carry another label
    assert w.loc[1, "neighbors_disagreeing"] == "2/3 (b 1, c 1): y, z"
    assert w.loc[1, "why"] == (
        "confident learning flags the label; 2/2 models predict another class (mostly b); "
        "2/3 neighbours carry another label (mostly b)"
    )
    assert w.loc[3, "neighbors_disagreeing"] == "3/3 (a 2, b 1): y, x, w"
    assert w.loc[0, "why"] == "2/3 neighbours carry another label (mostly b)"
    assert w.loc[2, "why"] == "3/3 neighbours carry another label (mostly a)"


def test_ranking_names_round_trip_and_bad_ones_say_how():
    for c in CANDIDATES:
        assert Ranking.parse(c.name) == c
    assert DEFAULT_RANKING in CANDIDATES
    assert len({c.name for c in CANDIDATES}) == len(CANDIDATES)
    with pytest.raises(ProbeError, match="cal|flag"):
        Ranking.parse("cleanlab")
    with pytest.raises(ProbeError, match="sum below 1"):
        Ranking(True, True, 0.6, 0.5)


def test_report_sorts_and_filters_in_the_browser_with_per_cell_evidence(flipped_audit, tmp_path, chula_cells):
    res, _, _ = flipped_audit
    res.obs["path"] = chula_cells["path"].to_numpy()
    res.table["path"] = res.obs["path"].to_numpy()[res.table.index]
    res.out = tmp_path / "out"
    res.out.mkdir()
    res.params.update(dataset="chula")
    files = write_outputs(res, top=20)
    html = (res.out / "report.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, flags=re.S)
    assert script is not None and "<script src" not in html and "http" not in script.group(1)
    for hook in ("f-given", "f-proposed", "f-cl", "f-models", "f-nbrs", "f-text", "id=suspects", "th class=sort"):
        assert hook in html, hook
    rows = re.findall(r"<tbody class=suspect data-given='([^']*)' data-proposed='([^']*)' data-cl='([01])'", html)
    top = res.table.head(20)
    assert [(g, p) for g, p, _ in rows] == list(zip(top["given_label"], top["proposed_label"]))
    assert [int(c) for _, _, c in rows] == top["confident_learning"].astype(int).tolist()
    for w in top["why"].head(5):
        assert w.replace("'", "&#x27;") in html
    csv = pd.read_csv(files["suspects.csv"], keep_default_na=False)
    assert {"why", "models_disagreeing", "neighbors_disagreeing", "confident_learning"} <= set(csv.columns)
    if shutil.which("node"):  # the inline script parses
        js = tmp_path / "report.js"
        js.write_text(script.group(1))
        r = subprocess.run(["node", "--check", str(js)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# -- the margin share of the label quality ---------------------------------------------------------
def test_margin_share_ranks_a_cell_with_one_clear_other_class_above_a_diffuse_one():
    """Cell 0 (label a): 0.25 on a, 0.70 on b, the shape a flip to a neighbouring class leaves. Cell 1 (label
    a): 0.20 on a, the rest spread over b, c, d, a hard cell. Self-confidence alone ranks the diffuse cell
    first; a margin share of 0.3 (normalized margins 0.275 against 0.45) ranks the clear one first, and the
    score is the documented blend."""
    from probes.studies.audit.ranking import combine, label_quality, normalized_margin

    p = np.array([[0.25, 0.70, 0.05, 0.0], [0.20, 0.30, 0.25, 0.25], [0.9, 0.05, 0.05, 0.0]])
    y = np.array([0, 0, 0])
    sc = p[np.arange(3), y]
    np.testing.assert_allclose(normalized_margin(p, y), [0.275, 0.45, 0.925])
    zeros, no = np.zeros(3), np.zeros(3, dtype=bool)
    plain = combine(sc, no, zeros, zeros, Ranking(False, False, 0.0, 0.0, 0.0), proba=p, labels=y)
    assert plain[1] > plain[0] > plain[2]
    weak = combine(sc, no, zeros, zeros, Ranking(False, False, 0.0, 0.0, 0.1), proba=p, labels=y)
    assert weak[1] > weak[0]  # 0.1 is not enough to reorder these two (the switch is at 2/9)
    blended = combine(sc, no, zeros, zeros, Ranking(False, False, 0.0, 0.0, 0.3), proba=p, labels=y)
    assert blended[0] > blended[1] > blended[2]
    np.testing.assert_allclose(blended, 1 - (0.7 * sc + 0.3 * np.array([0.275, 0.45, 0.925])))
    # with neighbour and consensus weights: (1 - w_n - w_c)(1 - q) + w_n nbr + w_c consensus
    nd, cons = np.array([0.5, 0.1, 0.0]), np.array([1.0, 0.5, 0.0])
    rk = Ranking(False, False, 0.2, 0.15, 0.2)
    q = label_quality(sc, p, y, 0.2)
    np.testing.assert_allclose(q, 0.8 * sc + 0.2 * normalized_margin(p, y))
    np.testing.assert_allclose(
        combine(sc, no, nd, cons, rk, proba=p, labels=y), 0.65 * (1 - q) + 0.2 * nd + 0.15 * cons
    )
    # a margin share needs the ensemble it blends with; without one the self-confidence is used as given
    with pytest.raises(ProbeError, match="margin share"):
        combine(sc, no, zeros, zeros, rk)
    np.testing.assert_allclose(combine(sc, no, zeros, zeros, Ranking(False, False, 0.0, 0.0)), 1 - sc)


def test_evidence_scores_with_the_margin_share_and_keeps_self_confidence_as_a_column(flipped_audit):
    res, mask, _ = flipped_audit
    labels = res.obs["label"].to_numpy()
    nd = res.table.sort_index()["neighbor_disagreement"].to_numpy()
    rk = Ranking(True, False, 0.2, 0.15, 0.3)
    ev = evidence(res.oofs, labels, res.classes, nd, rk.name)
    ens = ev.attrs["ensemble"]
    y = pd.Index(res.classes).get_indexer(labels)
    p = ens.proba / ens.proba.sum(1, keepdims=True)
    sc = p[np.arange(len(y)), y]
    np.testing.assert_allclose(ev["self_confidence"], sc, rtol=1e-9)  # the column stays the self-confidence
    other = p.copy()
    other[np.arange(len(y)), y] = -1
    nm = (sc - other.max(1) + 1) / 2
    q = 0.7 * sc + 0.3 * nm
    np.testing.assert_allclose(ev["score"], 0.65 * (1 - q) + 0.2 * nd + 0.15 * ev["consensus"], rtol=1e-9)
    # and it differs from the score without the margin share
    ev0 = evidence(res.oofs, labels, res.classes, nd, Ranking(True, False, 0.2, 0.15))
    assert not np.allclose(ev0["score"], ev["score"])


def test_margin_ranking_names_round_trip_and_old_names_mean_no_margin():
    assert Ranking.parse("cal|all|n0.1|c0.15") == Ranking(True, False, 0.1, 0.15, 0.0)
    assert Ranking(True, False, 0.1, 0.15).name == "cal|all|n0.1|c0.15"  # no margin, no 5th part
    r = Ranking.parse("raw|all|n0.2|c0.15|m0.2")
    assert r == Ranking(False, False, 0.2, 0.15, 0.2) and r.name == "raw|all|n0.2|c0.15|m0.2"
    assert "0.8 × cleanlab self-confidence + 0.2 × cleanlab normalized margin" in r.formula()
    assert "normalized margin" not in Ranking(True, False, 0.1, 0.15).formula()
    assert {c.margin for c in CANDIDATES} == {0.0, 0.1, 0.2, 0.3}
    assert len(CANDIDATES) == 128 and all(Ranking.parse(c.name) == c for c in CANDIDATES)
    # the 32 candidates without a margin share come first, in their old order (ties go to the earlier one)
    assert [c.margin for c in CANDIDATES[:32]] == [0.0] * 32
    for bad in ("raw|all|n0.2|c0.15|x0.2", "raw|all|n0.2|c0.15|m0.2|z", "raw|all|n0.2"):
        with pytest.raises(ProbeError, match="margin share"):
            Ranking.parse(bad)
    with pytest.raises(ProbeError, match=r"\[0, 1\]"):
        Ranking(True, False, 0.1, 0.15, 1.5)
