"""What every study shares, declared once (:class:`StudyOptions`): which cells, how they are split, where the
fits run and where the files go.

Each ``probes`` command builds its flags from these fields, every study function takes the object
(``options=``) or any field as a keyword, and a Dask task carries it. A study that does not use a field
(robustness has no domains; the audit no splits) hides it on its command and refuses it in Python
(:meth:`StudyOptions.refuse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedcache.options import Interval, OneOf, Options, option
from probes.errors import ProbeError

__all__ = ["StudyOptions", "SPLIT_OPTIONS", "DOMAIN_OPTIONS", "SPLITS", "VAL_MODES", "OUT_OF_CORE_MODES"]

SPLITS = ("stratified", "column", "group", "auto")
VAL_MODES = ("train", "exclude")
OUT_OF_CORE_MODES = ("auto", "always", "never")
SPLIT_HELP = (
    "stratified (cap, then 80/20; the protocol), column (the store's split column: test vs train), "
    "group (no group on both sides)"
)
DOMAIN_OPTIONS = ("train_domain", "test_domain")
SPLIT_OPTIONS = ("split", "val", "test_size", *DOMAIN_OPTIONS)


@dataclass(frozen=True)
class StudyOptions(Options):
    """The options every study shares. ``split`` None: the study's own default (``stratified``; robustness:
    ``auto``)."""

    error = ProbeError

    dataset: str | None = option(None, "dataset in the store (default: the only one)")
    pool: str | None = option(
        None,
        "cls or mean for every backbone, or per backbone: timm:test_resnet=mean,cls "
        "(default: each backbone's own, the first pooling it was extracted with)",
    )
    split: str | None = option(None, SPLIT_HELP, check=OneOf(SPLITS, none_ok=True))
    val: str = option(
        "train",
        "with --split column: 'train' counts val cells as training cells, 'exclude' leaves them out",
        check=OneOf(VAL_MODES),
    )
    test_size: float = option(0.2, "test fraction (the protocol: 0.2)", check=Interval(float, 0, 1, open_low=True))
    train_domain: str | None = option(
        None, "train (and in-domain test) on these domain(s) of the store's domain column, comma separated"
    )
    test_domain: str | None = option(
        None, "score on every cell of these unseen domain(s) (default with --train-domain: all others)"
    )
    out: str | None = option(
        None,
        "output folder (default: <study>-<models>-<date>; in Python nothing is written unless out is given)",
        flags=("--out", "-o"),
    )
    device: str = option("auto", "device for the probes: auto, cpu, cuda")
    scheduler: str | None = option(
        None,
        "run each fit as a Dask task: tcp://HOST:PORT (a running dask scheduler; its workers need the store at the "
        "same URL) or local:N (N worker processes here); the tables are a local run's",
    )
    out_of_core: str | None = option(
        None,
        "read the features from the store in row blocks (knn, logistic fit them there): auto (when they exceed "
        "--max-memory; the default), always, never",
        check=OneOf(OUT_OF_CORE_MODES, none_ok=True),
    )
    max_memory: str | None = option(
        None, "memory budget for a study's features, e.g. 8GB or 512MiB (default: half the RAM)"
    )
    quiet: bool = option(False, "no progress bar (the summary is still printed)", flags=("--quiet", "-q"))
    show: bool = option(False, "print the summary (the CLI always does; Python only when asked)", cli=False)
    write: bool = option(
        False, "with no out, write to <study>-<models>-<date> (the CLI; Python writes only where out says)", cli=False
    )

    def __post_init__(self) -> None:
        if self.out is not None and not isinstance(self.out, str):
            object.__setattr__(self, "out", str(self.out))  # a path-like
        if self.max_memory is not None and not isinstance(self.max_memory, str):
            object.__setattr__(self, "max_memory", str(self.max_memory))
        for name in DOMAIN_OPTIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, ",".join(map(str, value)))  # a list of domains
        super().__post_init__()

    def split_or(self, default: str) -> str:
        """The split mode: the one given, else the study's ``default``."""
        return self.split or default

    def printing(self) -> bool:
        """Print the summary? Only when ``show`` asks (the CLI sets it; ``quiet`` hides the progress bar only)."""
        return bool(self.show)

    def folder(self, name: str) -> Path | None:
        """The study's output folder, created now (before any fit): ``out`` when given, else ``name`` when
        ``write`` (the CLI's default folder), else None: a Python call writes nothing until ``result.save(out)``."""
        from probes.reporting.tables import prepare_out

        if self.out is not None:
            return prepare_out(self.out)
        return prepare_out(name) if self.write else None

    def refuse(self, names: tuple[str, ...], study: str) -> None:
        """A :class:`ProbeError` when one of ``names`` (options ``study`` does not use) was set."""
        default = StudyOptions()
        used = [n for n in names if getattr(self, n) != getattr(default, n)]
        if used:
            raise ProbeError(f"{study} does not take {', '.join(used)}")

    def runtime(self) -> dict[str, Any]:
        """The keywords of :func:`probes.engine.runtime.study_runtime`."""
        return {"scheduler": self.scheduler, "out_of_core": self.out_of_core, "max_memory": self.max_memory}


def study_options(
    options: StudyOptions | None,
    more: dict[str, Any],
    *,
    tune: Any = None,
    tune_class: Any = None,
    **common: Any,
) -> tuple[StudyOptions, Any]:
    """A study's :class:`StudyOptions` (``options`` with the ``common`` keywords the caller gave, and the
    fields in ``more``) and, when ``tune_class`` is given, its fine-tune options (``tune`` with the fields of
    ``tune_class`` in ``more``). A keyword neither class has is a ``TypeError`` naming both classes' fields."""
    from embedcache.options import given, split_options

    classes = [StudyOptions] + ([tune_class] if tune_class is not None else [])
    (mine, *theirs), rest = split_options(more, *classes)
    if rest:
        names = ", ".join(n for cls in classes for n in cls.names())
        raise TypeError(f"unknown keyword(s) {', '.join(sorted(rest))}; the options are: {names}")
    opts = StudyOptions.build(options, **given(**common), **mine)
    tuned = tune_class.build(tune, **theirs[0]) if tune_class is not None else None
    return opts, tuned
