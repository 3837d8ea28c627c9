"""The probe heads (probes.heads) on real features: Chula RBC-12 cells through a tiny random-init ViT.

Each head is checked for the estimator shape users rely on and against the scikit-learn (or plain
numpy) reference it claims to reproduce, on the same features.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from probes.heads import PROBES, make_probe, resolve_device

FAST = {"mlp": {"epochs": 10}, "cosine": {"epochs": 10}}  # fewer epochs where a test refits many times


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices: one thread (torch, BLAS, OpenMP) is faster and steadier on a shared 2-core
    machine; oversubscribed BLAS pools made scikit-learn's references 100x slower there."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(chula_features):
    """Stratified 70/30 split of the real features: (Xtr, ytr, Xte, yte)."""
    X, y = chula_features
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    return X[tr], y[tr], X[te], y[te]


@pytest.fixture(scope="module")
def standardised(data):
    """What the linear heads and the SVMs see: features standardised with training statistics."""
    Xtr, _, Xte, _ = data
    sc = StandardScaler().fit(Xtr.astype(np.float64))
    return sc.transform(Xtr), sc.transform(Xte)


@pytest.fixture(scope="module")
def fitted(data):
    """Every registered head, fitted once on the training split (CPU, seed 0)."""
    Xtr, ytr, _, _ = data
    return {name: make_probe(name, seed=0, device="cpu").fit(Xtr, ytr) for name in PROBES.names("head")}


def macro_f1(y, pred) -> float:
    return float(f1_score(y, pred, average="macro"))


# ---------------------------------------------------------------------------- estimator shape


def test_the_features_are_real_and_informative(chula_features):
    X, y = chula_features
    assert X.dtype == np.float32 and X.shape == (len(y), 64) and np.isfinite(X).all()
    assert len(np.unique(y)) == 13 and {"normal", "macrocyte"} <= set(y)


@pytest.mark.parametrize("name", PROBES.names("head"))
def test_every_head_fits_and_predicts_with_the_estimator_shape(name, fitted, data):
    Xtr, ytr, Xte, yte = data
    est = fitted[name]
    classes = np.unique(ytr)
    np.testing.assert_array_equal(est.classes_, classes)
    assert est.n_features_in_ == Xtr.shape[1]
    proba = est.predict_proba(Xte)
    assert proba.shape == (len(Xte), len(classes)) and np.isfinite(proba).all()
    assert (proba >= 0).all() and (proba <= 1 + 1e-6).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    pred = est.predict(Xte)
    assert pred.shape == (len(Xte),) and set(pred) <= set(classes)
    np.testing.assert_array_equal(pred, classes[proba.argmax(axis=1)])
    # columns follow classes_: rows of class c put more mass in column c than rows of other classes
    p_tr = est.predict_proba(Xtr)
    for j, c in enumerate(classes):
        assert p_tr[ytr == c, j].mean() > p_tr[ytr != c, j].mean(), (name, c)
    # better than chance on the 250 held-out cells (13 classes: chance macro-F1 0.08 ± 0.02, under 0.14 in
    # 2,000 random permutations); the heads reach 0.19-0.33 on the bundled cells' random-init features
    assert macro_f1(yte, pred) > 0.15, name
    # scikit-learn can clone it (params round-trip, fitted state not carried over)
    fresh = clone(est)
    assert fresh.get_params() == est.get_params() and not hasattr(fresh, "classes_")


@pytest.mark.parametrize("name", PROBES.names("head"))
def test_two_classes(name, data):
    """Binary problems keep two probability columns (the SVM's 1-D decision becomes [0, d])."""
    Xtr, ytr, Xte, yte = data
    pair = ["normal", "macrocyte"]
    tr, te = np.isin(ytr, pair), np.isin(yte, pair)
    est = make_probe(name, seed=0, device="cpu", **FAST.get(name, {})).fit(Xtr[tr], ytr[tr])
    proba = est.predict_proba(Xte[te])
    assert proba.shape == (int(te.sum()), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(est.classes_, sorted(pair))
    pred = est.predict(Xte[te])
    assert (pred == yte[te]).mean() > 0.6, name
    p_tr = est.predict_proba(Xtr[tr])
    assert p_tr[ytr[tr] == est.classes_[1], 1].mean() > p_tr[ytr[tr] == est.classes_[0], 1].mean()


@pytest.mark.parametrize("name", ["logistic", "knn", "svm"])
def test_probability_columns_follow_the_labels_not_their_positions(name, data):
    """Renaming the classes so that they sort in reverse permutes the columns and nothing else."""
    Xtr, ytr, Xte, _ = data
    classes = np.unique(ytr)
    rename = {c: f"{len(classes) - i:02d}-{c}" for i, c in enumerate(classes)}  # reverses the order
    kw = {"Cs": (1.0,)} if name == "logistic" else {}
    a = make_probe(name, seed=0, device="cpu", **kw).fit(Xtr, ytr)
    b = make_probe(name, seed=0, device="cpu", **kw).fit(Xtr, np.array([rename[c] for c in ytr]))
    np.testing.assert_array_equal(b.classes_, [rename[c] for c in classes[::-1]])
    # equal up to where L-BFGS stops (rounding differs with the order of classes and rows)
    np.testing.assert_allclose(b.predict_proba(Xte)[:, ::-1], a.predict_proba(Xte), atol=0.05)
    agree = np.mean(b.predict(Xte) == np.array([rename[c] for c in a.predict(Xte)]))
    assert agree >= 0.99, agree


# ---------------------------------------------------------------------------- against references


def softmax_objective(W, b, Xs, codes, C) -> float:
    """mean cross-entropy + 1/(2 C n) ||W||^2, in float64 (scikit-learn's objective divided by C n)."""
    s = Xs @ W + b
    s -= s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(codes)), codes].mean() + 0.5 / (C * len(codes)) * (W**2).sum())


