"""What the 95% intervals and paired comparisons add to a study, against scikit-learn resampling in the same run.

A study bootstraps each test set once (``probes.stats.bootstrap_group``: 2,000 stratified resamples, every
fit on those cells counted on the same resamples, then every pair compared). This script times that on
``--n`` test cells of ``--classes`` classes for 1, 2, 4 and 8 prediction vectors (the fits of one test set),
and the same intervals computed the obvious way: a Python loop over the resamples calling scikit-learn's
``f1_score`` / ``accuracy_score`` on the resampled cells (one vector, all resamples, no extrapolation).
The two must agree: the loop uses the very cells ``probes.stats.bootstrap_indices`` draws, so the intervals
are compared for equality too.

It then states the cost for two study shapes: ``evaluate`` with 4 probes and one seed (one test set,
4 vectors) and ``scale`` with 7 limits x 5 seeds x 3 probes (35 test sets of 3 vectors).

    python benchmarks/study_intervals.py                      # 20,000 test cells, 12 classes
    python benchmarks/study_intervals.py --n 2000 --resamples 200 --out /tmp/si.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedcache.backbones.devices import cpu_model  # noqa: E402
from probes.heads.base import cpu_has_native_bf16  # noqa: E402
from probes.stats import bootstrap_group, bootstrap_indices  # noqa: E402


def predictions(n: int, k: int, p: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Imbalanced true classes and ``p`` correlated prediction vectors (about 75-85% right)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 2.0)))
    preds = {}
    for i in range(p):
        right = rng.random(n) < 0.75 + 0.01 * i
        preds[f"probe{i}"] = np.where(right, y, rng.integers(0, k, size=n))
    return y, preds


def sklearn_loop(y: np.ndarray, pred: np.ndarray, k: int, resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """The obvious way: scikit-learn's scores on each resample's cells (those bootstrap_group draws)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(k))
    idx = bootstrap_indices(y, k, n_resamples=resamples, seed=seed)
    scores: dict[str, list[float]] = {"macro_f1": [], "accuracy": [], "weighted_f1": []}
    for rows in idx:
        t, p = y[rows], pred[rows]
        scores["macro_f1"].append(f1_score(t, p, labels=labels, average="macro", zero_division=0))
        scores["accuracy"].append(accuracy_score(t, p))
        scores["weighted_f1"].append(f1_score(t, p, labels=labels, average="weighted", zero_division=0))
    return {m: tuple(np.quantile(v, [0.025, 0.975]).tolist()) for m, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="test cells")
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each bootstrap_group (best kept)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n, k, r = args.n, args.classes, args.resamples
    cpu = f"{cpu_model()} x{os.cpu_count()}, native bf16: {cpu_has_native_bf16()}"
    print(f"{n} test cells, {k} classes, {r} stratified resamples; CPU: {cpu}")

    timings = {}
    for p in (1, 2, 4, 8):
        y, preds = predictions(n, k, p)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bootstrap_group(y, preds, list(range(k)), n_resamples=r, seed=1)
            best = min(best, time.perf_counter() - t0)
        timings[p] = best
        print(f"  bootstrap_group, {p} vector(s): {best:.3f} s ({best / p:.3f} s per vector)")

    y, preds = predictions(n, k, 1)
    t0 = time.perf_counter()
    loop = sklearn_loop(y, preds["probe0"], k, r, seed=1)
    loop_s = time.perf_counter() - t0
    ours = bootstrap_group(y, preds, list(range(k)), n_resamples=r, seed=1).intervals["probe0"]
    agree = max(abs(ours[m].low - lo) + abs(ours[m].high - hi) for m, (lo, hi) in loop.items())
    print(f"  scikit-learn loop, 1 vector: {loop_s:.2f} s; ours {loop_s / timings[1]:.0f}x faster;")
    print(f"  largest |difference| of the interval ends (same resampled cells): {agree:.2e}")

    evaluate_s = timings[4]
    scale_s = 35 * (timings[2] + (timings[4] - timings[2]) / 2)  # 3 vectors: between the 2- and 4-vector times
    print(f"  added to an evaluate (4 probes, 1 seed): {evaluate_s:.2f} s")
    print(f"  added to a scale study (7 limits x 5 seeds x 3 probes = 35 test sets of 3 vectors): {scale_s:.1f} s")
    doc = {
        "benchmark": "study_intervals",
        "cpu": cpu,
        "n_test": n,
        "classes": k,
        "resamples": r,
        "bootstrap_group_seconds": {str(p): s for p, s in timings.items()},
        "sklearn_loop_seconds_1_vector": loop_s,
        "speedup_vs_sklearn_loop": loop_s / timings[1],
        "max_abs_interval_difference": agree,
        "added_seconds": {"evaluate_4_probes_1_seed": evaluate_s, "scale_7x5x3": scale_s},
    }
    out = args.out or ROOT / "benchmarks" / "results" / "study_intervals.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
