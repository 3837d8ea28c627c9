"""``robustness``: probes trained on clean features, scored on perturbed versions of the same test cells.

For each backbone, the clean feature set (``<backbone>/<prep>/clean``) trains the probes; every
perturbed set beside it (``<backbone>/<prep>/blur-post-0.8``...; made by ``embedcache extract
--perturb``) is scored on the *same* test cells, the cells that every perturbed set of every
backbone covers. Reported per backbone x probe x perturbation x σ: macro-F1, accuracy and
``delta_macro_f1`` = macro-F1(σ) − macro-F1(clean), means over seeds; and the **drop slope**:
the least-squares slope of the mean macro-F1 against ``log2(1 + σ)``, the clean score entering
at σ = 0, as the seed protocol reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.options import UNSET
from probes.engine.intervals import TestedCells, attach_intervals, compare_panel, seed_mean_interval
from probes.engine.options import StudyOptions, study_options
from probes.engine.runtime import study_runtime
from probes.engine.skeleton import FitJob, Saves, check_probes, finish, run_plan, study_name
from probes.errors import ProbeError
from probes.features.cells import Cells, open_cells, parse_names, require_complete
from probes.metrics import MAIN_METRIC, score
from probes.reporting.console import Col, Panel
from probes.reporting.plots import plot_robustness
from probes.reporting.tables import study_document
from probes.sampling import Sampler, Split, parse_seeds

RESULT_COLUMNS = [
    "study",
    "dataset",
    "backbone",
    "feature_key",
    "pool",
    "probe",
    "seed",
    "perturbation",
    "sigma",
    "n_train",
    "n_test",
    "metric",
    "value",
    "low",
    "high",
]
SLOPE_DEFINITION = "least-squares slope of mean macro-F1 against log2(1 + sigma), clean at sigma = 0"


@dataclass
class RobustnessResult(Saves):
    """Tidy results, the per-σ summary, the slopes, and where the files went."""

    name: str
    params: dict[str, Any]
    results: pd.DataFrame
    summary: pd.DataFrame  # backbone x probe x perturbation x sigma: means, std, delta
    slopes: pd.DataFrame  # backbone x probe x perturbation: drop slope per unit of log2(1 + sigma)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    compare: pd.DataFrame | None = None  # each perturbed level against clean, same fit, same test cells


def drop_slope(sigmas: Sequence[float], scores: Sequence[float]) -> float:
    """Least-squares slope of ``scores`` against ``log2(1 + sigma)``."""
    x = np.log2(1.0 + np.asarray(sigmas, dtype=float))
    y = np.asarray(scores, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def _beside(clean: Any, families: Sequence[str]) -> dict[str, list[tuple[float, str]]]:
    """``{family: [(sigma, key), ...]}``: the perturbed feature keys beside the clean set ``clean``."""
    from embedcache.inputs.perturb import perturbation_kinds

    prefix = clean.key[: -len("clean")]
    kinds = sorted(perturbation_kinds(), key=len, reverse=True)  # longest first: 'blur-pre' before 'blur'
    found: dict[str, list[tuple[float, str]]] = {f: [] for f in families}
    for key in clean.dataset.feature_keys():
        if not key.startswith(prefix) or key == clean.key:
            continue
        tail = key[len(prefix) :]
        kind = next((k for k in kinds if tail.startswith(k + "-")), None)
        if kind is None or kind not in found:
            continue
        try:
            sigma = float(tail[len(kind) + 1 :])
        except ValueError:
            continue
        found[kind].append((sigma, key))
    return found


def perturbation_need(families: Sequence[str]) -> Any:
    """What a clean set lacks for a robustness study of ``families`` (None: it has every family beside it):
    what :func:`probes.features.cells.open_cells` resolves a backbone name with."""

    def lacks(clean: Any) -> str | None:
        if not clean.key.endswith("/clean"):
            return None
        missing = [f for f, sets in _beside(clean, families).items() if not sets]
        return f"no {', '.join(missing)} feature sets beside it" if missing else None

    return lacks


def perturbed_sets(cells: Cells, backbone: str, families: Sequence[str]) -> dict[str, list[tuple[float, Any]]]:
    """``{family: [(sigma, FeatureSet), ...]}`` beside ``backbone``'s clean set, sorted by σ."""
    clean = cells.feature_sets[backbone]
    if not clean.key.endswith("/clean"):
        raise ProbeError(f"'{clean.key}' is not a clean feature set; name the backbone or its '/clean' key")
    ds = clean.dataset
    found: dict[str, list[tuple[float, Any]]] = {}
    for fam, keys in _beside(clean, families).items():
        if not keys:
            raise ProbeError(
                f"no '{fam}' feature sets beside '{clean.key}'; extract them first, e.g. "
                f"embedcache extract --model {backbone} ... --perturb {fam}:0.1,0.2,0.4,0.8,1.6 "
                "(with the same --working-size as the clean set)"
            )
        sets = []
        for sigma, key in sorted(keys, key=lambda t: t[0]):
            fs = ds.feature_set(key)
            require_complete(fs, cells.pool_of(backbone), backbone)
            sets.append((sigma, fs))
        found[fam] = sets
    return found