def test_logistic_matches_sklearn_logistic_regression(data, standardised):
    Xtr, ytr, Xte, yte = data
    Str, Ste = standardised
    ours = make_probe("logistic", seed=0, device="cpu", Cs=(1.0,)).fit(Xtr, ytr)
    assert ours.C_ == 1.0 and ours.val_f1_ == {}
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-6).fit(Str, ytr)
    np.testing.assert_array_equal(ref.classes_, ours.classes_)
    a, b = ours.predict(Xte), ref.predict(Ste)
    assert np.mean(a == b) >= 0.95, np.mean(a == b)
    assert abs(macro_f1(yte, a) - macro_f1(yte, b)) <= 0.02
    assert np.abs(ours.predict_proba(Xte) - ref.predict_proba(Ste)).max() < 0.05
    # our solution reaches (nearly) the optimum of the same objective
    codes = np.searchsorted(ours.classes_, ytr)
    f_ours = softmax_objective(ours.coef_.W.double().numpy(), ours.coef_.b.double().numpy(), Str, codes, 1.0)
    f_ref = softmax_objective(ref.coef_.T, ref.intercept_, Str, codes, 1.0)
    assert f_ours <= f_ref * (1 + 1e-3), (f_ours, f_ref)


def softmax_gradient_max(W, b, X, codes, C) -> float:
    """The largest entry of the float64 gradient of the objective above w.r.t. (W, b)."""
    s = X @ W + b
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(codes)), codes] -= 1
    gW = X.T @ p / len(codes) + W / (C * len(codes))
    return float(max(np.abs(gW).max(), np.abs(p.mean(axis=0)).max()))


def test_logistic_bfloat16_phase_meets_the_float32_stopping_rule_and_agrees(data, standardised):
    """precision='bfloat16' (the default where bf16 is native) starts each fit on a bf16 copy; the
    result must still meet sklearn's stopping rule in float32 arithmetic and agree with the
    float32 fit and with sklearn at a C where the optimum is well determined."""
    Xtr, ytr, Xte, yte = data
    Str, Ste = standardised
    codes = np.searchsorted(np.unique(ytr), ytr)
    fits = {
        p: make_probe("logistic", seed=0, device="cpu", Cs=(0.1,), precision=p).fit(Xtr, ytr)
        for p in ("float32", "bfloat16")
    }
    assert fits["bfloat16"].precision_ == "bfloat16" and fits["float32"].precision_ == "float32"
    low = fits["bfloat16"]
    assert low.converged_
    g = softmax_gradient_max(low.coef_.W.double().numpy(), low.coef_.b.double().numpy(), Str, codes, 0.1)
    assert g <= 1.5e-4, g  # tol 1e-4, up to float32 vs float64 round-off in the check
    ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-6).fit(Str, ytr)
    f_low = softmax_objective(low.coef_.W.double().numpy(), low.coef_.b.double().numpy(), Str, codes, 0.1)
    f_ref = softmax_objective(ref.coef_.T, ref.intercept_, Str, codes, 0.1)
    assert f_low <= f_ref * (1 + 1e-3), (f_low, f_ref)
    a, b, c = low.predict(Xte), fits["float32"].predict(Xte), ref.predict(Ste)
    assert np.mean(a == b) >= 0.97 and np.mean(a == c) >= 0.97
    with pytest.raises(ValueError, match="precision"):
        make_probe("logistic", precision="fp8", device="cpu").fit(Xtr, ytr)


