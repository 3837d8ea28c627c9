"""Label-noise audit quality against cleanlab, on real cells with injected label flips.

Real Chula RBC-12 cells (13 red-cell morphologies, 64×64, smear = group) are extracted once
with small random-init timm backbones through ``embedcache.extract`` (no pretrained weights
are reachable here). For each noise setting, a known fraction of the labels is flipped:

* ``uniform``: a flipped cell gets any other class, uniformly;
* ``adjacent``: a flipped cell gets a morphologically adjacent class (:data:`ADJACENT`: the
  size continuum normal / macrocyte / microcyte / spherocyte, the elongation continuum
  ovalocyte / elliptocyte / teardrop, central pallor target / hypochromia, irregular outline
  burr / schistocyte, stomatocyte / normal); only cells of a class with neighbours are flipped.

Then ``probes.audit_arrays`` computes out-of-fold probabilities (backbone × probe × seed,
group-aware folds on smears) and the suspicion score. On the *same* out-of-fold probabilities
(averaged over the same models), cleanlab ranks the cells: ``cleanlab.filter.find_label_issues``
(confident learning, ``prune_by_noise_rate``; its flagged cells first, ranked by
self-confidence, then the rest by ``cleanlab.rank.get_label_quality_scores``) and
``get_label_quality_scores`` for AUROC. Reported per setting and per backbone set (each
backbone alone, and all combined):

* precision at n (n = number of flipped cells), recall at 2n, AUROC of the score;
* cleanlab's figures, and ours minus cleanlab's;
* the size, precision and recall of cleanlab's flagged set;

each averaged over several independent flip draws (``--flip-seeds``), with the spread.

    python benchmarks/label_noise.py --seeds 3 --threads 1   # the reported run: 4,000 cells, 2 backbones,
                                                             # 3 probes x 3 seeds, 3 flip draws; ~15 min on 2 CPU cores
    python benchmarks/label_noise.py --n-cells 1000 --seeds 1 --probes knn --flip-seeds 0 --threads 1   # quick

Writes ``benchmarks/results/label_noise-cpu.json`` (``--out``). The work folder keeps the
store and the out-of-fold caches: a rerun with other score weights refits nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedcache  # noqa: E402
from probes.studies.audit import WEIGHTS, audit_arrays, evidence, formula, neighbor_disagreement  # noqa: E402

SHARED = Path(os.environ.get("EMBEDCACHE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("precision_at_n", "recall_at_2n", "auroc")

# morphologically adjacent Chula classes (symmetric); "uncategorised" has none
ADJACENT = {
    "normal": ["macrocyte", "microcyte", "stomatocyte"],
    "macrocyte": ["normal"],
    "microcyte": ["normal", "spherocyte"],
    "spherocyte": ["microcyte"],
    "stomatocyte": ["normal"],
    "target": ["hypochromia"],
    "hypochromia": ["target"],
    "ovalocyte": ["elliptocyte"],
    "elliptocyte": ["ovalocyte", "teardrop"],
    "teardrop": ["elliptocyte"],
    "burr": ["schistocyte"],
    "schistocyte": ["burr"],
}
# backbone spec: timm model, input size, pooling
BACKBONES = {
    "resnet": ("timm:test_resnet", 64, "mean"),
    "vit": ("timm:test_vit", 64, "cls"),
    "byobnet": ("timm:test_byobnet", 64, "mean"),
}


def cells(n: int, part: str, seed: int = 0) -> pd.DataFrame:
    """``n`` Chula cells (label = class name, group = smear): ``eval`` the first n of a seeded
    shuffle, ``dev`` the next n (disjoint; for choosing score weights without touching eval)."""
    root = SHARED / "chula_rbc12"
    if not (root / "manifest.csv").is_file():
        sys.exit(f"real cells not found at {root} (set EMBEDCACHE_SHARED_DATA)")
    df = pd.read_csv(root / "manifest.csv", dtype=str)
    df["path"] = [str(root / p) for p in df["path"]]
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
    start = 0 if part == "eval" else n
    df = df.iloc[start : start + n].copy()
    if len(df) < n:
        sys.exit(f"only {len(df)} cells for --part {part} with --n-cells {n}")
    return pd.DataFrame({"path": df["path"], "label": df["label_name"], "group": df["smear"]})


def extract_features(df: pd.DataFrame, names: list[str], work: Path) -> dict[str, np.ndarray]:
    """Extract (or reuse) each backbone's features of the cells; float32 (N, D) per backbone."""
    manifest = work / "cells.csv"
    df.to_csv(manifest, index=False)
    store = work / "cache.zarr"
    feats = {}
    for name in names:
        model, size, pool = BACKBONES[name]
        t = time.time()
        r = embedcache.extract(
            model,
            manifest,
            store,
            weights="random",
            input_size=size,
            pool=pool,
            progress=False,
            num_workers=2,
            batch_size=128,
            chunk_size=1024,
        )
        feats[name] = embedcache.open_store(store).dataset(r.dataset).feature_set(r.key).to_numpy(pool)
        print(f"  {name}: {model} {size}px {pool} -> {feats[name].shape} ({time.time() - t:.0f} s)", flush=True)
    return feats


