"""Robustness study: probes trained on clean features, scored on perturbed versions of the same test cells.

For each backbone, the clean feature set (``<backbone>/<prep>/clean``) trains the probes; every
perturbed set beside it (``<backbone>/<prep>/blur-post-0.8``...; made by ``embedcache extract
--perturb``) is scored on the *same* test cells, the cells that every perturbed set of every
backbone covers. Reported per backbone x probe x perturbation x σ: macro-F1, accuracy and
``delta_macro_f1`` = macro-F1(σ) − macro-F1(clean), means over seeds; and the **drop slope**:
the least-squares slope of the mean macro-F1 against ``log2(1 + σ)``, the clean score entering
at σ = 0, as the seed protocol reports it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .data import Cells, ProbeError, open_cells, parse_names, require_complete
from .metrics import MAIN_METRIC, score
from .sampling import TEST_SIZE, Sampler, parse_seeds

RESULT_COLUMNS = [
    "study", "dataset", "backbone", "feature_key", "pool", "probe", "seed", "perturbation", "sigma",
    "n_train", "n_test", "metric", "value",
]


@dataclass
class RobustnessResult:
    """Tidy results, the per-σ summary, the slopes, and where the files went."""

    name: str
    params: dict[str, Any]
    results: pd.DataFrame
    summary: pd.DataFrame  # backbone x probe x perturbation x sigma: means, std, delta
    slopes: pd.DataFrame  # backbone x probe x perturbation: drop slope per unit of log2(1 + sigma)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def drop_slope(sigmas: Sequence[float], scores: Sequence[float]) -> float:
    """Least-squares slope of ``scores`` against ``log2(1 + sigma)``."""
    x = np.log2(1.0 + np.asarray(sigmas, dtype=float))
    y = np.asarray(scores, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def perturbed_sets(cells: Cells, backbone: str, families: Sequence[str]) -> dict[str, list[tuple[float, Any]]]:
    """``{family: [(sigma, FeatureSet), ...]}`` beside ``backbone``'s clean set, sorted by σ."""
    from embedcache.perturb import perturbation_kinds

    clean = cells.feature_sets[backbone]
    if not clean.key.endswith("/clean"):
        raise ProbeError(f"'{clean.key}' is not a clean feature set; name the backbone or its '/clean' key")
    prefix = clean.key[: -len("clean")]
    kinds = sorted(perturbation_kinds(), key=len, reverse=True)  # longest first: 'blur-pre' before 'blur'
    ds = clean.dataset
    found: dict[str, list[tuple[float, Any]]] = {f: [] for f in families}
    for key in ds.feature_keys():
        if not key.startswith(prefix) or key == clean.key:
            continue
        tail = key[len(prefix):]
        kind = next((k for k in kinds if tail.startswith(k + "-")), None)
        if kind is None or kind not in found:
            continue
        try:
            sigma = float(tail[len(kind) + 1:])
        except ValueError:
            continue
        fs = ds.feature_set(key)
        require_complete(fs, cells.pool)
        found[kind].append((sigma, fs))
    for fam, sets in found.items():
        if not sets:
            raise ProbeError(
                f"no '{fam}' feature sets beside '{clean.key}'; extract them first, e.g. "
                f"embedcache extract --model {backbone} ... --perturb {fam}:0.1,0.2,0.4,0.8,1.6 "
                "(with the same --working-size as the clean set)"
            )
        sets.sort(key=lambda t: t[0])
    return found