def test_curvature_shift_is_the_exact_change_of_a_diagonal_l2_term():
    """y = (A + lam D) s for a quadratic: shifting pairs made at lam1 by (lam2 - lam1) D gives the
    pairs at lam2; a pair that loses positive curvature is dropped."""
    from probes.heads.lbfgs import Curvature

    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A, D = B @ B.T, torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    S = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3)]
    pairs = lambda lam: [(A + lam * torch.diag(D)) @ s for s in S]  # noqa: E731
    cv = Curvature(S=list(S), Y=pairs(0.3), rho=[1.0 / float(y.dot(s)) for s, y in zip(S, pairs(0.3))], lam=0.3)
    cv.shift((2.0 - 0.3) * D)
    for y, y_ref in zip(cv.Y, pairs(2.0)):
        torch.testing.assert_close(y, y_ref)
    assert cv.rho == pytest.approx([1.0 / float(y.dot(s)) for s, y in zip(S, pairs(2.0))])
    flat = Curvature(S=[torch.ones(2, dtype=torch.float64)], Y=[torch.full((2,), 0.1, dtype=torch.float64)], rho=[5.0])
    flat.shift(torch.full((2,), -1.0, dtype=torch.float64))  # y . s = 0.2 - 2 < 0
    assert flat.S == [] and flat.Y == [] and flat.rho == []


def test_curvature_carried_along_a_sweep_still_reaches_each_optimum(standardised, data):
    """Fits that share coordinates (a fixed precond_lam) and carry L-BFGS pairs from a fit at
    another C must still meet the stopping rule at their own C (checked in float64) and reach
    its optimum, whichever direction C moves."""
    from probes.heads.lbfgs import Curvature, Preconditioner, fit_linear

    Str, _ = standardised
    _, ytr, _, _ = data
    codes = np.searchsorted(np.unique(ytr), ytr)
    XT = torch.from_numpy(np.ascontiguousarray(Str.T, dtype=np.float32))
    yt = torch.from_numpy(codes)
    pc = Preconditioner.of(XT)
    for path in ((0.01, 0.1, 1.0), (1.0, 0.1)):
        curvature, fit = Curvature(), None
        for C in path:
            fit = fit_linear(
                XT,
                yt,
                13,
                "softmax",
                C,
                fit,
                max_iter=300,
                precond=pc,
                curvature=curvature,
                precond_lam=1.0 / (path[0] * len(codes)),
            )
            W, b = fit.W.double().numpy(), fit.b.double().numpy()
            assert fit.converged and softmax_gradient_max(W, b, Str, codes, C) <= 1.5e-4
            ref = LogisticRegression(C=C, max_iter=5000, tol=1e-6).fit(Str, ytr)
            f_ref = softmax_objective(ref.coef_.T, ref.intercept_, Str, codes, C)
            assert softmax_objective(W, b, Str, codes, C) <= f_ref * (1 + 1e-3), (path, C)
        assert curvature.lam == pytest.approx(1.0 / (path[-1] * len(codes))) and len(curvature.S) > 0