def robustness(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    perturb: str | Sequence[str] = "blur-pre,blur-post",
    probes: str | Sequence[str] = "logistic",
    seeds: int | str | Sequence[int] = 1,
    split: str | None = UNSET,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    quiet: bool = UNSET,
    options: StudyOptions | None = None,
    **more: Any,
) -> RobustnessResult:
    """Train on clean features, score clean and every perturbed version of the same test cells.

    ``probes``: one probe or a comma list (default ``logistic``).
    ``split``: ``auto`` (the store's ``split`` column when it has test cells, the cells the
    perturbed sets cover by default; else a stratified 80/20 split), ``column`` or
    ``stratified``. Writes ``results.csv/.parquet``, ``summary.csv``, ``slopes.csv``,
    ``robustness.png`` and ``study.json`` to ``out`` (default ``robustness-<models>-<date>``).
    ``scheduler`` (``tcp://host:port`` or ``local:N``) runs each fit as a Dask task, with identical results;
    ``out_of_core`` / ``max_memory`` read features in store chunks when they exceed the budget
    (:mod:`probes.engine.runtime`).
    """
    opts, _ = study_options(options, more, split=split, dataset=dataset, pool=pool, out=out, device=device, quiet=quiet)
    opts.refuse(("val", "train_domain", "test_domain"), "robustness")
    split = opts.split_or("auto")
    dataset = opts.dataset
    pool = opts.pool
    out = opts.out
    device = opts.device
    test_size = opts.test_size
    quiet = opts.quiet

    with study_runtime(**opts.runtime()):
        families = parse_names(perturb)
        if not families:
            raise ProbeError("no perturbation given, e.g. --perturb blur-pre,blur-post")
        seed_list = parse_seeds(seeds)
        cells = open_cells(store, model, dataset=dataset, pool=pool, needs=perturbation_need(families))
        probe_list = check_probes(probes)
        sets = {b: perturbed_sets(cells, b, families) for b in cells.backbones}
        has_test = (np.char.lower(cells.obs["split"].to_numpy(dtype=str)) == "test").any()
        if split == "auto":
            split = "column" if has_test else "stratified"
        if split not in ("column", "stratified"):
            raise ProbeError(f"unknown split '{split}' for a robustness study: use auto, column or stratified")
        name = study_name("robustness", cells.backbones + families, out)
        params = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            perturb=families,
            probe=probe_list,
            seeds=seed_list,
            split=split,
            pool=cells.pool,
            device=device,
            test_size=test_size,
            sigmas={b: {f: [s for s, _ in sets[b][f]] for f in families} for b in cells.backbones},
        )
        notes = cells.exclusion_lines()
        splits = covered_splits(
            cells,
            sets,
            Sampler(cells.labels, split, split_column=cells.obs["split"].to_numpy(), test_size=test_size),
            seed_list,
            notes,
        )
        folder = opts.folder(name)
        rows: list[dict] = []
        tested: dict[tuple, TestedCells] = {}  # (backbone, probe, seed) -> every perturbation on its test cells
        total = len(cells.backbones) * len(seed_list) * len(probe_list)
        for done in run_plan(_jobs(cells, sets, families, splits, probe_list), total, device=device, quiet=quiet):
            job = done.job
            sp, variants = job.tag
            group = tested.setdefault(
                (job.backbone, job.probe, sp.seed), TestedCells(cells.labels[sp.test], sp.classes)
            )
            for (fam, sigma, fs), pred in zip(variants, done.predictions):
                sc = score(cells.labels[sp.test], pred, sp.classes)
                group.add((fam, sigma), pred, range(len(rows), len(rows) + len(sc.values)))
                base = dict(
                    study=name,
                    dataset=cells.dataset,
                    backbone=job.backbone,
                    feature_key=fs.key,
                    pool=cells.pool_of(job.backbone),
                    probe=job.probe,
                    seed=sp.seed,
                    perturbation=fam,
                    sigma=sigma,
                    n_train=len(sp.train),
                    n_test=len(sp.test),
                )
                rows += [{**base, "metric": m, "value": v, "low": np.nan, "high": np.nan} for m, v in sc.values.items()]
        found = attach_intervals(
            rows,
            tested,
            fit_columns=["perturbation", "sigma"],
            group_columns=["backbone", "probe", "seed"],
            pair=lambda a, b: (a[0] == "clean") != (b[0] == "clean"),  # every perturbed level against clean
        )
        results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
        summary = summary_table(results, families, found.replicates)
        res = RobustnessResult(
            name,
            params,
            results,
            summary,
            slope_table(summary),
            list(dict.fromkeys(notes)),
            out=folder,
            compare=found.compare,
        )
        title = f"{params['dataset']} · {params['split']} split"
        finish(
            res,
            tables={
                "results.csv": results,
                "results.parquet": results,
                "summary.csv": summary,
                "slopes.csv": res.slopes,
                "compare.csv": res.compare,
            },
            plots={"robustness.png": lambda p: plot_robustness(summary, p, title=title)},
            documents={
                "study.json": lambda names: study_document(
                    "robustness", name, params, res.notes, names, slope_definition=SLOPE_DEFINITION
                )
            },
            panels=panels(res),
            show=opts.printing(),
        )
        return res