def flip(labels: np.ndarray, rate: float, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): ``round(rate * N)`` cells get another label."""
    classes = np.unique(labels)
    eligible = np.arange(len(labels)) if kind == "uniform" else np.flatnonzero([lab in ADJACENT for lab in labels])
    n_flip = int(round(rate * len(labels)))
    pick = rng.choice(eligible, size=n_flip, replace=False)
    noisy = labels.copy()
    for i in pick:
        options = [c for c in classes if c != labels[i]] if kind == "uniform" else ADJACENT[labels[i]]
        noisy[i] = options[rng.integers(len(options))]
    mask = np.zeros(len(labels), dtype=bool)
    mask[pick] = True
    return noisy, mask


def ranked_metrics(order: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Precision at n and recall at 2n of a ranking (most suspicious first), n = flipped cells."""
    n = int(flipped.sum())
    return {
        "precision_at_n": float(flipped[order[:n]].mean()),
        "recall_at_2n": float(flipped[order[: 2 * n]].sum() / n),
    }


def ours(res_oofs, labels, classes, disagreement, flipped, weights) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    ev = evidence(res_oofs, labels, classes, disagreement, weights)
    score = ev["score"].to_numpy()
    order = np.lexsort((np.arange(len(score)), -score))
    return {**ranked_metrics(order, flipped), "auroc": float(roc_auc_score(flipped, score))}