def test_logistic_sweep_patience_stops_after_consecutive_drops(data):
    Xtr, ytr, _, _ = data
    Cs = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    full = make_probe("logistic", seed=0, device="cpu", Cs=Cs, patience=None).fit(Xtr, ytr)
    assert list(full.val_f1_) == list(Cs)
    one = make_probe("logistic", seed=0, device="cpu", Cs=Cs, patience=1).fit(Xtr, ytr)
    tried = list(one.val_f1_)
    # the same warm-started path: identical scores until it stops, right after the first drop
    assert tried == list(Cs[: len(tried)])
    np.testing.assert_allclose([one.val_f1_[c] for c in tried], [full.val_f1_[c] for c in tried], atol=1e-12)
    scores = [full.val_f1_[c] for c in Cs]
    first_drop = next((i for i in range(1, len(Cs)) if scores[i] <= max(scores[:i])), len(Cs) - 1)
    assert len(tried) == first_drop + 1
    assert one.C_ == Cs[int(np.argmax(scores[: first_drop + 1]))]


def test_logistic_sweep_picks_a_C_and_agrees_with_sklearn_at_that_C(fitted, data, standardised):
    Xtr, ytr, Xte, yte = data
    Str, Ste = standardised
    est = fitted["logistic"]
    Cs = sorted(float(c) for c in est.Cs)
    tried = list(est.val_f1_)
    assert tried == Cs[: len(tried)] and est.C_ in tried
    assert est.val_f1_[est.C_] == max(est.val_f1_.values())
    if len(tried) < len(Cs):  # stopped early: the last `patience` values all scored below the best
        assert all(est.val_f1_[c] < est.val_f1_[est.C_] for c in tried[-est.patience :])
    ref = LogisticRegression(C=est.C_, max_iter=5000).fit(Str, ytr)
    a, b = est.predict(Xte), ref.predict(Ste)
    assert np.mean(a == b) >= 0.95, np.mean(a == b)
    assert abs(macro_f1(yte, a) - macro_f1(yte, b)) <= 0.02


def brute_force_knn_proba(Xtr, codes, Xte, n_classes, k=20, T=0.07):
    """Reference: float64 cosine similarities, the top k, votes exp(sim / T), normalised."""
    A = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    Q = Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    sims = Q.astype(np.float64) @ A.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")
    top = order[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    w = np.exp(s / T)
    scores = np.zeros((len(Q), n_classes))
    np.add.at(scores, (np.arange(len(Q))[:, None], codes[top]), w)
    gap = s[:, -1] - np.take_along_axis(sims, order[:, k : k + 1], axis=1)[:, 0]  # k-th minus (k+1)-th
    return scores / scores.sum(axis=1, keepdims=True), top, gap


def test_knn_matches_brute_force_cosine_knn(fitted, data):
    Xtr, ytr, Xte, _ = data
    est = fitted["knn"]
    codes = np.searchsorted(est.classes_, ytr)
    ref, top, gap = brute_force_knn_proba(Xtr, codes, Xte, len(est.classes_))
    clear = gap > 1e-5  # rows whose 20th neighbour is not a float32 near-tie with the 21st
    assert clear.mean() > 0.9
    np.testing.assert_allclose(est.predict_proba(Xte)[clear], ref[clear], atol=1e-5, rtol=0)
    sims, idx = est.kneighbors(Xte)
    assert sims.shape == idx.shape == (len(Xte), 20)
    assert (np.sort(idx[clear], axis=1) == np.sort(top[clear], axis=1)).all()
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # best first


def test_knn1_matches_sklearn_nearest_neighbour(fitted, data):
    Xtr, ytr, Xte, _ = data
    ref = KNeighborsClassifier(1, metric="cosine").fit(Xtr, ytr)
    np.testing.assert_array_equal(fitted["knn1"].predict(Xte), ref.predict(Xte))
    # a training cell is its own nearest neighbour: all its mass on its own label
    np.testing.assert_array_equal(fitted["knn1"].predict(Xtr), ytr)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [20, 1])
