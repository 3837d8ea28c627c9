"""probes.stats: bootstrap intervals over test cells and paired tests, checked against scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from probes import stats
from probes.stats import (
    Interval,
    bootstrap_ci,
    bootstrap_confusions,
    bootstrap_indices,
    compare_all,
    confusion,
    holm,
    mcnemar,
    metrics_from_confusion,
    paired_comparison,
)

EXACT = 1e-12  # the same counts give the same floats up to the order of a few additions


def _sk(y_true, y_pred, labels=None) -> dict[str, float]:
    return {
        "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
        "accuracy": accuracy_score(y_true, y_pred),
        "weighted_f1": f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0),
    }


def _codes(n: int, k: int, seed: int, right: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced true codes in [0, k) and predictions that are right with probability ``right``."""
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.8)))
    pred = np.where(rng.random(n) < right, y, rng.integers(0, k, size=n))
    return y, pred


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """800 imbalanced cells of classes a-f: "e" is predicted but never true, "z" is neither."""
    rng = np.random.default_rng(7)
    true_classes = np.array(["a", "b", "c", "d", "f"])
    y = rng.choice(true_classes, size=800, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    pred = np.where(rng.random(800) < 0.65, y, rng.choice(np.array(["a", "b", "c", "d", "e", "f"]), size=800))
    assert "e" in set(pred) and "e" not in set(y)
    return y, pred, ["a", "b", "c", "d", "e", "f", "z"]


# -- point estimates and single resamples against scikit-learn --------------------------------------
def test_point_estimates_equal_sklearn(cells):
    y, pred, labels = cells
    for given in (labels, None):  # fixed classes (with an absent "z") and sklearn's default (present classes)
        ci = bootstrap_ci(y, pred, given, n_resamples=20)
        expected = _sk(y, pred, given)
        for name, value in expected.items():
            assert abs(ci[name].estimate - value) < EXACT, (given, name)
    # "z" counts in the macro average over labels: the two macro-F1 differ by exactly the factor 6/7
    with_z = bootstrap_ci(y, pred, labels, n_resamples=20)["macro_f1"].estimate
    without_z = bootstrap_ci(y, pred, None, n_resamples=20)["macro_f1"].estimate
    assert abs(with_z - without_z * 6 / 7) < EXACT


def test_metrics_from_confusion_equals_sklearn_and_broadcasts(cells):
    y, pred, labels = cells
    code = {c: i for i, c in enumerate(labels)}
    conf = confusion([code[v] for v in y], [code[v] for v in pred], len(labels))
    assert (conf == confusion_matrix(y, pred, labels=labels)).all()
    values = metrics_from_confusion(conf)
    for name, value in _sk(y, pred, labels).items():
        assert abs(values[name] - value) < EXACT
    stacked = metrics_from_confusion(np.stack([conf, 2 * conf, np.eye(7, dtype=int)]))
    assert stacked["macro_f1"].shape == (3,)
    assert np.allclose(stacked["macro_f1"][:2], values["macro_f1"]) and stacked["accuracy"][2] == 1.0


@pytest.mark.parametrize("stratified", [True, False])
def test_each_resample_equals_sklearn_on_the_resampled_cells(monkeypatch, stratified):
    # chunks of 3 resamples, so that the seed path runs over several chunks
    y, pred = _codes(300, 6, seed=1)
    # class 5: two test cells, one predicted 5, and no other cell predicted 5, so the class vanishes from
    # some unstratified resamples altogether (sklearn's labels=None then leaves it out of the average)
    y[2:], pred[2:] = np.where(y[2:] == 5, 4, y[2:]), np.where(pred[2:] == 5, 4, pred[2:])
    y[:2], pred[:2] = 5, [5, 0]
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 3 * 300)
    idx = bootstrap_indices(y, 6, n_resamples=40, seed=3, stratified=stratified)
    confs = bootstrap_confusions(y, pred, 6, n_resamples=40, seed=3, stratified=stratified)
    both = bootstrap_confusions(y, np.stack([pred, y]), 6, n_resamples=40, seed=3, stratified=stratified)
    assert idx.shape == (40, 300) and confs.shape == (40, 6, 6) and both.shape == (2, 40, 6, 6)
    assert (both[0] == confs).all()  # a second vector is counted on the same resampled cells
    vanished = 0
    for r in range(40):
        yt, yp = y[idx[r]], pred[idx[r]]
        assert (confs[r] == confusion_matrix(yt, yp, labels=range(6))).all()
        assert (both[1][r] == confusion_matrix(yt, yt, labels=range(6))).all()
        fixed = metrics_from_confusion(confs[r])
        present = metrics_from_confusion(confs[r], present_only=True)
        for name in stats.METRIC_NAMES:
            assert abs(fixed[name] - _sk(yt, yp, list(range(6)))[name]) < EXACT
            assert abs(present[name] - _sk(yt, yp)[name]) < EXACT
        if stratified:
            assert (np.bincount(yt, minlength=6) == np.bincount(y, minlength=6)).all()
        vanished += 5 not in yt
        assert 5 in yt or 5 not in yp  # only cell 0 predicts 5
    assert (vanished > 0) != stratified  # the rules for a class absent from a resample were exercised


