"""The label audit's orchestration: :func:`audit` (a store) and :func:`audit_arrays` (in-memory features).

Skeleton steps: inputs (cells of every backbone, options) -> folds per seed (:mod:`.folds`) -> a plan
of one out-of-fold model per backbone x probe x seed (and the joint member per seed: a plain logistic
on every backbone side by side), each read from the cache (:mod:`.cache`) or fitted -> evidence and
score per cell (:mod:`.evidence`) -> outputs and console (:mod:`.outputs`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embedcache.options import UNSET, given, split_options
from probes.engine.dask_fits import current_scheduler
from probes.engine.options import SPLIT_OPTIONS, StudyOptions
from probes.engine.skeleton import Saves, study_name
from probes.engine.threads import limit_threads
from probes.errors import ProbeError
from probes.features.cells import open_cells, parse_names
from probes.features.chunked import is_chunked, side_by_side
from probes.features.policy import current_policy
from probes.reporting.console import progress
from probes.sampling import parse_seeds, sort_labels
from probes.studies.audit.cache import (
    KEY_COLUMNS,
    adopt_legacy,
    cache_to_read,
    check_writable,
    default_cache,
    legacy_cache,
    read_oof_cache,
    write_cache,
)
from probes.studies.audit.cell_evidence import (
    as_ranking,
    evidence,
    model_groups,
    neighbor_disagreement,
    why_columns,
)
from probes.studies.audit.folds import (
    OOF,
    feature_digest,
    label_digest,
    make_folds,
    oof_proba,
    probe_signature,
)
from probes.studies.audit.options import AuditOptions


@dataclass
class AuditResult(Saves):
    """What an audit found.

    ``table``: every cell ranked by score (rank 1 = most suspicious); its index is the cell's
    position in ``obs`` (the audited order, which the ``neighbors`` positions index).
    """

    table: pd.DataFrame
    oofs: list[OOF]
    classes: list[str]
    params: dict[str, Any]
    neighbors: dict[str, tuple[np.ndarray, np.ndarray]]  # backbone -> (positions (N, k), sims (N, k))
    obs: pd.DataFrame  # the audited cells (id, path, label, group ...) in feature order
    reused: int = 0  # models read from the cache
    computed: int = 0  # models fitted now
    fits: int = 0  # probe fits made now (computed x folds)
    out: Path | None = None
    files: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the audit could not do (e.g. write its cache)
    issues: Any = None  # probes.studies.audit.data_issues.DataIssues: duplicates, leaks, outliers (or None)
    issue_table: pd.DataFrame | None = None  # issues.csv: every issue audited, one row per cell
    map_page: str = ""  # with map_tab: the embedding map's page, shown in report.html's Map tab

    def suspects(self, top: int = 50) -> pd.DataFrame:
        """The ``top`` most suspicious cells."""
        return self.table.head(top)

    def proba(self) -> np.ndarray:
        """(M, N, C) out-of-fold probabilities of every model, cells in ``obs`` order."""
        return np.stack([o.proba for o in self.oofs])


# what the audit changes in a head's defaults: it ranks cells by their probabilities, so the logistic
# probe's C sweep picks by hold-out log-loss (a proper scoring rule), not by macro-F1 (a decision metric)
AUDIT_PROBE_PARAMS: dict[str, dict[str, Any]] = {"logistic": {"select": "log_loss"}, "linear": {"select": "log_loss"}}


def audit_probe(name: str, **kw: Any) -> Any:
    """:func:`probes.heads.make_probe` with the audit's defaults (:data:`AUDIT_PROBE_PARAMS`)."""
    from probes.heads import make_probe as heads_make_probe

    return heads_make_probe(name, **{**AUDIT_PROBE_PARAMS.get(name, {}), **kw})


# the joint member: a plain logistic regression on every backbone's features side by side
JOINT_PROBE = "joint-logistic"
NO_PROBES = "none"  # --probes none: no per-backbone probe, the joint member alone
JOINT_PROBE_PARAMS: dict[str, Any] = {"Cs": (1.0,)}
JOINT_SEPARATOR = "+"