def robustness(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    perturb: str | Sequence[str] = "blur-pre,blur-post",
    probe: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 1,
    split: str = "auto",
    dataset: str | None = None,
    pool: str = "cls",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    test_size: float = TEST_SIZE,
    quiet: bool = False,
    show: bool | None = None,
) -> RobustnessResult:
    """Train on clean features, score clean and every perturbed version of the same test cells.

    ``split``: ``auto`` (the store's ``split`` column when it has test cells, the cells the
    perturbed sets cover by default; else a stratified 80/20 split), ``column`` or
    ``stratified``. Writes ``results.csv/.parquet``, ``summary.csv``, ``slopes.csv``,
    ``robustness.png`` and ``study.json`` to ``out`` (default ``robustness-<models>-<date>``).
    """
    from . import report
    from .study import _check_probes, _fit_predict, _study_name

    families = parse_names(perturb)
    if not families:
        raise ProbeError("no perturbation given, e.g. --perturb blur-pre,blur-post")
    seed_list = parse_seeds(seeds)
    cells = open_cells(store, model, dataset=dataset, pool=pool)
    probe_list = _check_probes(probe)
    sets = {b: perturbed_sets(cells, b, families) for b in cells.backbones}
    has_test = (np.char.lower(cells.obs["split"].to_numpy(dtype=str)) == "test").any()
    if split == "auto":
        split = "column" if has_test else "stratified"
    if split not in ("column", "stratified"):
        raise ProbeError(f"unknown split '{split}' for a robustness study: use auto, column or stratified")
    sampler = Sampler(cells.labels, split, split_column=cells.obs["split"].to_numpy(), test_size=test_size)
    # the test cells every perturbed set of every backbone covers
    rows = cells.obs["row"].to_numpy()
    covered = np.ones(len(cells.obs), dtype=bool)
    for b in cells.backbones:
        for fam in families:
            for _, fs in sets[b][fam]:
                covered &= fs.ok()[rows]
    name = _study_name("robustness", cells.backbones + families, out)
    params = dict(store=str(cells.store_url), dataset=cells.dataset, model=cells.backbones, perturb=families,
                  probe=probe_list, seeds=seed_list, split=split, pool=pool, device=device, test_size=test_size,
                  sigmas={b: {f: [s for s, _ in sets[b][f]] for f in families} for b in cells.backbones})
    notes = cells.exclusion_lines()
    splits = {}
    for seed in seed_list:
        sp = sampler.split(None, seed)
        keep = covered[sp.test]
        if not keep.any():
            raise ProbeError(
                "the perturbed feature sets cover none of the test cells; extract them for the test split "
                "(give the manifest a split column with 'test' cells) or for all cells (--perturb-rows all)"
            )
        if not keep.all():
            notes.append(f"seed {seed}: {int((~keep).sum())} of {len(keep)} test cells have no perturbed "
                         "features (outside the perturbed subset or unreadable) and are not scored")
        sp.test = sp.test[keep]
        sp.classes = [c for c in sp.classes if c in set(cells.labels[sp.test])]
        splits[seed] = sp
    notes = list(dict.fromkeys(notes))
    out_rows: list[dict] = []
    n_fits = len(cells.backbones) * len(seed_list) * len(probe_list)
    with report.progress(n_fits, quiet) as advance:
        for b in cells.backbones:
            variants = [("clean", 0.0, cells.feature_sets[b])] + [
                (fam, s, fs) for fam in families for s, fs in sets[b][fam]
            ]
            for seed, sp in splits.items():
                x_tr = cells.features(b, sp.train)
                tests = [cells.features(b, sp.test, fs) for _, _, fs in variants]
                for p in probe_list:
                    advance(f"{b} · {p} · seed {seed}")
                    preds, _, _ = _fit_predict(p, seed, device, x_tr, cells.labels[sp.train], tests, b, sp)
                    for (fam, sigma, fs), pred in zip(variants, preds):
                        sc = score(cells.labels[sp.test], pred, sp.classes)
                        base = dict(study=name, dataset=cells.dataset, backbone=b, feature_key=fs.key, pool=pool,
                                    probe=p, seed=seed, perturbation=fam, sigma=sigma, n_train=len(sp.train),
                                    n_test=len(sp.test))
                        out_rows += [{**base, "metric": m, "value": v} for m, v in sc.values.items()]
    results = pd.DataFrame(out_rows, columns=RESULT_COLUMNS)
    summary = summarize(results, families)
    slopes = slope_table(summary)
    res = RobustnessResult(name, params, results, summary, slopes, notes)
    res.out = Path(out) if out is not None else Path(name)
    res.files = write_outputs(res)
    if show or (show is None and not quiet):
        print_result(res)
    return res


def summarize(results: pd.DataFrame, families: Sequence[str]) -> pd.DataFrame:
    """Per backbone x probe x perturbation x σ: mean/std of macro-F1 and accuracy over seeds and
    Δ macro-F1 against clean. The clean row is repeated under each family at σ = 0."""
    keys = ["backbone", "probe", "perturbation", "sigma"]
    wide = results[results["metric"].isin([MAIN_METRIC, "accuracy"])].pivot_table(
        index=keys + ["seed"], columns="metric", values="value").reset_index()
    g = wide.groupby(keys, sort=False)
    s = g.agg(macro_f1=(MAIN_METRIC, "mean"), macro_f1_std=(MAIN_METRIC, "std"), accuracy=("accuracy", "mean"),
              n_seeds=("seed", "nunique")).reset_index()
    s["macro_f1_std"] = s["macro_f1_std"].fillna(0.0)
    clean = s[s["perturbation"] == "clean"]
    parts = []
    for fam in families:
        parts.append(clean.assign(perturbation=fam))
        parts.append(s[s["perturbation"] == fam])
    out = pd.concat(parts, ignore_index=True)
    base = clean.set_index(["backbone", "probe"])["macro_f1"]
    out["delta_macro_f1"] = out["macro_f1"].to_numpy() - base.loc[list(zip(out["backbone"], out["probe"]))].to_numpy()
    return out.sort_values(["backbone", "probe", "perturbation", "sigma"], kind="stable").reset_index(drop=True)