# -- intervals ----------------------------------------------------------------------------------------------
def _macro_f1_rows(yt: np.ndarray, yp: np.ndarray, k: int) -> np.ndarray:
    """Macro-F1 over classes 0..k-1 of each row of label arrays (..., n): an implementation independent of stats."""
    f1 = []
    for c in range(k):
        tp = ((yt == c) & (yp == c)).sum(axis=-1)
        denom = (yt == c).sum(axis=-1) + (yp == c).sum(axis=-1)
        f1.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(f1, axis=0)


def test_unstratified_interval_agrees_with_scipy_bootstrap():
    y, pred = _codes(600, 5, seed=2, right=0.75)
    labels = list(range(5))
    ours = bootstrap_ci(y, pred, labels, n_resamples=4000, seed=0, stratified=False)

    def statistic(idx, axis=-1):
        idx = np.asarray(idx, dtype=np.int64)
        return {"macro_f1": _macro_f1_rows(y[idx], pred[idx], 5), "accuracy": (y[idx] == pred[idx]).mean(axis=-1)}

    for name in ("macro_f1", "accuracy"):
        res = scipy_stats.bootstrap(
            (np.arange(600),),
            lambda idx, axis=-1, name=name: statistic(idx, axis)[name],
            method="percentile",
            n_resamples=4000,
            vectorized=True,
            rng=np.random.default_rng(1),
        )
        # measured (seeds 0-3): the ends differ by at most 0.003, intervals about 0.094 (macro-F1) and 0.065
        # (accuracy) wide; that is the Monte Carlo error of a 2.5% quantile from 4000 resamples
        assert abs(ours[name].low - res.confidence_interval.low) < 0.006, name
        assert abs(ours[name].high - res.confidence_interval.high) < 0.006, name
    # stratifying removes the class-count noise only: measured 0.92-0.95x scipy's width for macro-F1 (seeds 0-3)
    strat = bootstrap_ci(y, pred, labels, n_resamples=4000, seed=0)["macro_f1"]
    width = ours["macro_f1"].high - ours["macro_f1"].low
    assert 0.8 * width < strat.high - strat.low < 1.1 * width


def test_interval_contains_estimate_and_narrows_with_more_cells():
    y, pred = _codes(4000, 8, seed=4)
    labels = list(range(8))
    full = bootstrap_ci(y, pred, labels, n_resamples=1000)
    few = bootstrap_ci(y[:400], pred[:400], labels, n_resamples=1000)
    for name in stats.METRIC_NAMES:
        for ci in (full[name], few[name]):
            assert isinstance(ci, Interval) and ci.low < ci.estimate < ci.high
        # 10x the cells: about sqrt(10) ~ 3.2x narrower
        assert 2 * (full[name].high - full[name].low) < few[name].high - few[name].low, name
    assert list(bootstrap_ci(y, pred, labels, metrics=("accuracy",), n_resamples=10)) == ["accuracy"]
    narrow = bootstrap_ci(y, pred, labels, n_resamples=1000, level=0.5)["macro_f1"]
    assert full["macro_f1"].low < narrow.low < narrow.high < full["macro_f1"].high