def cleanlab_figures(
    proba: np.ndarray, labels: np.ndarray, classes: list[str], flipped: np.ndarray
) -> dict[str, float]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.metrics import roc_auc_score

    y = pd.Index(classes).get_indexer(labels)
    p = proba / proba.sum(1, keepdims=True)
    quality = get_label_quality_scores(y, p)  # self-confidence, cleanlab's default
    issues = find_label_issues(y, p, return_indices_ranked_by="self_confidence")
    rest = np.setdiff1d(np.arange(len(y)), issues)
    rest = rest[np.lexsort((rest, quality[rest]))]
    order = np.concatenate([issues, rest])
    flagged = np.zeros(len(y), dtype=bool)
    flagged[issues] = True
    n = int(flipped.sum())
    return {
        **ranked_metrics(order, flipped),
        "auroc": float(roc_auc_score(flipped, 1 - quality)),
        "flagged": int(flagged.sum()),
        "flagged_precision": float(flipped[flagged].mean()) if flagged.any() else 0.0,
        "flagged_recall": float((flipped & flagged).sum() / n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-cells", type=int, default=4000)
    ap.add_argument("--part", choices=("eval", "dev"), default="eval", help="eval cells, or the disjoint dev cells")
    ap.add_argument("--backbones", default="resnet,vit", help=f"comma list of {', '.join(BACKBONES)}")
    ap.add_argument("--probes", default="logistic,knn,mlp")
    ap.add_argument("--seeds", default="1", help="a count (42..) or a comma list")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rates", default="0.05,0.1,0.2")
    ap.add_argument("--kinds", default="uniform,adjacent")
    ap.add_argument("--flip-seeds", default="0,1,2", help="comma list: each draws its own flips; figures are averaged")
    ap.add_argument("--weights", default=None, help="consensus,confidence,neighbors (default: the library's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--work", default=None, help="work folder (store + caches; default: $TMPDIR/embedcache-label-noise)"
    )
    ap.add_argument("--out", default=str(RESULTS / "label_noise-cpu.json"))
    args = ap.parse_args()

    weights = dict(WEIGHTS) if args.weights is None else dict(zip(WEIGHTS, map(float, args.weights.split(","))))
    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    work = Path(args.work or Path(tempfile.gettempdir()) / "embedcache-label-noise") / f"{args.part}-{args.n_cells}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    df = cells(args.n_cells, args.part)
    print(f"{len(df)} Chula cells ({args.part}), {df['label'].nunique()} classes, {df['group'].nunique()} smears")
    feats = extract_features(df, names, work)
    clean = df["label"].to_numpy(dtype=object).astype(str)
    ids = [f"c{i}" for i in range(len(df))]
    sets = [[b] for b in names] + ([names] if len(names) > 1 else [])
    rows = []
    flip_seeds = [int(v) for v in args.flip_seeds.split(",")]
    for kind in args.kinds.split(","):
        for rate in map(float, args.rates.split(",")):
            for fs_ in flip_seeds:
                rng = np.random.default_rng([fs_, int(rate * 1000), kind == "adjacent"])
                noisy, flipped = flip(clean, rate, kind, rng)
                t = time.time()
                res = audit_arrays(
                    feats,
                    noisy,
                    ids=ids,
                    groups=df["group"].to_numpy(),
                    probes=args.probes,
                    folds=args.folds,
                    seeds=args.seeds,
                    k=args.k,
                    weights=weights,
                    cache=work / f"oof-{kind}-{rate:g}-{fs_}.parquet",
                    device="cpu",
                    threads=args.threads,
                    quiet=True,
                )
                print(
                    f"{kind} {rate:.0%} flips #{fs_}: {int(flipped.sum())} flipped; {res.computed} models fitted, "
                    f"{res.reused} reused ({time.time() - t:.0f} s)",
                    flush=True,
                )
                dis = {b: neighbor_disagreement(feats[b], noisy, args.k)[0] for b in names}
                for bset in sets:
                    oofs = [o for o in res.oofs if o.key["backbone"] in bset]
                    d = np.mean([dis[b] for b in bset], axis=0)
                    a = ours(oofs, noisy, res.classes, d, flipped, weights)
                    c = cleanlab_figures(np.mean([o.proba for o in oofs], axis=0), noisy, res.classes, flipped)
                    row = {
                        "kind": kind,
                        "rate": rate,
                        "flip_seed": fs_,
                        "backbones": "+".join(bset),
                        "n_models": len(oofs),
                        "n_flipped": int(flipped.sum()),
                        **{f"ours_{m}": v for m, v in a.items()},
                        **{f"cleanlab_{m}": v for m, v in c.items()},
                    }
                    for m in METRICS:
                        row[f"diff_{m}"] = a[m] - c[m]
                    rows.append(row)
                    print(
                        f"   {row['backbones']:<12} P@n {a['precision_at_n']:.3f} vs {c['precision_at_n']:.3f}   "
                        f"R@2n {a['recall_at_2n']:.3f} vs {c['recall_at_2n']:.3f}   "
                        f"AUROC {a['auroc']:.3f} vs {c['auroc']:.3f}   (ours vs cleanlab; cleanlab flagged "
                        f"{c['flagged']}: P {c['flagged_precision']:.3f} R {c['flagged_recall']:.3f})",
                        flush=True,
                    )
    table = pd.DataFrame(rows)
    cols = [f"{w}_{m}" for w in ("ours", "cleanlab", "diff") for m in METRICS]
    summary = table.groupby(["kind", "rate", "backbones"], sort=False)[cols].mean()
    spread = table.groupby(["kind", "rate", "backbones"], sort=False)[[f"diff_{m}" for m in METRICS]].std(ddof=1)
    pd.set_option("display.width", 250)
    print(f"\nmean over {len(flip_seeds)} flip draws (ours, cleanlab, ours - cleanlab):")
    show = pd.DataFrame(
        {
            m: [
                f"{o:.3f} {c:.3f} {d:+.3f}±{s:.3f}"
                for o, c, d, s in zip(
                    summary[f"ours_{m}"], summary[f"cleanlab_{m}"], summary[f"diff_{m}"], spread[f"diff_{m}"].fillna(0)
                )
            ]
            for m in METRICS
        },
        index=summary.index,
    )
    print(show.to_string())
    wins = {m: int((summary[f"diff_{m}"] >= 0).sum()) for m in METRICS}
    print(
        f"ours >= cleanlab (mean over draws) in {wins} of {len(summary)} (setting x backbone set) rows; "
        "mean diff: " + ", ".join(f"{m} {summary[f'diff_{m}'].mean():+.4f}" for m in METRICS)
    )
    gain = None
    if len(sets) > 1:
        comb = summary.xs("+".join(names), level="backbones")[[f"ours_{m}" for m in METRICS]]
        best = (
            summary.drop("+".join(names), level="backbones")
            .groupby(["kind", "rate"], sort=False)[[f"ours_{m}" for m in METRICS]]
            .max()
        )
        gain = comb - best
        print("ours, all backbones combined minus the best single backbone:\n" + gain.round(4).to_string())
        adv = summary.xs("+".join(names), level="backbones")[[f"diff_{m}" for m in METRICS]]
        adv_single = (
            summary.drop("+".join(names), level="backbones")
            .groupby(["kind", "rate"], sort=False)[[f"diff_{m}" for m in METRICS]]
            .mean()
        )
        print(
            "(ours - cleanlab) combined minus (ours - cleanlab) averaged over single backbones:\n"
            + (adv - adv_single).round(4).to_string()
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "label_noise",
                "data": f"chula_rbc12, {len(df)} cells ({args.part}), 13 classes, groups = smears",
                "backbones": {b: BACKBONES[b] for b in names},
                "probes": args.probes,
                "seeds": args.seeds,
                "folds": args.folds,
                "k": args.k,
                "formula": formula(weights),
                "weights": weights,
                "adjacent": ADJACENT,
                "cleanlab": __import__("cleanlab").__version__,
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "flip_seeds": flip_seeds,
                "seconds": round(time.time() - t0, 1),
                "wins_on_means": wins,
                "summary": summary.reset_index().to_dict(orient="records"),
                "combined_minus_best_single": None if gain is None else gain.reset_index().to_dict(orient="records"),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
