"""Speed of a whole data-scaling study, against scikit-learn doing the same fits in the same run.

The issue's study goal: ``probes scale`` with 7 limits (256..16384) x 5 seeds x 3 probes
(logistic, knn, svm) on 185,000 x 1024 features in under 60 s where a GPU is lent. This script
builds such a study end to end on synthetic embedding-like features (``probe_speed.synthetic``):

1. the features go into a real store (``embedcache.import_features``, float16 as extraction
   stores them): not timed as part of the study;
2. ``probes.scale(...)`` runs the whole study, timed wall clock (reading the store, sampling,
   every fit and prediction, metrics and the written outputs); ``fits.csv`` gives each fit's
   seconds (fit + predict);
3. scikit-learn's counterparts (``LogisticRegression(max_iter=1000)`` and ``LinearSVC()`` on
   ``StandardScaler`` features, ``KNeighborsClassifier(20)`` on raw features, as
   ``probe_speed.py``) fit the SAME training cells and predict the same test cells, split by
   split from the smallest limit up, in a child process with ``--threads`` BLAS threads, until
   ``--sklearn-budget`` seconds are spent. The comparison is fit by fit on the fits both did:
   their time ratio and the macro-F1 difference. Fits it did not reach are counted, never
   extrapolated.

Examples::

    python benchmarks/study_speed.py                                   # the issue's study, 600 s of scikit-learn
    python benchmarks/study_speed.py --n 50000 --limits 256..2048 --seeds 2 --sklearn-budget 120   # a quick look
    python benchmarks/study_speed.py --device cuda --out benchmarks/results/study_speed-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_speed import cpu_model, machine_kind, synthetic, thread_info, versions

PROBES = ("logistic", "knn", "svm")


def sklearn_estimator(probe: str):
    """scikit-learn's counterpart of ``probe``, and whether it gets standardised features."""
    if probe == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=1000), True
    if probe == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(20), False
    if probe == "svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(), True
    raise SystemExit(f"no scikit-learn counterpart for probe {probe!r}")


def sklearn_worker(data: str, out: str, threads: int, budget: float) -> None:
    """Child process: the planned fits in order, each probe until it has spent its share of
    ``budget`` seconds; one JSON line per finished fit (fit + predict seconds, macro-F1 over the
    split's classes)."""
    import warnings

    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    z = np.load(data, allow_pickle=False)
    X, labels = z["X"], z["labels"]
    plan = json.loads(str(z["plan"]))
    share = budget / len({job["probe"] for job in plan})  # each probe's own share: LinearSVC alone would eat it all
    spent: dict[str, float] = {}
    with open(out, "a") as f:
        for job in plan:
            if spent.get(job["probe"], 0.0) >= share:
                continue
            tr, te = z[f"train_{job['split']}"], z[f"test_{job['split']}"]
            est, standardise = sklearn_estimator(job["probe"])
            t = time.perf_counter()
            x_tr, x_te = X[tr], X[te]
            if standardise:
                sc = StandardScaler().fit(x_tr)
                x_tr, x_te = sc.transform(x_tr), sc.transform(x_te)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings: the baseline as users run it
                est.fit(x_tr, labels[tr])
                pred = est.predict(x_te)
            seconds = time.perf_counter() - t
            spent[job["probe"]] = spent.get(job["probe"], 0.0) + seconds
            f1 = f1_score(labels[te], pred, average="macro", labels=job["classes"], zero_division=0)
            f.write(json.dumps({**job, "seconds": seconds, "macro_f1": float(f1)}) + "\n")
            f.flush()


