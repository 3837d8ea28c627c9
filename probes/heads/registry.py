"""The probe registry: each head class registers its CLI name(s) with :func:`register_probe`
(as :mod:`embedcache.inputs.perturb`'s perturbations do), so adding a head is one decorated class.

A *family* registered with :func:`register_probe_family` answers to parameterised names
``<prefix>:<argument>`` (``ensemble:mlp+logistic+cosine``): :data:`PROBES` builds their constructor
on demand, so ``name in PROBES`` and ``PROBES[name]`` accept them like plain names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


class ProbeRegistry(dict):
    """``{name: constructor}`` of the plain names; parameterised family names resolve on lookup.

    Iterating lists the plain names only; :attr:`families` maps each family prefix to
    ``(class, parse)``, where ``parse(argument) -> constructor keywords`` raises ``ValueError``
    saying what is wrong with a bad argument.
    """

    def __init__(self) -> None:
        super().__init__()
        self.families: dict[str, tuple[Any, Callable[[str], dict[str, Any]]]] = {}

    def family_constructor(self, name: str) -> Callable[..., Any]:
        """The constructor of a parameterised ``name``; ``KeyError`` when no family owns its prefix,
        ``ValueError`` (the family's message) when its argument is bad."""
        prefix, sep, arg = str(name).partition(":")
        if not sep or prefix not in self.families:
            raise KeyError(name)
        cls, parse = self.families[prefix]
        return partial(cls, **parse(arg))

    def __missing__(self, name: str) -> Callable[..., Any]:
        return self.family_constructor(name)

    def __contains__(self, name: object) -> bool:
        if dict.__contains__(self, name):
            return True
        try:
            self.family_constructor(str(name))
        except (KeyError, ValueError):
            return False
        return True

    def patterns(self) -> Iterator[str]:
        """The family name patterns, e.g. ``ensemble:<head>+<head>+<head>``."""
        for prefix, (cls, _) in self.families.items():
            yield f"{prefix}:{getattr(cls, 'NAME_PATTERN', '<argument>')}"


PROBES: ProbeRegistry = ProbeRegistry()  # name -> constructor(seed=, device=, **params)


def register_probe(name: str, **defaults: Any) -> Callable[[T], T]:
    """Class decorator: ``name`` builds the class with ``defaults`` (e.g. ``knn1`` = ``KNNProbe(k=1)``).

    A name registered twice is an error (two heads cannot answer to one name).
    """

    def deco(cls: T) -> T:
        if dict.__contains__(PROBES, name) or name in PROBES.families:
            raise ValueError(f"probe name {name!r} is registered twice")
        made: Any = cls
        ctor: Any = partial(made, **defaults) if defaults else made
        PROBES[name] = ctor
        return cls

    return deco


def register_probe_family(prefix: str, parse: Callable[[str], dict[str, Any]]) -> Callable[[T], T]:
    """Class decorator: names ``<prefix>:<argument>`` build the class with ``parse(argument)`` keywords."""

    def deco(cls: T) -> T:
        if prefix in PROBES.families or dict.__contains__(PROBES, prefix) or ":" in prefix:
            raise ValueError(f"probe family {prefix!r} is registered twice (or its prefix holds ':')")
        PROBES.families[prefix] = (cls, parse)
        return cls

    return deco