def slope_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Drop slope of mean macro-F1 per unit of log2(1 + σ) for each backbone x probe x perturbation."""
    rows = []
    for (b, p, fam), g in summary.groupby(["backbone", "probe", "perturbation"], sort=False):
        worst = g.loc[g["sigma"].idxmax()]
        rows.append(dict(backbone=b, probe=p, perturbation=fam, slope=drop_slope(g["sigma"], g["macro_f1"]),
                         clean_macro_f1=float(g.loc[g["sigma"] == 0, "macro_f1"].iat[0]), max_sigma=float(worst["sigma"]),
                         delta_at_max_sigma=float(worst["delta_macro_f1"]), n_points=len(g)))
    return pd.DataFrame(rows)


def write_outputs(res: RobustnessResult) -> dict[str, Path]:
    out = Path(res.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {n: out / n for n in ("results.csv", "results.parquet", "summary.csv", "slopes.csv", "study.json")}
    res.results.to_csv(files["results.csv"], index=False)
    res.results.to_parquet(files["results.parquet"], index=False)
    res.summary.to_csv(files["summary.csv"], index=False)
    res.slopes.to_csv(files["slopes.csv"], index=False)
    files["study.json"].write_text(json.dumps({
        "kind": "robustness", "name": res.name, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "params": res.params, "notes": res.notes, "slope_definition": "least-squares slope of mean macro-F1 "
        "against log2(1 + sigma), clean at sigma = 0", "files": sorted(files) + ["robustness.png"],
    }, indent=2, default=str))
    files["robustness.png"] = plot(res.summary, out / "robustness.png", title=f"{res.params['dataset']} · {res.params['split']} split")
    return files


def plot(summary: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Macro-F1 against σ (x at log2(1 + σ)), one panel per perturbation side by side, ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(summary["perturbation"]))
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), dpi=120, sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10")
    curves = list(dict.fromkeys(zip(summary["backbone"], summary["probe"])))
    for ax, fam in zip(axes[0], fams):
        d = summary[summary["perturbation"] == fam]
        for k, (b, p) in enumerate(curves):
            c = d[(d["backbone"] == b) & (d["probe"] == p)].sort_values("sigma")
            x = np.log2(1 + c["sigma"].to_numpy(float))
            y, s = c["macro_f1"].to_numpy(float), c["macro_f1_std"].to_numpy(float)
            ax.plot(x, y, "-o", color=colors(k % 10), ms=4, lw=1.6, label=f"{b} · {p}")
            ax.fill_between(x, y - s, y + s, color=colors(k % 10), alpha=0.15, lw=0)
        sig = sorted(d["sigma"].unique())
        ax.set_xticks(np.log2(1 + np.asarray(sig)), [f"{v:g}" for v in sig])
        ax.set_xlabel("σ (axis: log2(1 + σ))")
        ax.set_title(fam, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("macro-F1 (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def print_result(res: RobustnessResult, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = res.summary
    t = Table(title=f"{res.name}: macro-F1 (Δ vs clean), probes trained on clean features")
    for col in ("backbone", "probe", "perturbation"):
        t.add_column(col, no_wrap=True)
    sigmas = sorted(s["sigma"].unique())
    for v in sigmas:
        t.add_column(f"σ={v:g}", justify="right")
    t.add_column("slope / log2(1+σ)", justify="right", style="bold")
    for (b, p, fam), g in s.groupby(["backbone", "probe", "perturbation"], sort=False):
        by = {r.sigma: r for r in g.itertuples()}
        cells = [("-" if (r := by.get(v)) is None else f"{r.macro_f1:.3f}" + ("" if v == 0 else f" ({r.delta_macro_f1:+.3f})"))
                 for v in sigmas]
        sl = res.slopes[(res.slopes.backbone == b) & (res.slopes.probe == p) & (res.slopes.perturbation == fam)]
        t.add_row(b, p, fam, *cells, f"{sl['slope'].iat[0]:+.3f}")
    console.print(t)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    if res.out is not None:
        console.print(f"wrote [bold]{res.out}/[/] ({', '.join(sorted(res.files))})")
