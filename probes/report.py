"""Tables, files, plots and printed summaries of probe studies."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from .metrics import CLASS_METRIC, MAIN_METRIC

_METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}
CURVE_KEYS = ["backbone", "feature_key", "pool", "probe", "test_domain", "in_domain"]
_PRINTED = [("accuracy", "acc"), ("balanced_accuracy", "bal. acc"), ("macro_precision", "macro P"),
            ("macro_recall", "macro R"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1")]


# -- tables -------------------------------------------------------------------------------------
def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (sample std; 0 with one seed) over seeds per curve x limit x metric x class."""
    keys = CURVE_KEYS + ["limit", "metric", "class"]
    g = results.groupby(keys, dropna=False, sort=False)
    out = g.agg(
        mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"),
        n_train=("n_train", "mean"), n_test=("n_test", "mean"), n_classes=("n_classes", "max"),
        seconds=("seconds", "mean"), exceeds_data=("exceeds_data", "any"),
    ).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def limit_reaching(curves: pd.DataFrame, fraction: float = 0.95, metric: str = MAIN_METRIC) -> pd.DataFrame:
    """Per curve: its best mean score and the smallest limit whose mean reaches ``fraction`` of it."""
    rows = []
    main = curves[(curves["metric"] == metric) & (curves["class"] == "")]
    for key, c in main.groupby(CURVE_KEYS, sort=False):
        c = c.sort_values("limit")
        best = c.loc[c["mean"].idxmax()]
        reach = c[c["mean"] >= fraction * best["mean"]].iloc[0]
        rows.append({
            **dict(zip(CURVE_KEYS, key)), "metric": metric, "best_limit": int(best["limit"]),
            "best_mean": best["mean"], "best_std": best["std"], "fraction": fraction,
            "threshold": fraction * best["mean"], "limit_reaching": int(reach["limit"]),
            "mean_at_limit_reaching": reach["mean"], "std_at_limit_reaching": reach["std"],
            "n_seeds": int(c["n_seeds"].max()),
        })
    return pd.DataFrame(rows)