def covered_splits(
    cells: Cells, sets: dict, sampler: Sampler, seeds: Sequence[int], notes: list[str]
) -> dict[int, Split]:
    """One uncapped split per seed, its test side cut to the cells every perturbed set of every backbone covers."""
    rows = cells.obs["row"].to_numpy()
    covered = np.ones(len(cells.obs), dtype=bool)
    for by_family in sets.values():
        for family_sets in by_family.values():
            for _, fs in family_sets:
                covered &= fs.ok()[rows]
    splits = {}
    for seed in seeds:
        sp = sampler.split(None, seed)
        keep = covered[sp.test]
        if not keep.any():
            raise ProbeError(
                "the perturbed feature sets cover none of the test cells; extract them for the test split "
                "(give the manifest a split column with 'test' cells) or for all cells (--perturb-rows all)"
            )
        if not keep.all():
            notes.append(
                f"seed {seed}: {int((~keep).sum())} of {len(keep)} test cells have no perturbed "
                "features (outside the perturbed subset or unreadable) and are not scored"
            )
        sp.test = sp.test[keep]
        sp.classes = [c for c in sp.classes if c in set(cells.labels[sp.test])]
        splits[seed] = sp
    return splits


def _jobs(
    cells: Cells, sets: dict, families: Sequence[str], splits: dict[int, Split], probes: Sequence[str]
) -> Iterator[FitJob]:
    """Per backbone and seed: clean training features; the clean and every perturbed test matrix."""
    for b in cells.backbones:
        variants = [("clean", 0.0, cells.feature_sets[b])] + [
            (fam, s, fs) for fam in families for s, fs in sets[b][fam]
        ]
        for seed, sp in splits.items():
            x_tr = cells.features(b, sp.train)
            tests = [cells.features(b, sp.test, fs) for _, _, fs in variants]
            for p in probes:
                yield FitJob(
                    b, p, seed, x_tr, cells.labels[sp.train], tests, n_classes=len(sp.classes), tag=(sp, variants)
                )