def run_sklearn(res, cells, probes: list[str], threads: int, budget: float, tmp: Path) -> list[dict]:
    """The same fits as the study ``res``, smallest limit first, in a child process."""
    positions = np.arange(len(cells.obs))
    X = cells.features(cells.backbones[0], positions)  # what the study read: float16-rounded, float32
    arrays, plan = {}, []
    for i, ((limit, seed), sp) in enumerate(sorted(res.splits.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1]))):
        arrays[f"train_{i}"], arrays[f"test_{i}"] = sp.train, sp.test
        plan += [{"split": i, "limit": limit, "seed": seed, "probe": p, "classes": list(sp.classes)} for p in probes]
    data = tmp / "sklearn.npz"
    np.savez(data, X=X, labels=cells.labels.astype(str), plan=np.array(json.dumps(plan)), **arrays)
    out = tmp / "sklearn.jsonl"
    env = dict(os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    try:  # a fit started just before the budget ends may run long: a hard stop, finished fits are kept
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--_worker",
                "--_data",
                str(data),
                "--_out",
                str(out),
                "--threads",
                str(threads),
                "--sklearn-budget",
                str(budget),
            ],
            check=True,
            env=env,
            timeout=budget * 2 + 60,
        )
    except subprocess.TimeoutExpired:
        pass
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def compare(res, sk: list[dict], probes: list[str]) -> list[dict]:
    """Per probe: our seconds over every fit, and ours vs scikit-learn's over the fits both did."""
    fits = res.fits.set_index(["probe", "limit", "seed"])["seconds"]
    f1 = res.results.query("metric == 'macro_f1'").set_index(["probe", "limit", "seed"])["value"]
    rows = []
    for probe in probes + ["all"]:
        mine = [r for r in sk if probe in ("all", r["probe"])]
        ours_all = float(
            res.fits["seconds"].sum() if probe == "all" else res.fits.query("probe == @probe")["seconds"].sum()
        )
        n_all = len(res.fits) if probe == "all" else int((res.fits["probe"] == probe).sum())
        keys = [(r["probe"], r["limit"], r["seed"]) for r in mine]
        ours_same = float(sum(fits[k] for k in keys))
        theirs = float(sum(r["seconds"] for r in mine))
        df1 = [100 * (f1[k] - r["macro_f1"]) for k, r in zip(keys, mine)]
        rows.append(
            {
                "probe": probe,
                "fits": n_all,
                "ours_s": ours_all,
                "sklearn_fits": len(mine),
                "sklearn_max_limit": max((r["limit"] for r in mine), default=None),
                "ours_s_same_fits": ours_same,
                "sklearn_s_same_fits": theirs,
                "ratio": theirs / ours_same if ours_same > 0 and mine else None,
                "mean_dF1_pts": float(np.mean(df1)) if df1 else None,
                "max_abs_dF1_pts": float(np.max(np.abs(df1))) if df1 else None,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=185_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=13)
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    ap.add_argument("--limits", default="256..16384")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--device", default="auto", help="device of our probes ('auto', 'cpu', 'cuda')")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for ours and for scikit-learn")
    ap.add_argument(
        "--sklearn-budget",
        type=float,
        default=600,
        help="seconds of scikit-learn fits, shared equally by the probes (0: none)",
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/study_speed-<cuda|cpuN-bf16|cpuN-fp32>.json)"
    )
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_data", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        return sklearn_worker(args._data, args._out, args.threads, args.sklearn_budget)

    import torch

    import embedcache
    import probes
    from probes.features.cells import open_cells
    from probes.heads import resolve_device

    torch.set_num_threads(args.threads)
    probe_list = [p for p in args.probes.split(",") if p]
    dev = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_model()} x{os.cpu_count()}"
    t = time.perf_counter()
    X, y = synthetic(args.n, args.d, args.classes, args.seed)
    labels = np.array([f"class{c:02d}" for c in range(args.classes)])[y]
    print(
        f"{args.n:,} x {args.d} features, {args.classes} classes (generated in {time.perf_counter() - t:.1f} s) | "
        f"ours on {device_name} | threads {args.threads}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        embedcache.import_features(tmp / "cache.zarr", X, labels=labels, backbone="synthetic")
        import_s = time.perf_counter() - t
        del X
        print(f"  into the store in {import_s:.1f} s; the study ...", flush=True)
        t = time.perf_counter()
        res = probes.scale(
            tmp / "cache.zarr",
            "synthetic",
            limits=args.limits,
            probes=probe_list,
            seeds=args.seeds,
            device=args.device,
            out=tmp / "study",
            quiet=True,
        )
        study_s = time.perf_counter() - t
        print(
            f"  study: {len(res.fits)} fits in {study_s:.1f} s (fits + predictions {res.fits['seconds'].sum():.1f} s)",
            flush=True,
        )
        sk: list[dict] = []
        if args.sklearn_budget > 0:
            print(
                f"  scikit-learn on the same fits, smallest limit first, for up to {args.sklearn_budget:.0f} s ...",
                flush=True,
            )
            sk = run_sklearn(
                res, open_cells(tmp / "cache.zarr", "synthetic"), probe_list, args.threads, args.sklearn_budget, tmp
            )
        rows = compare(res, sk, probe_list)
        per_limit = res.fits.groupby(["limit", "probe"])["seconds"].sum().unstack().round(3)

    print(
        f"\nstudy wall clock: {study_s:.1f} s for {len(res.fits)} fits "
        f"({len(res.splits)} limit x seed splits x {len(probe_list)} probes)"
    )
    print(
        f"{'probe':10} {'fits':>5} {'ours s':>8} | {'sk fits':>7} {'up to':>6} {'ours s':>8} {'sk s':>8} "
        f"{'sk/ours':>8} {'dF1 pts':>8}"
    )
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "-"
        d = f"{r['mean_dF1_pts']:+.2f}" if r["mean_dF1_pts"] is not None else "-"
        print(
            f"{r['probe']:10} {r['fits']:>5} {r['ours_s']:>8.1f} | {r['sklearn_fits']:>7} "
            f"{str(r['sklearn_max_limit'] or '-'):>6} "
            f"{r['ours_s_same_fits']:>8.1f} {r['sklearn_s_same_fits']:>8.1f} {ratio:>8} {d:>8}"
        )
    print(
        "(sk fits: fits scikit-learn finished in its share of the budget, smallest limits first; "
        "the ratio and dF1 (ours - sklearn,\n"
        " mean over those fits) compare the same fits only)"
    )
    print("\nour seconds per limit (fit + predict, summed over seeds):")
    print(per_limit.to_string())

    out = Path(args.out or Path(__file__).parent / "results" / f"study_speed-{machine_kind(dev)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "study_speed",
                "device": device_name,
                "features": {
                    "n": args.n,
                    "d": args.d,
                    "classes": args.classes,
                    "seed": args.seed,
                    "store_dtype": "float16",
                },
                "study": {
                    "limits": args.limits,
                    "seeds": args.seeds,
                    "probes": probe_list,
                    "fits": len(res.fits),
                    "wall_s": study_s,
                    "fit_predict_s": float(res.fits["seconds"].sum()),
                    "import_s": import_s,
                },
                "per_limit_s": {str(k): v for k, v in per_limit.to_dict(orient="index").items()},
                "comparison": rows,
                "sklearn": {"budget_s": args.sklearn_budget, "threads": args.threads, "fits": sk},
                "threads": thread_info(),
                "versions": versions(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            indent=1,
            default=str,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
