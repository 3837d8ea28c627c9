"""The shape every probe study follows, and the shared pieces that fill it.

A study is one module in :mod:`probes.studies` with one public function (``scale``, ``robustness``...)
that goes through six steps, each with its helper here or in :mod:`probes.reporting`:

1. **inputs**: the usable cells of the store (:func:`probes.features.cells.open_cells`), the probe names
   (:func:`check_probes`), seeds (:func:`probes.sampling.parse_seeds`), the output folder
   (:func:`probes.reporting.tables.prepare_out`, created before any fit) and its name (:func:`study_name`);
2. **cells and splits**: a :class:`probes.sampling.Sampler` and, for domain studies, a
   :class:`probes.domains.DomainPlan`; every split is made up front so bad input fails before a fit;
3. **a plan of fits**: a generator of :class:`FitJob` (what to train on, what to predict), reading
   features lazily, with the total count for the progress bar;
4. **fit / predict**: :func:`run_plan` fits each job's probe (:func:`probes.heads.make_probe` or a given
   ``make_probe``) under the one progress bar, names the failing fit in errors and times it;
5. **tidy results**: the study turns each :class:`Fitted` into long rows (one per fit x test set x
   metric, scored with :func:`probes.metrics.score`) and aggregates them (``summary`` tables);
6. **outputs**: :func:`finish` writes the tables (CSV / Parquet), plots and JSON through the one
   writer (:func:`probes.reporting.tables.write_files`) and prints :class:`probes.reporting.console.Panel`
   objects through the one printer.

A new study imports from here, :mod:`probes.features.cells`, :mod:`probes.sampling`, :mod:`probes.metrics`
and :mod:`probes.reporting`, never from another study.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from probes.errors import ProbeError
from probes.features.cells import parse_names
from probes.heads.registry import PROBES
from probes.heads.registry import make_probe as heads_make_probe
from probes.reporting.console import Panel, print_report, progress
from probes.reporting.tables import write_files

FIT_COLUMNS = [
    "backbone",
    "probe",
    "limit",
    "seed",
    "n_train",
    "seconds",
    "C",
    "val_f1",
    "n_iter",
    "converged",
    "precision",
    "backend",
    "exact_fallbacks",
    "best_epoch",
    "epochs_run",
    "n_trainable",
    "features",
]
FIT_ATTRS = (
    "C_",
    "val_f1_",
    "n_iter_",
    "converged_",
    "precision_",
    "backend_",
    "exact_fallbacks_",
    "best_epoch_",
    "n_trainable_",
)
EPOCH_COLUMNS = [
    "backbone",
    "probe",
    "limit",
    "seed",
    "epoch",
    "train_loss",
    "val_macro_f1",
    "val_loss",
    "best",
    "seconds",
]


# -- 1. inputs ----------------------------------------------------------------------------------
def check_probes(probes: str | Sequence[str]) -> list[str]:
    """The probe names of ``probes`` (comma list or list), each one of :data:`probes.heads.registry.PROBES`
    (the heads and the fine-tunes)."""
    names = parse_names(probes)
    if not names:
        raise ProbeError(f"no probe given; choose from {PROBES.help_text()}")
    unknown = [p for p in names if p not in PROBES]
    if unknown:
        raise ProbeError(f"unknown probe(s) {', '.join(unknown)}; choose from {PROBES.help_text()}")
    return names


def study_name(kind: str, parts: Sequence[str], out: Any = None) -> str:
    """The study's name: the output folder's name, else ``<kind>-<parts joined by +>-<date-time>``."""
    if out is not None:
        return Path(out).name
    slug = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") for p in parts)
    return f"{kind}-{slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# -- 3. a plan of fits, 4. fit / predict --------------------------------------------------------
@dataclass
class FitJob:
    """One fit: ``probe`` with ``seed`` on ``x_train`` / ``y_train``, predicting every ``x_tests`` matrix.

    ``x_train`` / ``x_tests`` are feature matrices, or for fine-tunes token / image readers of the job's
    cells (:class:`probes.tuning.study_inputs.RowsReader`); ``params`` are extra probe keywords (a
    fine-tune's backbone and k). ``tag`` carries whatever the study needs to turn the predictions into
    rows (its split, its test sets).
    """

    backbone: str
    probe: str
    seed: int
    x_train: Any
    y_train: np.ndarray
    x_tests: list[Any]
    limit: int | None = None
    n_classes: int = 0
    tag: Any = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What the progress bar shows while it runs."""
        return f"{self.backbone} · {self.probe} · {'all' if self.limit is None else self.limit} · seed {self.seed}"


@dataclass
class Fitted:
    """A job's predictions (one array of labels per test matrix), seconds, :func:`fit_info`, and for
    probes trained by epochs their ``history`` (one dict per epoch: train_loss, val_macro_f1, best, seconds)."""

    job: FitJob
    predictions: list[np.ndarray]
    seconds: float
    info: dict[str, Any]
    history: list[dict] | None = None

    def fit_row(self) -> dict[str, Any]:
        """The job's row of ``fits.csv`` (:data:`FIT_COLUMNS`)."""
        j = self.job
        return dict(
            backbone=j.backbone,
            probe=j.probe,
            limit=j.limit,
            seed=j.seed,
            n_train=len(j.y_train),
            seconds=self.seconds,
            epochs_run=len(self.history) if self.history is not None else None,
            **self.info,
        )

    def epoch_rows(self) -> list[dict[str, Any]]:
        """The job's rows of ``epochs.csv`` (:data:`EPOCH_COLUMNS`); none for probes without epochs."""
        j = self.job
        return [
            dict(
                backbone=j.backbone,
                probe=j.probe,
                limit=j.limit,
                seed=j.seed,
                **{k: h.get(k) for k in EPOCH_COLUMNS[4:]},
            )
            for h in self.history or ()
        ]


def fit_info(est: Any) -> dict[str, Any]:
    """What a fitted probe chose and how its solver ended (None where the probe has no such thing):
    ``C`` and ``val_f1`` (the sweep's hold-out macro-F1 per C, as JSON), ``n_iter``, ``converged``,
    ``precision``, ``backend``, ``exact_fallbacks`` (kNN queries re-searched exactly)."""
    info = {}
    for attr in FIT_ATTRS:
        v = getattr(est, attr, None)
        if isinstance(v, dict):
            v = json.dumps({str(k): round(float(x), 6) for k, x in v.items()})
        elif hasattr(v, "item"):  # numpy scalar or 0-d torch tensor
            v = v.item()
        info[attr.rstrip("_")] = v
    return info


def fit_predict(job: FitJob, device: str = "auto", make_probe: Callable[..., Any] | None = None) -> Fitted:
    """Fit ``job``'s probe and predict each test matrix; seconds cover the fit and every prediction.

    Matrices read out of core (:class:`probes.features.chunked.ChunkedRows`) are fitted by the heads that
    stream them (kNN, logistic; others raise a :class:`ProbeError`) and predicted block by block;
    ``info["features"]`` says which path ran (``in-memory`` / ``out-of-core``). A failure deep inside
    a library becomes a :class:`ProbeError` naming the fit (cause kept).
    """
    from probes.features.chunked import is_chunked, predict_blocks
    from probes.heads.rows import for_rows

    make: Callable[..., Any] = make_probe or heads_make_probe  # the heads, and the fine-tunes
    where = (
        f"probe '{job.probe}' on {job.backbone}"
        + (f" at limit {job.limit}" if job.limit is not None else "")
        + f", seed {job.seed}"
    )
    try:
        est = for_rows(make(job.probe, seed=job.seed, device=device, **job.params), job.probe, job.x_train)
        t0 = time.perf_counter()
        est.fit(job.x_train, job.y_train)
        preds = [predict_blocks(est, x).astype(str) for x in job.x_tests]
        seconds = time.perf_counter() - t0
        info = fit_info(est)
        info["features"] = "out-of-core" if is_chunked(job.x_train) else "in-memory"
        history = getattr(est, "history_", None)
    except ProbeError:
        raise
    except Exception as e:  # a library failing deep inside: say where, keep the cause
        raise ProbeError(
            f"{where} failed ({len(job.y_train)} training cells, {job.n_classes} classes): {type(e).__name__}: {e}"
        ) from e
    return Fitted(job, preds, seconds, info, history)


def run_plan(
    jobs: Iterable[FitJob],
    total: int,
    *,
    device: str = "auto",
    quiet: bool = False,
    make_probe: Callable[..., Any] | None = None,
    scheduler: str | None = None,
) -> Iterator[Fitted]:
    """Fit every job in turn under one progress bar (``total`` fits; none shown when ``quiet``).

    ``scheduler`` (default: :func:`probes.engine.dask_fits.current_scheduler`, which ``--scheduler`` sets):
    ``tcp://HOST:PORT`` or ``local:N`` runs each job as a Dask task (:mod:`probes.engine.dask_fits`); the
    results come back in the plan's order, so every table is the local run's."""
    from probes.engine.dask_fits import current_scheduler, run_on_dask

    scheduler = scheduler or current_scheduler()
    with progress(total, quiet) as advance:
        if scheduler:
            yield from run_on_dask(
                jobs, scheduler, device=device, make_probe=make_probe, advance=advance, fit=fit_predict
            )
            return
        for job in jobs:
            advance(job.label)
            yield fit_predict(job, device, make_probe)


def fit_table(rows: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """``fits.csv`` as a table, and a note when some fits stopped at their iteration limit."""
    table = pd.DataFrame(list(rows), columns=FIT_COLUMNS)
    for col in ("limit", "n_iter", "exact_fallbacks", "best_epoch", "epochs_run", "n_trainable"):
        table[col] = table[col].astype("Int64")
    stopped = table[table["converged"] == False]  # noqa: E712 - None (not an iterative probe) is not False
    notes = []
    if len(stopped):
        notes.append(
            f"{len(stopped)} of {len(table)} fits stopped at their iteration limit before meeting "
            "the stopping rule (converged = False in fits.csv): "
            + ", ".join(sorted({f"{b} · {p}" for b, p in zip(stopped["backbone"], stopped["probe"])}))
        )
    ooc = table[table["features"] == "out-of-core"]
    if len(ooc):
        from probes.features.policy import current_policy, gib

        notes.append(
            f"{len(ooc)} of {len(table)} fits read their features out of core (from the store in row blocks, "
            f"features = out-of-core in fits.csv): above the memory budget of {gib(current_policy().budget)} "
            "(--max-memory) or asked for (--out-of-core always)"
        )
    return table, notes


def epoch_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """``epochs.csv``: per fit trained by epochs, each epoch's training loss and hold-out macro-F1."""
    table = pd.DataFrame(list(rows), columns=EPOCH_COLUMNS)
    table["limit"] = table["limit"].astype("Int64")
    return table


# -- 6. outputs ---------------------------------------------------------------------------------
class Saves:
    """``save(out)``: write a study's files after the fact. A Python call writes nothing unless given ``out``
    (the CLI always writes); the result keeps what it would have written."""

    out: Path | None
    files: dict[str, Path]
    _writer: Callable[[Path], dict[str, Path]] | None = None

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write the study's tables, plots and documents under ``out``; returns ``{file name: path}``."""
        from probes.reporting.tables import prepare_out

        if self._writer is None:
            raise ProbeError("this result has nothing to save (it was not built by a study)")
        self.out = prepare_out(out)
        self.files = self._writer(self.out)
        return self.files


def finish(
    result: Any,
    *,
    tables: Mapping[str, pd.DataFrame],
    plots: Mapping[str, Callable[[Path], Any]] | None = None,
    documents: Mapping[str, Any] | None = None,
    panels: Sequence[Panel] = (),
    lines: Sequence[str] = (),
    show: bool = True,
) -> dict[str, Path]:
    """Write a study's files under ``result.out`` when it has one (setting ``result.files``; else
    ``result.save(out)`` writes them later) and print its panels, ``lines``, ``result.notes`` and where the
    files went."""
    result._writer = lambda folder: write_files(folder, tables=tables, plots=plots, documents=documents)
    result.files = result._writer(result.out) if result.out is not None else {}
    if show:
        print_report(panels, notes=getattr(result, "notes", ()), lines=lines, out=result.out, files=result.files)
    return result.files