def summary_table(results: pd.DataFrame, families: Sequence[str], replicates: dict | None = None) -> pd.DataFrame:
    """Per backbone x probe x perturbation x σ: mean/std of macro-F1 and accuracy over seeds and
    Δ macro-F1 against clean. The clean row is repeated under each family at σ = 0. With ``replicates``
    (:func:`probes.engine.intervals.attach_intervals`): ``macro_f1_low`` / ``_high``, the 95% interval over
    test cells of the seed mean, and ``delta_low`` / ``delta_high``, the paired interval of Δ (the same
    resampled cells scored clean and perturbed)."""
    keys = ["backbone", "probe", "perturbation", "sigma"]
    wide = (
        results[results["metric"].isin([MAIN_METRIC, "accuracy"])]
        .pivot_table(index=keys + ["seed"], columns="metric", values="value")
        .reset_index()
    )
    g = wide.groupby(keys, sort=False)
    s = g.agg(
        macro_f1=(MAIN_METRIC, "mean"),
        macro_f1_std=(MAIN_METRIC, "std"),
        accuracy=("accuracy", "mean"),
        n_seeds=("seed", "nunique"),
    ).reset_index()
    s["macro_f1_std"] = s["macro_f1_std"].fillna(0.0)
    clean = s[s["perturbation"] == "clean"]
    parts = []
    for fam in families:
        parts.append(clean.assign(perturbation=fam))
        parts.append(s[s["perturbation"] == fam])
    out = pd.concat(parts, ignore_index=True)
    base = clean.set_index(["backbone", "probe"])["macro_f1"]
    out["delta_macro_f1"] = out["macro_f1"].to_numpy() - base.loc[list(zip(out["backbone"], out["probe"]))].to_numpy()
    if replicates:
        bounds = [_bounds(replicates, r) for r in out[["perturbation", "sigma", "backbone", "probe"]].itertuples(False)]
        out["macro_f1_low"], out["macro_f1_high"], out["delta_low"], out["delta_high"] = map(list, zip(*bounds))
    return out.sort_values(["backbone", "probe", "perturbation", "sigma"], kind="stable").reset_index(drop=True)


def _bounds(replicates: dict, row: tuple) -> tuple[float, float, float, float]:
    """Interval of the seed mean of macro-F1 and of its Δ against clean (clean's own Δ: 0, no interval)."""
    fam, sigma, backbone, probe = row
    clean = ("clean", 0.0, backbone, probe, MAIN_METRIC)
    own = clean if sigma == 0 else (fam, sigma, backbone, probe, MAIN_METRIC)
    low, high = seed_mean_interval(replicates, own)
    if sigma == 0 or own not in replicates or clean not in replicates:
        return low, high, np.nan, np.nan
    diffs = {("d",): [p - c for p, c in zip(replicates[own], replicates[clean])]}
    return (low, high, *seed_mean_interval(diffs, ("d",)))


def slope_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Drop slope of mean macro-F1 per unit of log2(1 + σ) for each backbone x probe x perturbation."""
    rows = []
    for (b, p, fam), g in summary.groupby(["backbone", "probe", "perturbation"], sort=False):
        worst = g.loc[g["sigma"].idxmax()]
        rows.append(
            dict(
                backbone=b,
                probe=p,
                perturbation=fam,
                slope=drop_slope(g["sigma"], g["macro_f1"]),
                clean_macro_f1=float(g.loc[g["sigma"] == 0, "macro_f1"].iat[0]),
                max_sigma=float(worst["sigma"]),
                delta_at_max_sigma=float(worst["delta_macro_f1"]),
                n_points=len(g),
            )
        )
    return pd.DataFrame(rows)


def panels(res: RobustnessResult) -> list[Panel]:
    """Macro-F1 (Δ vs clean) per σ and the drop slope, per backbone x probe x perturbation."""
    s = res.summary
    sigmas = sorted(s["sigma"].unique())
    cols = [Col(c, "left", no_wrap=True) for c in ("backbone", "probe", "perturbation")]
    cols += [Col(f"σ={v:g}") for v in sigmas] + [Col("slope / log2(1+σ)", style="bold")]
    rows = []
    for (b, p, fam), g in s.groupby(["backbone", "probe", "perturbation"], sort=False):
        by = {r.sigma: r for r in g.itertuples()}
        cells = [
            (
                "-"
                if (r := by.get(v)) is None
                else f"{r.macro_f1:.3f}" + ("" if v == 0 else f" ({r.delta_macro_f1:+.3f})")
            )
            for v in sigmas
        ]
        sl = res.slopes[(res.slopes.backbone == b) & (res.slopes.probe == p) & (res.slopes.perturbation == fam)]
        rows.append([b, p, fam, *cells, f"{sl['slope'].iat[0]:+.3f}"])
    out = [Panel(f"{res.name}: macro-F1 (Δ vs clean), probes trained on clean features", cols, rows)]
    if res.compare is not None and len(res.compare):
        c = res.compare[res.compare["seed"] == res.compare["seed"].iloc[0]]
        c = c.assign(
            fit_a=c["backbone"]
            + " · "
            + c["probe"]
            + " · "
            + c["perturbation_a"]
            + " σ="
            + c["sigma_a"].map("{:g}".format),
            fit_b=c["perturbation_b"] + " σ=" + c["sigma_b"].map("{:g}".format),
        )
        out += compare_panel(c, ["fit"], f"seed {c['seed'].iloc[0]}")
    return out