def test_knn_torch_and_faiss_backends_agree(data, precision, k):
    """Exact faiss search against the torch search, exact or bf16 candidates re-ranked exactly
    (rows whose k-th and (k+1)-th neighbours tie to 1e-5 may pick either and are left out)."""
    Xtr, ytr, Xte, _ = data
    a = make_probe("knn", device="cpu", k=k, backend="faiss").fit(Xtr, ytr)
    b = make_probe("knn", device="cpu", k=k, backend="torch", precision=precision, batch_size=100).fit(Xtr, ytr)
    assert (a.backend_, a.precision_) == ("faiss", "float32") and (b.backend_, b.precision_) == ("torch", precision)
    _, _, gap = brute_force_knn_proba(Xtr, np.searchsorted(a.classes_, ytr), Xte, len(a.classes_), k=k)
    clear = gap > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_allclose(a.predict_proba(Xte)[clear], b.predict_proba(Xte)[clear], atol=1e-5, rtol=0)
    assert np.mean(a.predict(Xte) == b.predict(Xte)) > 0.99
    sa, ia = a.kneighbors(Xte)
    sb, ib = b.kneighbors(Xte)
    np.testing.assert_allclose(sa, sb, atol=1e-5)  # exact similarities either way
    assert (np.sort(ia[clear], axis=1) == np.sort(ib[clear], axis=1)).all()


def test_knn_is_cosine_whatever_the_row_norms(data):
    """Rows rescaled by wildly different factors (and an all-zero row) have the same neighbours
    and exact cosine similarities in every search path: only directions count."""
    Xtr, ytr, Xte, _ = data
    scale = np.random.default_rng(1).choice([1e-3, 1.0, 1e3], size=(len(Xtr), 1)).astype(np.float32)
    Xz = Xtr.copy()
    Xz[0] = 0.0
    Xs = Xz * scale
    ref = make_probe("knn", device="cpu", backend="faiss").fit(Xz, ytr)
    s_ref, _ = ref.kneighbors(Xte)
    for kw in (
        {"backend": "faiss"},
        {"backend": "torch", "precision": "float32"},
        {"backend": "torch", "precision": "bfloat16"},
    ):
        est = make_probe("knn", device="cpu", **kw).fit(Xs, ytr)
        s, i = est.kneighbors(Xte)
        assert not (i == 0).any()  # the zero row has similarity 0 with everything
        np.testing.assert_allclose(s, s_ref, atol=1e-5)


def test_knn_bf16_rerank_without_faiss_matches(data, monkeypatch):
    """The torch re-rank (used off the CPU or without faiss) gives the faiss re-rank's result."""
    from probes.heads import knn

    Xtr, ytr, Xte, _ = data
    a = make_probe("knn", device="cpu", backend="torch", precision="bfloat16").fit(Xtr, ytr)
    monkeypatch.setattr(knn, "importable", lambda name: False)
    b = make_probe("knn", device="cpu", backend="torch", precision="bfloat16").fit(Xtr, ytr)
    np.testing.assert_allclose(a.predict_proba(Xte), b.predict_proba(Xte), atol=1e-6)


def test_knn_auto_precision(data, monkeypatch):
    """bf16 only for large searches on a CPU with native bf16; exact faiss otherwise."""
    from probes.heads import knn

    Xtr, ytr, _, _ = data
    monkeypatch.setattr(knn, "cpu_has_native_bf16", lambda: True)
    small = make_probe("knn", device="cpu").fit(Xtr, ytr)
    assert (small.backend_, small.precision_) == ("faiss", "float32")  # 910 x 64 is below BF16_MIN_WORK
    monkeypatch.setattr(knn, "BF16_MIN_WORK", 0)
    big = make_probe("knn", device="cpu").fit(Xtr, ytr)
    assert (big.backend_, big.precision_) == ("torch", "bfloat16")
    monkeypatch.setattr(knn, "cpu_has_native_bf16", lambda: False)
    assert make_probe("knn", device="cpu").fit(Xtr, ytr).precision_ == "float32"


def test_knn_options_are_checked():
    X, y = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), np.r_[[0] * 5, [1] * 5]
    with pytest.raises(ValueError, match="bfloat16.*backend='torch'"):
        make_probe("knn", device="cpu", backend="faiss", precision="bfloat16").fit(X, y)
    with pytest.raises(ValueError, match="precision"):
        make_probe("knn", device="cpu", precision="int8").fit(X, y)
    with pytest.raises(ValueError, match="k must be >= 1"):
        make_probe("knn", device="cpu", k=0).fit(X, y)