def joint_probe(**kw: Any) -> Any:
    """The joint member's head: :class:`probes.heads.logistic.LogisticProbe` at ``C = 1`` (no sweep)."""
    from probes.heads import make_probe as heads_make_probe

    return heads_make_probe("logistic", **{**JOINT_PROBE_PARAMS, **kw})


def member_probe(make_probe: Callable[..., Any], name: str, **kw: Any) -> Any:
    """The head of one ensemble member: :func:`joint_probe` for :data:`JOINT_PROBE`, else ``make_probe(name)``."""
    return joint_probe(**kw) if name == JOINT_PROBE else make_probe(name, **kw)


def joint_digest(digests: Sequence[str]) -> str:
    """The feature digest of backbones side by side: one backbone's own, else a digest of theirs in order."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\x1f".join(digests).encode()).hexdigest()[:16]


def audit_arrays(
    features: dict[str, np.ndarray],
    labels: Sequence[str] | np.ndarray,
    *,
    ids: Sequence[str] | np.ndarray | None = None,
    groups: Sequence[str] | np.ndarray | None = None,
    paths: Sequence[str] | np.ndarray | None = None,
    feature_keys: dict[str, str] | None = None,
    pool: str = "cls",
    device: str = "auto",
    quiet: bool = True,
    options: AuditOptions | None = None,
    **overrides: Any,
) -> AuditResult:
    """The audit on in-memory features: ``features`` maps a backbone name to an (N, D) array.

    ``options`` (an :class:`AuditOptions`), or its fields as keywords (``probes=``, ``folds=``,
    ``seeds=``, ``folds_by=``, ``k=``, ``cache=``...), which override ``options``. ``pool`` names the pooling
    the features are (recorded), ``device`` where the probes fit, ``quiet`` hides the progress bar.
    """
    try:
        opt = AuditOptions.build(options, **overrides)
    except TypeError as e:
        raise ProbeError(f"audit_arrays: {e}") from None
    probes, folds, seeds, split, k = opt.probes, opt.folds, opt.seeds, opt.folds_by, opt.k
    cache, cache_lock, make_probe, threads = opt.cache, opt.cache_lock, opt.make_probe, opt.threads
    cache = None if cache is False or cache is True else cache  # True: the default, which has no file here
    from probes.heads import PROBES

    labels = np.asarray(labels, dtype=object).astype(str)
    n = len(labels)
    ids = np.asarray(ids if ids is not None else np.arange(n), dtype=object).astype(str)
    if len(ids) != n or (groups is not None and len(groups) != n) or (paths is not None and len(paths) != n):
        raise ProbeError(f"ids, groups and paths need one entry per label ({n})")
    if len(pd.unique(ids)) != n:
        raise ProbeError("cell ids must be unique")
    obs = pd.DataFrame(
        {
            "id": ids,
            "path": list(paths) if paths is not None else [""] * n,
            "label": labels,
            "group": list(groups) if groups is not None else [""] * n,
        }
    )
    if not features:
        raise ProbeError("no features to audit: name at least one backbone")
    for name, x in features.items():
        if np.ndim(x) != 2 or len(x) != n:
            raise ProbeError(f"features of '{name}' have shape {np.shape(x)}; need ({n}, D), one row per label")
    classes = sort_labels(labels)
    if len(classes) < 2:
        raise ProbeError(f"an audit needs at least two classes; the cells carry only {classes}")
    probe_list = [p for p in parse_names(probes) if p != NO_PROBES]
    if not probe_list and not opt.joint:
        raise ProbeError(
            f"no probes given: e.g. --probes logistic,knn,mlp (--probes {NO_PROBES} needs the joint member, --joint)"
        )
    if make_probe is None:
        unknown = [p for p in probe_list if p not in PROBES]
        if unknown:
            raise ProbeError(f"unknown probe(s) {', '.join(unknown)}; choose from {', '.join(PROBES)}")
        make_probe = audit_probe
    seed_list = parse_seeds(seeds)
    if int(k) < 1:
        raise ProbeError(f"k must be at least 1, got {k}")
    if int(k) >= n:
        raise ProbeError(
            f"-k {k} neighbours per cell needs more than {k} cells; the audit has {n} (use -k {n - 1} or less)"
        )
    n_models = len(features) * len(probe_list) * len(seed_list) + (len(seed_list) if opt.joint else 0)
    need = n * len(classes) * 4 * (n_models + 4)  # float32 out-of-fold probabilities of every model + working copies
    budget = current_policy().budget
    if need > budget:
        raise ProbeError(
            f"this audit would hold about {need / 2**30:.1f} GiB of probabilities ({n:,} cells x {len(classes):,} "
            f"classes x {n_models} models, float32), above the memory budget of {budget / 2**30:.1f} GiB "
            "(--max-memory): audit fewer cells or classes, fewer seeds or probes, or raise --max-memory"
        )
    rk = as_ranking(opt.ranking)
    digest = label_digest(ids, labels, groups)
    f_digest = {b: feature_digest(x) for b, x in features.items()}
    impl = {p: probe_signature(p, make_probe) for p in probe_list}
    read_from = cache_to_read(str(cache), opt.cache_legacy) if cache is not None else None
    cached = read_oof_cache(read_from, ids)
    fold_cache: dict[int, tuple[np.ndarray, str]] = {}
    oofs: list[OOF] = []
    reused = computed = fits = 0
    keys = feature_keys or {}
    todo = [(b, p, s) for b in features for p in probe_list for s in seed_list]
    members = dict(features)  # what each member fits: a backbone's features, or all side by side (joint)
    make_member = partial(member_probe, make_probe)
    if opt.joint:
        joint = JOINT_SEPARATOR.join(features)  # one backbone: its own name (longer than any one name otherwise)
        members[joint] = side_by_side(list(features.values()))
        f_digest[joint] = joint_digest([f_digest[b] for b in features])
        keys = {**keys, joint: JOINT_SEPARATOR.join(keys.get(b, b) for b in features)}
        impl[JOINT_PROBE] = probe_signature(JOINT_PROBE, make_member)
        todo += [(joint, JOINT_PROBE, s) for s in seed_list]
    planned: list[tuple[dict[str, Any], np.ndarray, OOF | None]] = []
    for b, p, s in todo:
        if s not in fold_cache:
            fold_cache[s] = make_folds(labels, groups, folds, s, split)
        fold, scheme = fold_cache[s]
        key = dict(
            backbone=b,
            feature_key=keys.get(b, b),
            feature_digest=f_digest[b],
            pool=pool,
            probe=p,
            probe_impl=impl[p],
            seed=int(s),
            folds=int(folds),
            scheme=scheme,
            label_digest=digest,
        )
        hit = cached.get(tuple(key[c] for c in KEY_COLUMNS))
        usable = hit is not None and hit.classes == classes and np.array_equal(hit.fold, fold)
        planned.append((key, fold, hit if usable else None))
    missing = [(key, fold) for key, fold, hit in planned if hit is None]
    scheduler = current_scheduler()
    with progress(len(missing), quiet) as advance, limit_threads(threads):
        if scheduler and missing:
            probas = _oof_on_dask(scheduler, missing, members, labels, classes, make_member, device, advance)
        else:
            probas = []
            for key, fold in missing:
                advance(f"{key['backbone']} · {key['probe']} · seed {key['seed']}")
                x = members[key["backbone"]]
                probas.append(_oof_one(x, labels, fold, classes, make_member, key, device))
    computed_oofs = iter(OOF(key, classes, proba, fold) for (key, fold), proba in zip(missing, probas))
    for _, fold, hit in planned:
        oofs.append(hit if hit is not None else next(computed_oofs))
        if hit is not None:
            reused += 1
        else:
            computed += 1
            fits += len(np.unique(fold))
    nbrs, dis = {}, {}
    for b, x in features.items():
        d, idx, sims = neighbor_disagreement(x, labels, k)
        nbrs[b] = (idx, sims)
        dis[b] = d
    ev = evidence(oofs, labels, classes, np.mean(list(dis.values()), axis=0), rk)
    ens = ev.attrs.pop("ensemble")
    why = why_columns(oofs, ens.members, labels, classes, nbrs, ids, ev["confident_learning"].to_numpy())
    for c in why.columns:
        ev[c] = why[c].to_numpy()
    if len(dis) > 1:
        for b, d in dis.items():
            ev[f"neighbor_disagreement:{b}"] = d
    ev.insert(0, "path", obs["path"].to_numpy())
    ev.insert(0, "id", ids)
    order = np.lexsort((np.arange(n), -ev["score"].to_numpy()))  # stable: ties keep cell order
    table = ev.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, n + 1))
    table.index = order  # position of each row's cell in the audited order
    params = dict(
        backbones=list(features),
        feature_keys={b: keys.get(b, b) for b in features},
        pool=pool,
        probes=probe_list,
        joint=JOINT_SEPARATOR.join(features) + f" ({JOINT_PROBE}: logistic, C=1)" if opt.joint else None,
        probe_impl=impl,
        seeds=seed_list,
        folds=int(folds),
        scheme=fold_cache[seed_list[0]][1],
        k=int(k),
        ranking=rk.name,
        calibration={
            o.name: {
                "smoothing": float(np.mean([v[0] for v in t.values()])),
                "temperature": float(np.mean([v[1] for v in t.values()])),
            }
            for o, t in zip(oofs, ens.temperatures)
            if t
        },
        label_digest=digest,
        n_cells=n,
        n_classes=len(classes),
        n_models=len(model_groups(oofs)),  # backbone x probe (+ the joint member), as each cell's why counts them
        n_runs=len(oofs),  # x seeds: the out-of-fold runs whose probabilities are averaged
        formula=rk.formula(),
        cache=str(cache) if cache else None,
    )
    res = AuditResult(table, oofs, classes, params, nbrs, obs, reused, computed, fits)
    if cache is not None and computed:
        try:
            if read_from != str(cache) and read_from is not None:  # only the legacy file exists: carry it over
                adopt_legacy(str(cache), read_from)
            res.files["oof"] = write_cache(cache, oofs, ids, cache_lock)
        except ProbeError as e:  # a full disk must not throw away a finished audit: its results still go out
            warnings.warn(f"{e}; the audit's results are written, but the next audit refits these models", stacklevel=2)
            res.notes.append(f"the out-of-fold cache was not written: {e}")
    return res


def audit(
    store: Any,
    model: str | Sequence[str],
    *,
    probes: str | Sequence[str] = UNSET,
    folds: int = UNSET,
    seeds: int | str | Sequence[int] = UNSET,
    top: int = UNSET,
    dataset: str | None = UNSET,
    pool: str | None = UNSET,
    out: str | os.PathLike | None = UNSET,
    device: str = UNSET,
    quiet: bool = UNSET,
    show: bool = UNSET,
    options: StudyOptions | None = None,
    audit_options: AuditOptions | None = None,
    **more: Any,
) -> AuditResult:
    """Audit the current labels of a store's cells with one or more backbones' features.

    ``model``: backbone names (or feature keys), a comma list or a list; the cells audited are
    those readable for every backbone and labelled. Writes to ``out`` when given (the CLI:
    ``audit-<models>-<date>`` by default; else nothing until ``result.save(out)``): ``suspects.csv`` (every cell,
    ranked, with its evidence and why it is suspected: the models that disagree, the neighbours with another label),
    ``corrections-template.csv`` (the ``top`` suspects with their proposed labels, to review and pass to
    :func:`relabel`), ``suspects.png`` (contact sheet: the top suspects beside their nearest neighbours in the first
    backbone), ``report.html`` (self-contained, sortable and
    filterable in the browser) and ``audit.json`` (parameters). Out-of-fold probabilities are
    cached in the store (beside it: :func:`probes.studies.audit.cache.default_cache`; a cache an
    earlier version left in ``<store>/.probes/`` is still read) or in ``cache`` (a file path or
    URL); ``cache=False`` turns the cache off. Every field of :class:`AuditOptions` (``folds_by``,
    ``k``, ``ranking``, ``joint``, ``cache``, ``threads``, ``html``, ``make_probe``) and of
    :class:`~probes.engine.options.StudyOptions` (``out_of_core``, ``max_memory``, ``scheduler``...) is a
    keyword too. ``out_of_core`` / ``max_memory``: features above the budget are read in store chunks (kNN
    and logistic fit them there; the neighbour search merges chunks to the exact top-k); ``scheduler``
    (``tcp://host:port``, ``local:N``) fits each backbone x probe x seed as one Dask task, to the local
    run's probabilities. ``show`` prints the summary (the CLI always does); ``quiet`` hides the progress bar.

    ``issues`` (``label,duplicate,leak,outlier``, default all): besides the labels, the data set itself
    (:mod:`probes.studies.audit.issues`): near and exact duplicates (``duplicate_threshold``, the pixel digests
    extraction recorded), leaks of duplicate sets and groups across ``split`` (``column``, ``group``,
    ``stratified``, ``auto``) and outliers (``outlier_k`` neighbours), into ``issues.csv`` and a tab each of
    ``report.html``.
    """
    from probes.engine.runtime import study_runtime

    if "split" in more:  # the split leaks are judged against (the CLI's --split): AuditOptions.leak_split
        more["leak_split"] = more.pop("split")
    (mine, theirs), rest = split_options(more, AuditOptions, StudyOptions)
    if rest:
        raise TypeError(f"audit: unknown keyword(s) {', '.join(sorted(rest))}")
    opts = StudyOptions.build(
        options, **given(dataset=dataset, pool=pool, out=out, device=device, quiet=quiet, show=show), **theirs
    )
    opts.refuse(SPLIT_OPTIONS, "audit")
    aopts = AuditOptions.build(audit_options, **given(probes=probes, folds=folds, seeds=seeds, top=top), **mine)
    with study_runtime(**opts.runtime()):
        return _audit(store, model, opts, aopts)


def _audit(store: Any, model: str | Sequence[str], opts: StudyOptions, aopts: AuditOptions) -> AuditResult:
    from probes.studies.audit.issues import issue_table, parse_issues, store_issues
    from probes.studies.audit.outputs import print_summary, write_outputs

    wanted = parse_issues(aopts.issues)
    cells = open_cells(store, model, dataset=opts.dataset, pool=opts.pool)
    pos = np.arange(len(cells.obs))
    feats = cells.features_of_all(pos)  # held together: their sum against the memory budget
    out = opts.folder(study_name("audit", cells.backbones))
    if "label" in wanted:
        res = _label_audit(cells, feats, opts, aopts)
    else:
        obs = cells.obs[["id", "path", "label", "group"]].reset_index(drop=True)
        res = AuditResult(pd.DataFrame(), [], sort_labels(cells.labels), {"backbones": cells.backbones}, {}, obs)
        res.params.update(n_cells=len(obs), n_models=0, n_runs=0)
    res.params.update(store=str(cells.store_url), dataset=cells.dataset, excluded=cells.exclusion_lines())
    res.params["issues"] = wanted
    if any(i in wanted for i in ("duplicate", "leak", "outlier")):
        res.issues, notes = store_issues(cells, feats, wanted, aopts)
        res.params.update(duplicate_threshold=aopts.duplicate_threshold, outlier_k=aopts.outlier_k, issue_notes=notes)
    res.issue_table = issue_table(res.table if "label" in wanted else None, res.issues, res.obs)
    if aopts.map_tab and aopts.html:  # the map of the first backbone, coloured by what the audit found
        from probes.studies.embedding_map import embedding_map

        b0 = cells.backbones[0]
        suspicion = res.table[["id", "score"]] if "label" in wanted else None
        res.map_page = embedding_map(
            cells.store_url, cells.feature_key(b0), dataset=cells.dataset, pool=cells.pool_of(b0), suspicion=suspicion
        ).page
    res.out = out
    res._writer = lambda folder: write_outputs(res, top=aopts.top, html=aopts.html)
    if out is not None:
        res.files.update(res._writer(out))
    if opts.printing():
        print_summary(res, top=min(aopts.top, 15))
    return res


def _label_audit(cells: Any, feats: dict[str, Any], opts: StudyOptions, aopts: AuditOptions) -> AuditResult:
    """The label audit of a store's cells: out-of-fold probabilities (cached beside the store), neighbours."""
    import embedcache

    lock, legacy = None, None
    cache = aopts.cache
    if cache is None or cache is True:
        cache_path: str | None = default_cache(cells.store_url, cells.dataset)
        st = embedcache.open_store(cells.store_url)
        lock = lambda: st.lock(f"audit-oof-{cells.dataset}")  # noqa: E731
        legacy = legacy_cache(cells.store_url, cells.dataset)
    elif cache is False:
        cache_path = None
    else:
        cache_path = str(cache)
    if cache_path is not None:
        check_writable(cache_path)  # before any fit, not after
    return audit_arrays(
        feats,
        cells.labels,
        ids=cells.obs["id"].to_numpy(),
        groups=cells.obs["group"].to_numpy(),
        paths=cells.obs["path"].to_numpy(),
        feature_keys={b: cells.feature_key(b) for b in cells.backbones},
        pool=cells.pool,
        device=opts.device,
        quiet=opts.quiet,
        options=aopts.replace(
            cache=cache_path if cache_path is not None else False, cache_lock=lock, cache_legacy=legacy
        ),
    )


def _oof_one(
    x: Any,
    labels: np.ndarray,
    fold: np.ndarray,
    classes: Sequence[str],
    make_probe: Callable[..., Any],
    key: dict[str, Any],
    device: str,
    threads: int | None = None,
) -> np.ndarray:
    """One model's out-of-fold probabilities (here, or as a Dask task), failures named."""
    b, p, s = key["backbone"], key["probe"], key["seed"]
    x = x if is_chunked(x) else np.asarray(x, dtype=np.float32)
    try:
        with limit_threads(threads):
            return oof_proba(x, labels, fold, classes, partial(make_probe, p, seed=int(s), device=device), name=p)
    except ProbeError:
        raise
    except Exception as e:
        raise ProbeError(f"probe '{p}' on {b}, seed {s} failed: {type(e).__name__}: {e}") from e


def _oof_on_dask(
    spec: str,
    missing: list[tuple[dict[str, Any], np.ndarray]],
    features: dict[str, Any],
    labels: np.ndarray,
    classes: Sequence[str],
    make_probe: Callable[..., Any],
    device: str,
    advance: Callable[[str], None],
) -> list[np.ndarray]:
    """Every missing model as one Dask task (``--scheduler``); results in ``missing``'s order, equal to a
    local run's (each task fits the same folds with the same seeds)."""
    from probes.engine.dask_fits import dask_client

    with dask_client(spec) as (client, threads):
        shipped = {
            b: (x if is_chunked(x) else client.scatter(np.asarray(x, dtype=np.float32), hash=False))
            for b, x in features.items()
            if any(key["backbone"] == b for key, _ in missing)
        }
        futures = [
            client.submit(
                _oof_one, shipped[key["backbone"]], labels, fold, list(classes), make_probe, key, device, threads,
                pure=False,
            )
            for key, fold in missing
        ]  # fmt: skip
        out = []
        for (key, _), future in zip(missing, futures):
            out.append(future.result())
            advance(f"{key['backbone']} · {key['probe']} · seed {key['seed']}")
        return out