def test_same_seed_same_interval_other_seed_close():
    y, pred = _codes(2000, 10, seed=5)
    a = bootstrap_ci(y, pred, list(range(10)), n_resamples=1000, seed=11)
    assert a == bootstrap_ci(y, pred, list(range(10)), n_resamples=1000, seed=11)
    b = bootstrap_ci(y, pred, list(range(10)), n_resamples=1000, seed=12)
    assert a != b
    for name in stats.METRIC_NAMES:
        assert a[name].estimate == b[name].estimate
        assert abs(a[name].low - b[name].low) < 0.01 and abs(a[name].high - b[name].high) < 0.01


# -- paired comparisons ---------------------------------------------------------------------------------
def test_identical_predictions_do_not_differ():
    y, pred = _codes(500, 6, seed=6)
    out = paired_comparison(y, pred, pred.copy(), list(range(6)), n_resamples=500)
    assert out["diff"] == out["diff_low"] == out["diff_high"] == 0.0
    assert out["p_bootstrap"] == 1.0 and out["p_mcnemar"] == 1.0
    assert out["mcnemar_b"] == out["mcnemar_c"] == 0 and out["macro_f1_a"] == out["macro_f1_b"]


def test_paired_bootstrap_recomputed_from_the_shared_resamples():
    y, a = _codes(900, 7, seed=8, right=0.7)
    _, b = _codes(900, 7, seed=8, right=0.78)  # same truth, a better probe sharing part of a's errors
    out = paired_comparison(y, a, b, list(range(7)), n_resamples=800, seed=4)
    confs = bootstrap_confusions(y, np.stack([a, b]), 7, n_resamples=800, seed=4)
    macro = metrics_from_confusion(confs)["macro_f1"]  # (2, B)
    d = macro[1] - macro[0]
    assert out["diff_low"] == np.quantile(d, 0.025) and out["diff_high"] == np.quantile(d, 0.975)
    expected_p = min(1.0, 2 * (1 + min((d <= 0).sum(), (d >= 0).sum())) / 801)
    assert out["p_bootstrap"] == expected_p
    assert abs(out["diff"] - (_sk(y, b, list(range(7)))["macro_f1"] - _sk(y, a, list(range(7)))["macro_f1"])) < EXACT
    assert out["diff_low"] < out["diff"] < out["diff_high"]
    # the resamples are the ones bootstrap_ci draws with the same seed
    ci_a = bootstrap_ci(y, a, list(range(7)), n_resamples=800, seed=4)["macro_f1"]
    assert (ci_a.low, ci_a.high) == tuple(np.quantile(macro[0], [0.025, 0.975]))