def test_knn_unweighted_vote_and_k_capped_at_training_rows(data):
    Xtr, ytr, Xte, _ = data
    est = make_probe("knn", device="cpu", weighted=False, k=5).fit(Xtr, ytr)
    proba = est.predict_proba(Xte)
    np.testing.assert_allclose(proba * 5, np.round(proba * 5), atol=1e-5)  # counts of 5 votes
    rows = np.r_[np.flatnonzero(ytr == "normal")[:4], np.flatnonzero(ytr == "macrocyte")[:3]]
    small = make_probe("knn", device="cpu").fit(Xtr[rows], ytr[rows])
    assert small.k_ == 7 and small.predict_proba(Xte).shape[0] == len(Xte)


def squared_hinge_objective(W, b, Xs, y01, C) -> float:
    """mean one-vs-rest squared hinge (summed over classes) + 1/(2 C n) ||W||^2, in float64."""
    margins = np.clip(1 - y01 * (Xs @ W + b), 0, None)
    return float((margins**2).sum(axis=1).mean() + 0.5 / (C * len(Xs)) * (W**2).sum())


def test_linear_svm_matches_sklearn_linear_svc(fitted, data, standardised):
    Xtr, ytr, Xte, yte = data
    Str, Ste = standardised
    est = fitted["svm"]
    ref = LinearSVC(max_iter=100_000).fit(Str, ytr)
    a, b = est.predict(Xte), ref.predict(Ste)
    assert np.mean(a == b) >= 0.95, np.mean(a == b)
    assert abs(macro_f1(yte, a) - macro_f1(yte, b)) <= 0.02
    d = est.decision_function(Xte)
    assert d.shape == (len(Xte), len(est.classes_))
    # liblinear penalises the intercept, ours does not: with a large intercept_scaling (intercept
    # almost free) both solve the same problem, so scores and objective values agree closely
    free = LinearSVC(max_iter=100_000, intercept_scaling=100).fit(Str, ytr)
    y01 = np.where(ytr[:, None] == est.classes_[None], 1.0, -1.0)
    f_ours = squared_hinge_objective(est.coef_.W.double().numpy(), est.coef_.b.double().numpy(), Str, y01, 1.0)
    f_ref = squared_hinge_objective(free.coef_.T, free.intercept_, Str, y01, 1.0)
    assert f_ours <= f_ref * (1 + 1e-4), (f_ours, f_ref)
    assert np.corrcoef(d.ravel(), free.decision_function(Ste).ravel())[0, 1] > 0.95


def test_linear_svm_liblinear_intercept_and_sklearn_backend(data, standardised):
    """``intercept_scaling=1`` penalises the intercept as LinearSVC does; ``backend='sklearn'`` is LinearSVC."""
    Xtr, ytr, Xte, _ = data
    Str, Ste = standardised
    ref = LinearSVC(max_iter=100_000).fit(Str, ytr)
    ours = make_probe("svm", device="cpu", intercept_scaling=1.0).fit(Xtr, ytr)
    y01 = np.where(ytr[:, None] == ours.classes_[None], 1.0, -1.0)

    def objective(W, b):  # liblinear's: the intercept is in the L2 term
        return squared_hinge_objective(W, b, Str, y01, 1.0) + 0.5 / len(Str) * (b**2).sum()

    f_ours = objective(ours.coef_.W.double().numpy(), ours.coef_.b.double().numpy())
    assert f_ours <= objective(ref.coef_.T, ref.intercept_) * (1 + 1e-4)
    assert np.mean(ours.predict(Xte) == ref.predict(Ste)) >= 0.97
    sk = make_probe("svm", device="cpu", backend="sklearn").fit(Xtr, ytr)
    assert np.mean(sk.predict(Xte) == ref.predict(Ste)) >= 0.99
    np.testing.assert_allclose(sk.predict_proba(Xte).sum(axis=1), 1.0, atol=1e-5)