def eval_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per backbone x probe: mean and std of every aggregate metric."""
    main = curves[curves["class"] == ""]
    wide = main.pivot_table(index=CURVE_KEYS, columns="metric", values=["mean", "std"], sort=False)
    wide.columns = [f"{m}_{stat}" for stat, m in wide.columns]
    extra = main.groupby(CURVE_KEYS, sort=False)[["n_seeds", "n_train", "n_test", "n_classes", "seconds"]].first()
    return wide.join(extra).reset_index()


def domain_gaps(curves: pd.DataFrame, metric: str = MAIN_METRIC) -> pd.DataFrame:
    """Domain studies: per backbone x probe x limit x out-of-domain test set, the in-domain and
    out-of-domain mean ``metric`` side by side and ``gap = in_domain - out_of_domain``."""
    main = curves[(curves["metric"] == metric) & (curves["class"] == "")]
    keys = ["backbone", "feature_key", "pool", "probe", "limit"]
    cols = keys + ["mean", "std", "n_test"]
    ind = main[main["in_domain"]][cols + ["test_domain"]].rename(
        columns={"mean": "in_domain_mean", "std": "in_domain_std", "n_test": "in_domain_n_test",
                 "test_domain": "train_domain"})
    ood = main[~main["in_domain"]][cols + ["test_domain"]].rename(
        columns={"mean": "out_of_domain_mean", "std": "out_of_domain_std", "n_test": "out_of_domain_n_test"})
    both = ind.merge(ood, on=keys, how="inner")
    both["gap"] = both["in_domain_mean"] - both["out_of_domain_mean"]
    both.insert(len(keys), "metric", metric)
    return both.reset_index(drop=True)


# -- files --------------------------------------------------------------------------------------
def write_outputs(result) -> dict[str, Path]:
    """Write every table, the plots and ``study.json`` under ``result.out``; returns the paths."""
    out = Path(result.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results.csv": out / "results.csv", "results.parquet": out / "results.parquet",
        "curves.csv": out / "curves.csv", "summary.csv": out / "summary.csv",
        "exclusions.csv": out / "exclusions.csv", "confusion.csv": out / "confusion.csv",
        "confusion.json": out / "confusion.json", "study.json": out / "study.json",
    }
    result.results.to_csv(files["results.csv"], index=False)
    result.results.to_parquet(files["results.parquet"], index=False)
    result.curves.to_csv(files["curves.csv"], index=False)
    result.summary.to_csv(files["summary.csv"], index=False)
    result.exclusions.to_csv(files["exclusions.csv"], index=False)
    result.confusion.to_csv(files["confusion.csv"], index=False)
    if getattr(result, "fits", None) is not None:
        files["fits.csv"] = out / "fits.csv"
        result.fits.to_csv(files["fits.csv"], index=False)
    files["confusion.json"].write_text(json.dumps(confusion_matrices(result.confusion), indent=1))
    if getattr(result, "domains", None) is not None:
        files["domains.csv"] = out / "domains.csv"
        result.domains.to_csv(files["domains.csv"], index=False)
    files["study.json"].write_text(json.dumps({
        "kind": result.kind, "name": result.name, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "params": result.params, "notes": result.notes, "files": sorted(files),
    }, indent=2, default=str))
    if result.kind == "scale":
        files["scaling.png"] = plot_scaling(result.curves, out / "scaling.png", result.summary,
                                            title=f"{result.params['dataset']} · {result.params['split']} split")
    else:
        for (backbone, probe, dom), conf in result.confusion.groupby(["backbone", "probe", "test_domain"], sort=False):
            name = f"confusion-{_slug(backbone)}-{_slug(probe)}{'-' + _slug(dom) if dom else ''}.png"
            files[name] = plot_confusion(conf, out / name, title=f"{backbone} · {probe}" + (f" · tested on {dom}" if dom else ""))
    return files


def confusion_matrices(confusion: pd.DataFrame) -> list[dict]:
    """The long confusion table as one matrix per fit (rows: true class, columns: predicted)."""
    out = []
    keys = ["backbone", "probe", "limit", "seed", "test_domain"]
    for (b, p, lim, s, dom), c in confusion.groupby(keys, sort=False, dropna=False):
        labels = list(dict.fromkeys(c["true"]))
        m = c.pivot(index="true", columns="pred", values="count").reindex(index=labels, columns=labels)
        out.append({"backbone": b, "probe": p, "limit": None if pd.isna(lim) else int(lim), "seed": int(s),
                    "test_domain": dom, "labels": labels, "matrix": m.to_numpy().astype(int).tolist()})
    return out


# -- plots --------------------------------------------------------------------------------------
def plot_scaling(curves: pd.DataFrame, path: Path, summary: pd.DataFrame | None = None, *,
                 metric: str = MAIN_METRIC, title: str = "") -> Path:
    """Mean ``metric`` against cells per class (log2 x), one line per backbone x probe, ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = curves[(curves["metric"] == metric) & (curves["class"] == "")].sort_values("limit")
    probes = list(dict.fromkeys(main["probe"]))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for k, ((b, p, dom), c) in enumerate(main.groupby(["backbone", "probe", "test_domain"], sort=False)):
        j = probes.index(p)  # colour per curve, line style and marker per probe
        x, y, s = c["limit"].to_numpy(float), c["mean"].to_numpy(float), c["std"].to_numpy(float)
        color = colors(k % 10)
        label = f"{b} · {p}" + (f" · on {dom}" if dom else "")
        ax.plot(x, y, styles[j % 4], marker=markers[j % 7], color=color, lw=1.8, ms=5, label=label)
        ax.fill_between(x, y - s, y + s, color=color, alpha=0.15, lw=0)
        if summary is not None and len(summary):
            r = summary[(summary["backbone"] == b) & (summary["probe"] == p) & (summary["test_domain"] == dom)]
            if len(r):
                lim = r["limit_reaching"].iat[0]
                ax.plot([lim], [r["mean_at_limit_reaching"].iat[0]], marker="*", ms=13, color=color,
                        markeredgecolor="black", markeredgewidth=0.6, ls="none", zorder=5)
    limits = sorted(main["limit"].dropna().astype(int).unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(limits)
    ax.set_xticklabels([str(v) for v in limits])
    ax.minorticks_off()
    over = main.loc[main["exceeds_data"], "limit"]
    if len(over):
        ax.axvspan(float(over.min()) / 2**0.25, max(limits) * 2**0.25, color="0.85", alpha=0.5, lw=0,
                   label="limit ≥ largest class (full data)")
    n_seeds = int(main["n_seeds"].max()) if len(main) else 0
    ax.set_xlabel("cells per class (FlagLimit)")
    ax.set_ylabel(f"{_METRIC_NAMES.get(metric, metric)}  (mean ± std, {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    ax.set_title(title + ("   ★ = smallest limit reaching 95% of the curve's best" if summary is not None else ""),
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_confusion(conf: pd.DataFrame, path: Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (summed over seeds), counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(conf["true"]))
    m = conf.groupby(["true", "pred"])["count"].sum().unstack().reindex(index=labels, columns=labels).fillna(0)
    counts = m.to_numpy()
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)), dpi=120)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# -- console ------------------------------------------------------------------------------------
@contextlib.contextmanager
def progress(total: int, quiet: bool) -> Iterator[Callable[[str], None]]:
    """A transient progress bar on stderr; yields ``advance(description)``."""
    if quiet:
        yield lambda desc: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fitting", total=total)
        started = [False]

        def advance(desc: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=desc)

        yield advance
        bar.update(task, completed=total)