def _constructed(b: int, c: int, both_right: int = 100, both_wrong: int = 30):
    """Binary truth and two probes with exactly ``b`` cells A right / B wrong and ``c`` the reverse."""
    n = b + c + both_right + both_wrong
    y = np.arange(n) % 2
    right_a = np.r_[np.ones(b), np.zeros(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    right_b = np.r_[np.zeros(b), np.ones(c), np.ones(both_right), np.zeros(both_wrong)].astype(bool)
    return y, np.where(right_a, y, 1 - y), np.where(right_b, y, 1 - y)


def test_mcnemar_exact_and_chi_square_match_scipy():
    y, a, b = _constructed(7, 15)  # b + c = 22 < 25: exact binomial
    out = paired_comparison(y, a, b, [0, 1], n_resamples=200)
    assert (out["mcnemar_b"], out["mcnemar_c"]) == (7, 15)
    assert out["p_mcnemar"] == pytest.approx(scipy_stats.binomtest(7, 22, 0.5).pvalue, rel=1e-12)
    assert out["accuracy_b"] - out["accuracy_a"] == pytest.approx(8 / len(y))
    y, a, b = _constructed(20, 40)  # b + c = 60: chi-square with continuity correction
    out = paired_comparison(y, a, b, [0, 1], n_resamples=200)
    assert (out["mcnemar_b"], out["mcnemar_c"]) == (20, 40)
    assert out["p_mcnemar"] == pytest.approx(scipy_stats.chi2.sf(19**2 / 60, df=1), rel=1e-12)
    assert out["p_mcnemar"] != pytest.approx(scipy_stats.chi2.sf(20**2 / 60, df=1), rel=1e-3)
    for b_, c_ in [(0, 1), (3, 3), (0, 24), (12, 12), (24, 0)]:
        assert mcnemar(b_, c_) == pytest.approx(scipy_stats.binomtest(b_, b_ + c_, 0.5).pvalue, rel=1e-12)
        assert mcnemar(b_, c_) == mcnemar(c_, b_)
    assert mcnemar(0, 0) == 1.0 and mcnemar(13, 12) == pytest.approx(scipy_stats.chi2.sf(0, df=1))


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(holm([0.5, 0.6, 0.01]), [1.0, 1.0, 0.03])  # 1.5 and 1.2 clipped at 1
    assert holm([]).shape == (0,) and holm([0.2]).tolist() == [0.2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_compare_all_rows_equal_paired_comparison_with_holm():
    y, p0 = _codes(700, 5, seed=9, right=0.6)
    rng = np.random.default_rng(10)
    preds = {"lp": p0, "knn": np.where(rng.random(700) < 0.5, y, p0), "same": p0.copy()}
    names = np.array(["a", "b", "c", "d", "e"])  # string labels through the same path
    table = compare_all(names[y], {k: names[v] for k, v in preds.items()}, names, n_resamples=300, seed=2)
    assert list(zip(table["a"], table["b"])) == [("lp", "knn"), ("lp", "same"), ("knn", "same")]
    for _, row in table.iterrows():
        one = paired_comparison(
            names[y], names[preds[row["a"]]], names[preds[row["b"]]], names, n_resamples=300, seed=2
        )
        for key, value in one.items():
            assert row[key] == value, key
    assert np.allclose(table["p_bootstrap_holm"], holm(table["p_bootstrap"].to_numpy()))
    assert np.allclose(table["p_mcnemar_holm"], holm(table["p_mcnemar"].to_numpy()))
    assert table.loc[1, "p_bootstrap"] == 1.0 and table.loc[0, "p_mcnemar"] < 1e-6
    assert table.loc[0, "diff_low"] > 0 and table.loc[2, "diff_high"] < 0


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(cells):
    y, pred, labels = cells
    with pytest.raises(ValueError, match="y_true has 800 values but y_pred has 799"):
        bootstrap_ci(y, pred[:-1], labels)
    with pytest.raises(ValueError, match="pred_b has 799"):
        paired_comparison(y, pred, pred[:-1], labels)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], [], labels)
    with pytest.raises(ValueError, match=r"labels lack 1 class\(es\) that occur in y_true: 'f'"):
        bootstrap_ci(y, pred, ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="occur in y_pred: 'e'"):
        bootstrap_ci(y, pred, ["a", "b", "c", "d", "f"])
    with pytest.raises(ValueError, match="duplicates"):
        bootstrap_ci(y, pred, [*labels, "a"])
    with pytest.raises(ValueError, match="unknown metrics"):
        bootstrap_ci(y, pred, labels, metrics=("auc",))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(y, pred, labels, level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(y, pred, labels, n_resamples=0)
    with pytest.raises(ValueError, match="at least two"):
        compare_all(y, {"only": pred}, labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        confusion([0, 1, 3], [0, 1, 2], 3)
    with pytest.raises(ValueError, match="integer codes"):
        bootstrap_confusions([0.0, 1.0], [0, 1], 2)
    with pytest.raises(ValueError, match="shape"):
        metrics_from_confusion(np.zeros((3, 4)))


# -- what a study calls: one bootstrap per test set ------------------------------------------------------
def test_bootstrap_group_equals_bootstrap_ci_and_compare_all(cells):
    y, pred, labels = cells
    rng = np.random.default_rng(1)
    other = np.where(rng.random(y.size) < 0.8, y, pred)
    group = stats.bootstrap_group(y, {"p": pred, "q": other}, labels, n_resamples=500, seed=3)
    for name, vector in (("p", pred), ("q", other)):
        assert group.intervals[name] == bootstrap_ci(y, vector, labels, n_resamples=500, seed=3)
        assert group.replicates[name]["macro_f1"].shape == (500,)
    assert group.comparisons.equals(compare_all(y, {"p": pred, "q": other}, labels, n_resamples=500, seed=3))
    assert stats.bootstrap_group(y, {"p": pred}, labels, n_resamples=500).comparisons is None


def test_predictions_outside_the_classes_score_as_probes_metrics_score(cells):
    """A probe may predict a class the test set lacks (out-of-domain tests): with ``others="wrong"`` that is
    an error with no F1 of its own, as probes.metrics.score counts it; ``"error"`` refuses it."""
    from probes.metrics import score

    y, pred, _ = cells
    classes = ["a", "b", "c", "d", "f"]  # "e" is predicted, not a class of the test set
    expected = score(y, pred, classes).values
    group = stats.bootstrap_group(y, {"p": pred}, classes, n_resamples=200, others="wrong")
    for metric in ("macro_f1", "accuracy", "weighted_f1"):
        assert group.intervals["p"][metric].estimate == pytest.approx(expected[metric], abs=EXACT)
    with pytest.raises(stats.ProbeError, match="labels lack"):
        stats.bootstrap_group(y, {"p": pred}, classes, n_resamples=200)


def test_interval_of_the_mean_over_seeds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.02, 4000), rng.normal(0.7, 0.02, 4000)
    low, high = stats.interval_of_mean([a, b])
    assert low == pytest.approx(0.75 - 1.96 * 0.02 / np.sqrt(2), abs=2e-3)
    assert high == pytest.approx(0.75 + 1.96 * 0.02 / np.sqrt(2), abs=2e-3)
    with pytest.raises(stats.ProbeError, match="one shape"):
        stats.interval_of_mean([a, b[:10]])


def test_bootstrap_kept_agrees_with_resampling_the_cells():
    """The multinomial draw of (kept, right) counts per class is the distribution of resampling the cells:
    its intervals agree with an index bootstrap (stratified) within Monte-Carlo noise."""
    rng = np.random.default_rng(5)
    y = rng.choice(4, size=3000, p=[0.4, 0.3, 0.2, 0.1])
    kept = rng.random(3000) < np.array([0.9, 0.8, 0.6, 0.5])[y]
    right = rng.random(3000) < np.where(kept, 0.97, 0.6)
    ours = stats.bootstrap_kept(y, kept, right, n_resamples=4000, seed=1)
    idx = bootstrap_indices(y, 4, n_resamples=4000, seed=2)
    cov = kept[idx].mean(axis=1)
    acc = (kept & right)[idx].sum(axis=1) / kept[idx].sum(axis=1)
    assert ours["coverage"].estimate == kept.mean() and ours["accuracy"].estimate == right[kept].mean()
    for name, values in (("coverage", cov), ("accuracy", acc)):
        low, high = np.quantile(values, [0.025, 0.975])
        assert ours[name].low == pytest.approx(low, abs=0.002) and ours[name].high == pytest.approx(high, abs=0.002)
    none = stats.bootstrap_kept(y, np.zeros(3000, bool), right, n_resamples=100)
    assert none["coverage"].high == 0 and np.isnan(none["accuracy"].estimate)