def test_rbf_svm_is_sklearn_svc(fitted, data, standardised):
    """``svm-rbf`` is SVC on standardised features; its prediction is the arg-max of SVC's
    one-vs-rest decision, i.e. ``SVC(break_ties=True)`` (plain SVC breaks vote ties by class order)."""
    Xtr, ytr, Xte, _ = data
    Str, Ste = standardised
    ref = SVC(kernel="rbf", break_ties=True).fit(Str, ytr)
    np.testing.assert_array_equal(fitted["svm-rbf"].predict(Xte), ref.predict(Ste))
    # equal up to rare whole-vote flips: a one-vs-one margin within float32 rounding of zero (our features are
    # standardised in float32, the reference's in float64) moves one vote between two classes
    diff = fitted["svm-rbf"].decision_function(Xte) - ref.decision_function(Ste)
    np.testing.assert_allclose(diff, np.round(diff), atol=2e-3)
    assert np.mean(np.round(diff) != 0) < 0.002
    assert np.mean(fitted["svm-rbf"].predict(Xte) == SVC(kernel="rbf").fit(Str, ytr).predict(Ste)) >= 0.98


# ---------------------------------------------------------------------------- seeds and state


@pytest.mark.parametrize("name", ["logistic", "mlp", "cosine"])
def test_same_seed_same_predictions(name, data):
    Xtr, ytr, Xte, _ = data
    kw = FAST.get(name, {})
    a = make_probe(name, seed=7, device="cpu", **kw).fit(Xtr, ytr).predict_proba(Xte)
    b = make_probe(name, seed=7, device="cpu", **kw).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)
    if name != "logistic":  # the seed is used: another seed trains another network
        c = make_probe(name, seed=8, device="cpu", **kw).fit(Xtr, ytr).predict_proba(Xte)
        assert not np.array_equal(a, c)


def test_training_leaves_the_global_torch_rng_alone(data):
    Xtr, ytr, _, _ = data
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_probe("mlp", seed=0, device="cpu", epochs=2).fit(Xtr, ytr)
    np.testing.assert_array_equal(torch.rand(4).numpy(), expected.numpy())


@pytest.mark.parametrize("name", ["logistic", "knn", "mlp"])
def test_pickle_round_trip(name, fitted, data):
    _, _, Xte, _ = data
    est = fitted[name]
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict_proba(Xte), est.predict_proba(Xte))


# ---------------------------------------------------------------------------- labels and errors


