"""``selective``: abstain on the least confident cells (they go to a human) and see what it buys.

Skeleton steps: inputs (cells, probes with probabilities, confidences, the target accuracy, seeds) ->
per seed the uncapped split, its training cells cut into a fit part and a validation part
(:func:`probes.engine.proba_fits.held_out_splits`) -> fits on the fit part (the probes, plus the voting heads
when a confidence is ``agreement``; :func:`probes.engine.proba_fits.fit_probas`) -> per fit x confidence: the
risk-coverage curve, AURC and E-AURC, accuracy and macro / weighted P/R/F1 at fixed coverages (test
cells), the threshold reaching the target accuracy **on the validation part** and what it keeps **on
the test cells**, the abstention rate per true class -> ``results``, ``summary``, ``thresholds``,
``abstention``, ``curves``, ``fits``, ``exclusions`` tables, ``risk_coverage.png``, console tables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.options import UNSET
from probes.engine.options import StudyOptions, study_options
from probes.engine.proba_fits import (
    VAL_FRACTION,
    FittedProba,
    base_row,
    fit_probas,
    held_out_splits,
    pm,
    require_probabilities,
    seed_summary,
)
from probes.engine.runtime import study_runtime
from probes.engine.skeleton import Saves, check_probes, finish, fit_table, study_name
from probes.errors import ProbeError
from probes.features.cells import open_cells, parse_names
from probes.metrics import score
from probes.reporting.console import Col, Panel
from probes.reporting.decision_plots import plot_risk_coverage
from probes.reporting.tables import study_document
from probes.sampling import parse_seeds
from probes.stats import bootstrap_kept
from probes.studies.confidence import (
    CONFIDENCES,
    COVERAGES,
    MIN_AGREEMENT_VOTERS,
    abstention_by_class,
    aurc,
    check_target,
    choose_threshold,
    e_aurc,
    oracle_aurc,
    risk_on_grid,
    scores_at_coverages,
)
from probes.studies.confidence import confidence as confidence_of

AGREE_WITH = ("heads", "backbones")
GRID = np.round(np.linspace(0.01, 1.0, 100), 2)
KEYS = ["backbone", "feature_key", "pool", "probe", "confidence"]


@dataclass
class SelectiveResult(Saves):
    """Tidy results and the tables derived from them; also written under ``out``."""

    name: str
    params: dict[str, Any]
    results: pd.DataFrame  # one row per fit x confidence x (coverage) x metric: aurc, e_aurc, scores at coverages
    summary: pd.DataFrame  # mean / std over seeds of every result
    thresholds: pd.DataFrame  # per fit x confidence: the validation threshold and what it keeps on test
    abstention: pd.DataFrame  # per fit x confidence x true class: test cells sent to a human at the threshold
    curves: pd.DataFrame  # risk on a coverage grid (0.01..1) per fit x confidence
    fits: pd.DataFrame
    exclusions: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def voters(
    probe_list: Sequence[str], backbones: Sequence[str], agree_with: str, heads: str | Sequence[str]
) -> tuple[list[str], dict[tuple[str, str], list[tuple[str, str]]]]:
    """The probes to fit, and for each (backbone, probe) the (backbone, probe) fits it is compared with."""
    if agree_with not in AGREE_WITH:
        raise ProbeError(f"unknown agree_with {agree_with!r}; one of {', '.join(AGREE_WITH)}")
    if agree_with == "backbones":
        if len(backbones) < MIN_AGREEMENT_VOTERS:
            raise ProbeError(
                f"agreement between backbones needs at least {MIN_AGREEMENT_VOTERS} backbones "
                f"(--model a,b,c), got {len(backbones)}"
            )
        return list(probe_list), {(b, p): [(o, p) for o in backbones if o != b] for b in backbones for p in probe_list}
    head_list = check_probes(heads)
    fit_list = list(dict.fromkeys([*probe_list, *head_list]))
    others: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for p in probe_list:
        group = [h for h in dict.fromkeys([p, *head_list]) if h != p]
        if len(group) + 1 < MIN_AGREEMENT_VOTERS:
            raise ProbeError(
                f"agreement needs at least {MIN_AGREEMENT_VOTERS} heads (the probe '{p}' and "
                f"{MIN_AGREEMENT_VOTERS - 1} others, --heads), got {len(group) + 1}: {[p, *group]}"
            )
        for b in backbones:
            others[(b, p)] = [(b, h) for h in group]
    return fit_list, others


def selective(
    store: str | os.PathLike | Any,
    model: str | Sequence[str],
    *,
    probes: str | Sequence[str] = "logistic",
    confidence: str | Sequence[str] = "msp,margin,entropy",
    target_accuracy: float = 0.995,
    agree_with: str = "heads",
    heads: str | Sequence[str] = "logistic,mlp,cosine",
    coverages: str | Sequence[float] = COVERAGES,
    seeds: int | str | Sequence[int] = 1,
    val_fraction: float = VAL_FRACTION,
    make_probe: Callable[..., Any] | None = None,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    options: StudyOptions | None = None,
    **more: Any,
) -> SelectiveResult:
    """Risk-coverage of each probe under each confidence (``msp``, ``margin``, ``entropy``, ``agreement``).

    ``confidence``: a comma list of :data:`probes.studies.confidence.CONFIDENCES`.
    ``agreement``: the fraction of voters predicting what the probe predicts; the voters are the probe
    and ``heads`` on the same backbone (``agree_with="heads"``) or the same probe on every backbone of
    ``model`` (``agree_with="backbones"``); at least three voters. ``coverages``: where accuracy and F1
    of the most confident cells are reported (a comma list or floats). ``target_accuracy`` in (0, 1]: the
    threshold is the lowest confidence whose kept **validation** cells reach it (the validation part
    is a stratified ``val_fraction`` of the training cells, which the probe is not fitted on); its test
    coverage and accuracy are reported, never used to choose. Writes ``results.csv/.parquet``,
    ``summary.csv``, ``thresholds.csv``, ``abstention.csv``, ``curves.csv``, ``fits.csv``,
    ``exclusions.csv``, ``risk_coverage.png`` and ``study.json``.
    ``scheduler`` (``tcp://host:port`` or ``local:N``) runs each fit as a Dask task, with identical results;
    ``out_of_core`` / ``max_memory`` read features in store chunks when they exceed the budget
    (:mod:`probes.engine.runtime`).
    """
    opts, _ = study_options(options, more, out=out, device=device)
    opts.refuse(("train_domain", "test_domain"), "selective")
    split = opts.split_or("stratified")
    val = opts.val
    dataset = opts.dataset
    pool = opts.pool
    out = opts.out
    device = opts.device
    test_size = opts.test_size
    quiet = opts.quiet

    with study_runtime(**opts.runtime()):
        kinds = parse_names(confidence)
        unknown = [k for k in kinds if k not in CONFIDENCES]
        if not kinds or unknown:
            raise ProbeError(
                f"unknown confidence(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIDENCES)}"
            )
        try:
            target = check_target(target_accuracy)
        except (TypeError, ValueError) as e:
            raise ProbeError(str(e)) from None
        try:
            cov_list = [float(c) for c in (coverages.split(",") if isinstance(coverages, str) else coverages)]
        except ValueError:
            raise ProbeError(
                f"bad coverages {coverages!r}: a comma list of fractions, e.g. 1,0.9,0.8,0.67,0.5"
            ) from None
        if not cov_list or any(not 0 < c <= 1 for c in cov_list):
            raise ProbeError(f"coverages must lie in (0, 1], got {coverages}")
        seed_list = parse_seeds(seeds)
        cells = open_cells(store, model, dataset=dataset, pool=pool)
        probe_list = check_probes(probes)
        fit_list, others = (
            voters(probe_list, cells.backbones, agree_with, heads) if "agreement" in kinds else (probe_list, {})
        )
        require_probabilities(fit_list, make_probe, what="selective prediction")
        name = study_name("selective", cells.backbones + probe_list, out)
        params: dict[str, Any] = dict(
            store=str(cells.store_url),
            dataset=cells.dataset,
            model=cells.backbones,
            probes=probe_list,
            confidence=kinds,
            target_accuracy=target,
            coverages=cov_list,
            seeds=seed_list,
            val_fraction=val_fraction,
            split=split,
            val=val,
            pool=cells.pool,
            device=device,
            test_size=test_size,
            **(
                {"agree_with": agree_with, "voters": fit_list if agree_with == "heads" else cells.backbones}
                if "agreement" in kinds
                else {}
            ),
        )
        folder = opts.folder(name)
        held, notes, exclusions = held_out_splits(
            cells, seed_list, split=split, val=val, test_size=test_size, val_fraction=val_fraction
        )
        fitted: dict[tuple[str, str, int], FittedProba] = {}
        fit_rows = []
        for done in fit_probas(cells, held, fit_list, device=device, quiet=quiet, make_probe=make_probe):
            fitted[(done.job.backbone, done.job.probe, done.job.seed)] = done
            fit_rows.append(done.fit_row())
        rows, thresholds, abstention, curves = [], [], [], []
        for (b, p, seed), done in fitted.items():
            if p not in probe_list:
                continue
            h, base = done.job.tag, base_row(name, cells, done, split)
            y = {"val": cells.labels[h.val], "test": cells.labels[h.test]}
            pred = {"val": done.predictions[0], "test": done.predictions[1]}
            proba = {"val": done.probas[0], "test": done.probas[1]}
            for kind in kinds:
                conf = {}
                for part, i in (("val", 0), ("test", 1)):
                    voted = [fitted[(ob, op, seed)].predictions[i] for ob, op in others.get((b, p), [])]
                    conf[part] = confidence_of(kind, proba[part], pred[part], voted)
                correct = {part: pred[part] == y[part] for part in ("val", "test")}
                key = {**base, "confidence": kind}
                for metric, v in (
                    ("aurc", aurc(conf["test"], correct["test"])),
                    ("e_aurc", e_aurc(conf["test"], correct["test"])),
                    ("oracle_aurc", oracle_aurc(correct["test"])),
                ):
                    rows.append({**key, "coverage": math.nan, "metric": metric, "class": "", "value": v})
                at = scores_at_coverages(y["test"], pred["test"], conf["test"], h.classes, cov_list)
                rows += [{**key, **r, "class": ""} for r in at.to_dict("records")]
                curves += [
                    {
                        **{k: key[k] for k in ("backbone", "probe", "seed", "confidence")},
                        "coverage": float(c),
                        "risk": float(r),
                    }
                    for c, r in zip(GRID, risk_on_grid(conf["test"], correct["test"], GRID))
                ]
                chosen = choose_threshold(conf["val"], correct["val"], target)
                kept = conf["test"] >= chosen["threshold"]
                boot = bootstrap_kept(y["test"], kept, correct["test"], seed=seed)
                thresholds.append(
                    {
                        **key,
                        "target_accuracy": target,
                        **chosen,
                        **_kept_scores(y["test"], pred["test"], kept, h.classes, target),
                        **{f"test_{m}_{end}": getattr(boot[m], end) for m in boot for end in ("low", "high")},
                    }
                )
                ab = abstention_by_class(y["test"], kept, h.classes)
                abstention += [
                    {**{k: key[k] for k in ("backbone", "probe", "seed", "confidence")}, **r}
                    for r in ab.to_dict("records")
                ]
        results = pd.DataFrame(rows)
        summary = seed_summary(results, [*KEYS, "coverage"])
        thr, ab, cur = pd.DataFrame(thresholds), pd.DataFrame(abstention), pd.DataFrame(curves)
        fits, fit_notes = fit_table(fit_rows)
        notes = notes + fit_notes + _threshold_notes(thr, target)
        res = SelectiveResult(name, params, results, summary, thr, ab, cur, fits, exclusions, notes, out=folder)
        grid = (
            cur.groupby(["backbone", "probe", "confidence", "coverage"], sort=False)["risk"]
            .agg(mean="mean", std="std")
            .reset_index()
            .fillna({"std": 0.0})
        )
        chosen_mean = threshold_summary(thr)
        title = f"{cells.dataset} · risk-coverage on test cells (mean ± std over {len(seed_list)} seed(s))"
        finish(
            res,
            tables={
                "results.csv": results,
                "results.parquet": results,
                "summary.csv": summary,
                "thresholds.csv": thr,
                "abstention.csv": ab,
                "curves.csv": cur,
                "fits.csv": fits,
                "exclusions.csv": exclusions,
            },
            plots={
                "risk_coverage.png": lambda path: plot_risk_coverage(
                    grid, path, chosen=chosen_mean, target_accuracy=target, title=title
                )
            },
            documents={"study.json": lambda names: study_document("selective", name, params, res.notes, names)},
            panels=panels(res, chosen_mean),
            show=opts.printing(),
        )
        return res


def _kept_scores(
    y_true: np.ndarray, y_pred: np.ndarray, kept: np.ndarray, classes: Sequence[str], target: float
) -> dict[str, Any]:
    """What the threshold keeps on the test cells: coverage, accuracy, macro / weighted F1, target met."""
    out: dict[str, Any] = {"n_test": int(len(kept)), "n_kept": int(kept.sum()), "test_coverage": float(kept.mean())}
    if kept.any():
        present = [c for c in classes if c in set(y_true[kept].tolist())]
        sc = score(y_true[kept], y_pred[kept], present).values
        out.update(
            test_accuracy=sc["accuracy"],
            test_macro_f1=sc["macro_f1"],
            test_weighted_f1=sc["weighted_f1"],
            met_on_test=bool(sc["accuracy"] >= target - 1e-12),
        )
    else:
        out.update(test_accuracy=math.nan, test_macro_f1=math.nan, test_weighted_f1=math.nan, met_on_test=False)
    return out


def threshold_summary(thr: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the threshold's validation and test coverage and accuracy."""
    cols = [
        "threshold",
        "val_coverage",
        "val_accuracy",
        "test_coverage",
        "test_accuracy",
        "test_macro_f1",
        "test_weighted_f1",
    ]
    g = thr.replace([np.inf], np.nan).groupby(["backbone", "probe", "confidence"], sort=False)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out["n_seeds"] = g["seed"].nunique()
    out["met_on_test"] = g["met_on_test"].sum()
    if "test_accuracy_low" in thr:  # one seed: its 95% interval over test cells (several: see thresholds.csv)
        for c in ("test_coverage_low", "test_coverage_high", "test_accuracy_low", "test_accuracy_high"):
            out[c] = g[c].first().where(out["n_seeds"] == 1)
    return out.reset_index().fillna({f"{c}_std": 0.0 for c in cols})


def _threshold_notes(thr: pd.DataFrame, target: float) -> list[str]:
    none = thr[~np.isfinite(thr["threshold"])]
    if not len(none):
        return []
    which = sorted({f"{b} · {p} · {c}" for b, p, c in zip(none["backbone"], none["probe"], none["confidence"])})
    return [
        f"{len(none)} of {len(thr)} fit x confidence runs reach accuracy {target:g} at no threshold on the "
        f"validation part: they abstain on every test cell ({', '.join(which)})"
    ]


def panels(res: SelectiveResult, chosen: pd.DataFrame) -> list[Panel]:
    """AURC / E-AURC and the threshold's coverage; accuracy / macro-F1 at each coverage; abstention per class."""
    s = res.summary
    n_seeds = int(s["n_seeds"].max())
    target = res.params["target_accuracy"]
    head = [Col("backbone", "left", no_wrap=True), Col("probe", "left", no_wrap=True), Col("confidence", "left")]
    rows = []
    for r in chosen.to_dict("records"):
        g = s[(s["backbone"] == r["backbone"]) & (s["probe"] == r["probe"]) & (s["confidence"] == r["confidence"])]
        v = {m: (a, d) for m, a, d in zip(g["metric"], g["mean"], g["std"]) if m in ("aurc", "e_aurc")}
        rows.append(
            [
                r["backbone"],
                r["probe"],
                r["confidence"],
                pm(*v["aurc"], n_seeds),
                pm(*v["e_aurc"], n_seeds),
                pm(r["val_coverage_mean"], r["val_coverage_std"], n_seeds, 2),
                pm(r["test_coverage_mean"], r["test_coverage_std"], n_seeds, 2),
                pm(r["test_accuracy_mean"], r["test_accuracy_std"], n_seeds),
                pm(r["test_macro_f1_mean"], r["test_macro_f1_std"], n_seeds),
                f"{int(r['met_on_test'])}/{int(r['n_seeds'])}",
            ]
        )
    cols = head + [Col(c) for c in ("AURC", "E-AURC", "val cov.", "test cov.", "test acc", "test macro F1", "met")]
    title = f"{res.name}: threshold reaching accuracy {target:g} on the validation part, applied to the test cells" + (
        f"; mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""
    )
    out = [Panel(title, cols, rows)]
    at = s[s["metric"].isin(["accuracy", "macro_f1"]) & s["coverage"].notna()]
    covs = sorted(at["coverage"].unique(), reverse=True)
    rows2 = []
    for (b, p, c), g in at.groupby(["backbone", "probe", "confidence"], sort=False):
        v = {(m, cv): mean for m, cv, mean in zip(g["metric"], g["coverage"], g["mean"])}
        rows2.append([b, p, c, *[f"{v[('accuracy', cv)]:.3f} / {v[('macro_f1', cv)]:.3f}" for cv in covs]])
    out.append(
        Panel(
            "test accuracy / macro-F1 of the most confident cells, by coverage (weighted F1 in the tables)",
            head + [Col(f"{cv:.0%}") for cv in covs],
            rows2,
        )
    )
    ab = res.abstention.groupby(["backbone", "probe", "confidence", "class"], sort=False)["abstention_rate"].mean()
    wide = ab.unstack(["backbone", "probe", "confidence"])
    if len(wide.columns) <= 8:
        out.append(
            Panel(
                "test cells sent to a human at the threshold, per true class (abstention rate)",
                [Col("class", "left")]
                + [
                    Col(f"{b} · {p} · {c}" if len(set(res.params["model"])) > 1 else f"{p} · {c}")
                    for b, p, c in wide.columns
                ],
                [[str(k), *[f"{x:.2f}" for x in row]] for k, row in wide.iterrows()],
            )
        )
    return out
