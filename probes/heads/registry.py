"""The one probe registry: every name ``--probes`` accepts, the heads and the fine-tunes, declared here once.

Built-in entries name their class by its dotted path (``"probes.heads.knn:KNNProbe"``) and are imported on
first use, so listing the names (the CLI's help, a name check) imports neither torch nor scikit-learn.
:func:`register_probe` adds a class of your own under a name, as timm's ``register_model`` does. A *family*
answers to parameterised names ``<prefix>:<argument>`` (``ensemble:mlp+logistic+cosine``): ``parse(argument)``
gives the constructor keywords, or raises ``ValueError`` saying what is wrong.

    make_probe("logistic", seed=42, device="auto").fit(X, y).predict(X_test)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["PROBES", "ProbeRegistry", "make_probe", "register_probe", "register_probe_family", "tune_probes"]


@dataclass(frozen=True)
class Entry:
    """One name: the class (a dotted ``module:attr`` path, or the class itself), fixed keywords, its kind."""

    target: Any
    defaults: dict[str, Any] = field(default_factory=dict)
    kind: str = "head"  # "head": fitted on pooled features; "tune": a fine-tune (tokens, images)
    help: str = ""

    def cls(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            return getattr(importlib.import_module(module), attr)  # deferred: the heads import torch
        return self.target

    def constructor(self) -> Callable[..., Any]:
        return partial(self.cls(), **self.defaults) if self.defaults else self.cls()


class ProbeRegistry:
    """``name -> constructor(seed=, device=, **params)``; parameterised family names resolve on lookup.

    Iterating lists the plain names in declaration order; :meth:`patterns` the family name patterns."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.families: dict[str, tuple[Any, Callable[[str], dict[str, Any]], str]] = {}

    def declare(self, name: str, target: Any, *, kind: str = "head", help: str = "", **defaults: Any) -> None:  # noqa: A002
        """Add ``name``; a name declared twice is an error (two heads cannot answer to one name)."""
        if name in self.entries or name in self.families or ":" in name:
            raise ValueError(f"probe name {name!r} is registered twice (or holds ':')")
        self.entries[name] = Entry(target, dict(defaults), kind, help)

    def declare_family(self, prefix: str, target: Any, parse: Any, pattern: str) -> None:
        """Names ``<prefix>:<argument>`` build ``target`` with ``parse(argument)`` keywords (``parse`` may be a
        dotted path too)."""
        if prefix in self.families or prefix in self.entries or ":" in prefix:
            raise ValueError(f"probe family {prefix!r} is registered twice (or its prefix holds ':')")
        self.families[prefix] = (target, parse, pattern)

    def family_constructor(self, name: str) -> Callable[..., Any]:
        """The constructor of a parameterised ``name``; ``KeyError`` when no family owns its prefix,
        ``ValueError`` (the family's message) when its argument is bad."""
        prefix, sep, arg = str(name).partition(":")
        if not sep or prefix not in self.families:
            raise KeyError(name)
        target, parse, _ = self.families[prefix]
        return partial(Entry(target).cls(), **Entry(parse).cls()(arg))

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name in self.entries:
            return self.entries[name].constructor()
        return self.family_constructor(name)

    def __contains__(self, name: object) -> bool:
        if name in self.entries:
            return True
        try:
            self.family_constructor(str(name))
        except (KeyError, ValueError):
            return False
        return True

    def is_plain(self, name: str) -> bool:
        """A plain (not parameterised) name."""
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def names(self, kind: str | None = None) -> list[str]:
        """Plain names, of one ``kind`` (``head`` / ``tune``) when given."""
        return [n for n, e in self.entries.items() if kind is None or e.kind == kind]

    def patterns(self) -> Iterator[str]:
        """The family name patterns, e.g. ``ensemble:<head>+<head>+...``."""
        for prefix, (_, _, pattern) in self.families.items():
            yield f"{prefix}:{pattern}"

    def help_text(self) -> str:
        """Every name and pattern, for a CLI help line."""
        return ", ".join([*self.entries, *self.patterns()])


PROBES = ProbeRegistry()

# heads fitted on pooled features (probes.heads)
PROBES.declare("logistic", "probes.heads.logistic:LogisticProbe")
PROBES.declare("linear", "probes.heads.logistic:LogisticProbe")  # the papers' "linear head": the same model
PROBES.declare("knn", "probes.heads.knn:KNNProbe")  # k = 20, similarity-weighted, T = 0.07
PROBES.declare("knn1", "probes.heads.knn:KNNProbe", k=1)
PROBES.declare("svm", "probes.heads.svm:LinearSVMProbe")
PROBES.declare("svm-rbf", "probes.heads.svm:RBFSVMProbe")
PROBES.declare("mlp", "probes.heads.nets:MLPProbe")
PROBES.declare("cosine", "probes.heads.nets:CosineProbe")
# fine-tunes (probes.tuning): tokens cached by extract --tail-blocks, or images
PROBES.declare("lp", "probes.tuning.estimator:FineTuneProbe", kind="tune", method="lp")
PROBES.declare("ft-last", "probes.tuning.estimator:FineTuneProbe", kind="tune", method="ft-last")
PROBES.declare("lora", "probes.tuning.estimator:FineTuneProbe", kind="tune", method="lora")
PROBES.declare("scratch-vit", "probes.tuning.scratch:ScratchViTProbe", kind="tune")
# head-diverse ensembles (probes.heads.ensemble)
_ENSEMBLE = "probes.heads.ensemble:EnsembleProbe"
PROBES.declare_family("ensemble", _ENSEMBLE, "probes.heads.ensemble:parse_override", "<head>+<head>+...")
PROBES.declare_family("ensemble-vote", _ENSEMBLE, "probes.heads.ensemble:parse_vote", "<head>+<head>+...")
PROBES.declare_family("ensemble-mean", _ENSEMBLE, "probes.heads.ensemble:parse_mean", "<head>+<head>+...")


def tune_probes() -> list[str]:
    """The fine-tune probe names (``lp``, ``ft-last``, ``lora``, ``scratch-vit``)."""
    return PROBES.names("tune")


def register_probe(name: str, **defaults: Any) -> Callable[[T], T]:
    """Class decorator: ``name`` builds the class with ``defaults`` (e.g. ``knn1`` = ``KNNProbe(k=1)``)."""

    def deco(cls: T) -> T:
        PROBES.declare(name, cls, **defaults)
        return cls

    return deco


def register_probe_family(prefix: str, parse: Callable[[str], dict[str, Any]]) -> Callable[[T], T]:
    """Class decorator: names ``<prefix>:<argument>`` build the class with ``parse(argument)`` keywords."""

    def deco(cls: T) -> T:
        PROBES.declare_family(prefix, cls, parse, getattr(cls, "NAME_PATTERN", "<argument>"))
        return cls

    return deco


def make_probe(name: str, *, seed: int = 0, device: str = "auto", **params: Any) -> Any:
    """A fresh, unfitted probe ``name`` (one of :data:`PROBES`, or a parameterised family name such as
    ``ensemble:mlp+logistic+cosine``) with ``seed`` and ``device``."""
    try:
        ctor = PROBES[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r}; choose from {PROBES.help_text()}") from None
    return ctor(seed=seed, device=device, **params)