def test_string_and_integer_labels_round_trip(data):
    Xtr, ytr, Xte, _ = data
    est = make_probe("logistic", device="cpu", Cs=(1.0,)).fit(Xtr, ytr)
    pred = est.predict(Xte)
    assert pred.dtype.kind == "U" and set(pred) <= set(ytr) and len(set(pred)) > 3
    classes = np.unique(ytr)
    codes = np.searchsorted(classes, ytr) * 10 + 5  # integers 5, 15, ..., 125
    by_int = make_probe("logistic", device="cpu", Cs=(1.0,)).fit(Xtr, codes)
    np.testing.assert_array_equal(by_int.classes_, np.arange(len(classes)) * 10 + 5)
    pi = by_int.predict(Xte)
    assert pi.dtype.kind == "i"
    np.testing.assert_array_equal(classes[(pi - 5) // 10], pred)


@pytest.mark.parametrize("name", PROBES.names("head"))
def test_non_finite_rows_are_refused_with_their_count(name, data, fitted):
    Xtr, ytr, Xte, _ = data
    bad = Xtr.copy()
    bad[3, 0], bad[10, 5], bad[20, :] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"3 of \d+ rows with NaN or inf"):
        make_probe(name, device="cpu").fit(bad, ytr)
    q = Xte[:5].copy()
    q[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 of 5 rows with NaN or inf .*row 2"):
        fitted[name].predict(q)


@pytest.mark.parametrize("name", PROBES.names("head"))
def test_a_single_class_is_a_clear_error(name, data):
    Xtr, _, _, _ = data
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_probe(name, device="cpu").fit(Xtr[:50], np.array(["normal"] * 50))


def test_shape_errors(fitted, data):
    Xtr, ytr, Xte, _ = data
    with pytest.raises(ValueError, match="64"):
        fitted["logistic"].predict(Xte[:, :10])
    with pytest.raises(ValueError, match="one label per row"):
        make_probe("knn", device="cpu").fit(Xtr, ytr[:-1])
    with pytest.raises(RuntimeError, match="not fitted"):
        make_probe("svm", device="cpu").predict(Xte)


def test_unknown_probe_name():
    with pytest.raises(ValueError, match=r"unknown probe 'lda'; choose from (?=.*logistic)(?=.*knn1)(?=.*svm-rbf)"):
        make_probe("lda")


@pytest.mark.parametrize("name", PROBES.names("head"))
def test_cuda_without_cuda_is_a_clear_runtime_error(name, data, monkeypatch):
    Xtr, ytr, _, _ = data
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA.*device='auto'.*'cpu'"):
        make_probe(name, device="cuda").fit(Xtr, ytr)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="not supported|unknown device"):
        resolve_device("tpu")


def test_standardise_transposed_matches_row_major(chula_features):
    """The solvers' transposed standardisation equals the row-major one (statistics of all rows)."""
    from probes.heads.base import standardize, standardize_t

    X = torch.from_numpy(chula_features[0] * 3 + 7)  # offsets and scales that matter
    perm = np.random.default_rng(0).permutation(len(X))
    for rows in (None, perm, perm[:100]):
        a, ma, sa = standardize(X, rows)
        b, mb, sb = standardize_t(X, rows)
        assert b.shape == (X.shape[1], len(X) if rows is None else len(rows)) and b.is_contiguous()
        np.testing.assert_allclose(b.T.numpy(), a.numpy(), atol=2e-4)
        np.testing.assert_allclose(mb.numpy(), ma.numpy(), rtol=1e-5)
        np.testing.assert_allclose(sb.numpy(), sa.numpy(), rtol=1e-4)
    np.testing.assert_allclose(sa.numpy(), X.numpy().astype(np.float64).std(axis=0), rtol=1e-4)


def test_linear_is_the_papers_name_for_the_logistic_head():
    """The white-cell paper's ensemble names its heads linear, cosine and MLP."""
    from probes.heads.logistic import LogisticProbe

    assert isinstance(make_probe("linear"), LogisticProbe) and "linear" in PROBES


def test_logistic_sweep_by_log_loss_picks_the_c_with_the_best_hold_out_likelihood(data):
    """``select="log_loss"``: the sweep scores each C by minus the hold-out's mean log-loss, computed here
    again from a refit on the same fit rows (sklearn's log_loss), and keeps the best; the audit uses it."""
    from sklearn.metrics import log_loss

    from probes.heads.base import stratified_holdout
    from probes.studies.audit.run import audit_probe

    Xtr, ytr, _, _ = data
    Cs = (0.001, 0.01, 0.1, 1.0)
    by_ll = make_probe("logistic", seed=0, device="cpu", Cs=Cs, patience=None, select="log_loss").fit(Xtr, ytr)
    assert list(by_ll.val_f1_) == list(Cs) and all(v < 0 for v in by_ll.val_f1_.values())
    assert by_ll.C_ == max(Cs, key=lambda c: (by_ll.val_f1_[c], -c))
    codes = np.searchsorted(by_ll.classes_, ytr)
    fit_idx, val_idx = stratified_holdout(codes, 0.1, 0)
    for C in (0.01, 1.0):
        one = make_probe("logistic", seed=0, device="cpu", Cs=(C,)).fit(Xtr[fit_idx], ytr[fit_idx])
        ll = log_loss(ytr[val_idx], one.predict_proba(Xtr[val_idx]), labels=one.classes_)
        assert -by_ll.val_f1_[C] == pytest.approx(ll, rel=2e-2)  # the same C on the same rows (another path)
    by_f1 = make_probe("logistic", seed=0, device="cpu", Cs=Cs, patience=None).fit(Xtr, ytr)
    assert all(0 <= v <= 1 for v in by_f1.val_f1_.values())
    with pytest.raises(ValueError, match="select="):
        make_probe("logistic", seed=0, device="cpu", select="accuracy").fit(Xtr, ytr)
    assert audit_probe("logistic", seed=0, device="cpu").select == "log_loss"
    assert audit_probe("knn", seed=0, device="cpu").get_params() == make_probe("knn", seed=0, device="cpu").get_params()


def test_precondition_auto_is_an_opt_in_from_1_5_rows_per_feature():
    from probes.heads.lbfgs import wants_preconditioner

    assert wants_preconditioner(True, 10, 64) and not wants_preconditioner(False, 1000, 64)
    assert not wants_preconditioner("auto", 95, 64) and wants_preconditioner("auto", 96, 64)
    with pytest.raises(ValueError, match="precondition='yes'"):
        wants_preconditioner("yes", 10, 10)