def print_result(result, console=None) -> None:
    """The end-of-study summary: a rich table, the notes and where the files went."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 160)  # logs and pipes: keep table rows on one line
    if result.kind == "scale":
        _print_scale(result, console)
    else:
        _print_evaluate(result, console)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    if result.out is not None:
        console.print(f"wrote [bold]{result.out}/[/] ({', '.join(sorted(result.files))})")


def _print_scale(result, console) -> None:
    from rich.table import Table

    c = result.curves
    main = c[(c["metric"] == MAIN_METRIC) & (c["class"] == "")]
    limits = sorted(main["limit"].astype(int).unique())
    over = set(main.loc[main["exceeds_data"], "limit"].astype(int))
    n_seeds = int(main["n_seeds"].max())
    p = result.params
    t = Table(title=f"{result.name}: macro-F1, mean ± std over {n_seeds} seed(s), {p['split']} split, "
                    f"{p['dataset']} ({p['pool']})")
    t.add_column("backbone", no_wrap=True)
    t.add_column("probe", no_wrap=True)
    domains = bool((main["test_domain"] != "").any())
    if domains:
        t.add_column("tested on", no_wrap=True)
    for lim in limits:
        t.add_column(f"{lim}{'*' if lim in over else ''}", justify="right")
    t.add_column(f"{result.params.get('fraction', 0.95):.0%} at", justify="right", style="bold")
    for (b, pr, dom), g in main.groupby(["backbone", "probe", "test_domain"], sort=False):
        by = {int(r.limit): r for r in g.itertuples()}
        s = result.summary[(result.summary["backbone"] == b) & (result.summary["probe"] == pr)
                           & (result.summary["test_domain"] == dom)]
        best = int(s["best_limit"].iat[0]) if len(s) else None
        cells = []
        for lim in limits:
            r = by.get(lim)
            txt = "-" if r is None else f"{r.mean:.3f}±{r.std:.3f}"
            cells.append(f"[bold]{txt}[/]" if lim == best else txt)
        where = [f"{dom} ({'in' if g['in_domain'].iat[0] else 'out of'} domain)"] if domains else []
        t.add_row(b, pr, *where, *cells, str(int(s["limit_reaching"].iat[0])) if len(s) else "-")
    console.print(t)
    _print_domains(result, console)
    if over:
        console.print("* limit ≥ the largest class: the set is the full data (not capped)")


def _print_evaluate(result, console) -> None:
    from rich.table import Table

    s = result.summary
    n_seeds = int(s["n_seeds"].max())
    t = Table(title=f"{result.name}: one fit on the full training split, {result.params['split']} split, "
                    f"{result.params['dataset']} ({result.params['pool']})"
                    + (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""))
    domains = bool((s["test_domain"] != "").any())
    for col in ("backbone", "probe", *(["tested on"] if domains else []), "train", "test", "classes"):
        t.add_column(col, justify="left" if col in ("backbone", "probe") else "right", no_wrap=col in ("backbone", "probe"))
    for _, label in _PRINTED:
        t.add_column(label, justify="right")
    t.add_column("s/fit", justify="right")
    for r in s.to_dict("records"):
        vals = [f"{r[f'{m}_mean']:.3f}" + (f"±{r[f'{m}_std']:.3f}" if n_seeds > 1 else "") for m, _ in _PRINTED]
        where = [f"{r['test_domain']} ({'in' if r['in_domain'] else 'out of'} domain)"] if domains else []
        t.add_row(r["backbone"], r["probe"], *where, f"{r['n_train']:.0f}", f"{r['n_test']:.0f}", f"{r['n_classes']:.0f}",
                  *vals, f"{r['seconds']:.2f}")
    console.print(t)
    _print_domains(result, console)
    pc = result.curves[(result.curves["metric"] == CLASS_METRIC) & result.curves["in_domain"]]
    if len(pc):
        wide = pc.pivot_table(index="class", columns=["backbone", "probe"], values="mean", sort=False)
        t2 = Table(title="per-class F1")
        t2.add_column("class")
        for b, pr in wide.columns:
            t2.add_column(f"{b} · {pr}", justify="right")
        for cls, row in wide.iterrows():
            t2.add_row(str(cls), *[f"{v:.3f}" for v in row])
        console.print(t2)


def _print_domains(result, console) -> None:
    d = getattr(result, "domains", None)
    if d is None or not len(d):
        return
    from rich.table import Table

    t = Table(title="domain shift: macro-F1 in the training domain vs unseen domains (mean over seeds)")
    for col in ("backbone", "probe", "limit", "trained on", "in-domain", "tested on", "out-of-domain", "gap"):
        t.add_column(col, justify="left" if col in ("backbone", "probe", "trained on", "tested on") else "right")
    for r in d.itertuples():
        t.add_row(r.backbone, r.probe, "all" if pd.isna(r.limit) else str(int(r.limit)), r.train_domain,
                  f"{r.in_domain_mean:.3f}", r.test_domain, f"{r.out_of_domain_mean:.3f}", f"{r.gap:+.3f}")
    console.print(t)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in s)
