"""Options declared once: frozen dataclasses whose fields carry their help text, CLI flags and constraints.

A job's options (:class:`embedcache.extraction.options.ExtractOptions`, the studies' ``StudyOptions``...)
are one :class:`Options` subclass. Every field is an :func:`option`: its default, a help text, the CLI
flags (default ``--field-name``) and a constraint, checked once when the object is made, in the manner of
scikit-learn's ``_parameter_constraints``::

    @dataclass(frozen=True)
    class ExtractOptions(Options):
        batch_size: int = option(64, "cells per forward pass", check=Interval(int, 1))

The CLI builds its Typer options from these fields (``embedcache_cli.options``), the Python functions take
the object (``options=``) or any field as a keyword, and a plan or a Dask task carries the object: a new
option is one new field.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "Options",
    "OptionError",
    "option",
    "Interval",
    "OneOf",
    "Check",
    "option_fields",
    "split_options",
    "UNSET",
    "given",
]

T = TypeVar("T", bound="Options")


class _Unset:
    """The default of a function keyword that falls through to its options object's field."""

    def __repr__(self) -> str:
        return "<options' default>"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


def given(**values: Any) -> dict[str, Any]:
    """The keywords a caller actually gave (those not :data:`UNSET`)."""
    return {k: v for k, v in values.items() if v is not UNSET}


class OptionError(ValueError):
    """An option has a value outside what it accepts (the message names the option and the range)."""


Check = Callable[[str, Any], "str | None"]  # (option name, value) -> what is wrong, or None; or it raises


@dataclass(frozen=True)
class Interval:
    """A number of ``kind`` (int or float) in ``[low, high]`` (``None``: unbounded; ``open_low``: ``> low``).

    ``none_ok`` accepts None (the option's "not set")."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    none_ok: bool = True

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None:
            return None if self.none_ok else "must be given"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if self.kind is int and (not float(value).is_integer()):
            return f"must be an integer, got {value!r}"
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}, got {value!r}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}, got {value!r}"
        return None


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (``None`` too when ``none_ok``)."""

    choices: tuple[str, ...]
    none_ok: bool = False

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None and self.none_ok:
            return None
        if value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return None


def option(
    default: Any = None,
    help: str = "",  # noqa: A002  the CLI's word
    *,
    flags: Sequence[str] = (),
    check: Check | None = None,
    cli: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A field of an :class:`Options` class: ``default``, its ``help``, CLI ``flags`` (default
    ``--name-with-dashes``; a ``--x/--no-x`` pair for booleans), a ``check`` run when the object is made,
    and ``cli=False`` for options the command line does not offer."""
    meta = {"help": help, "flags": tuple(flags), "check": check, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls: type[Options] | Options) -> tuple[dataclasses.Field, ...]:
    """The fields of an options class, in declaration order."""
    return dataclasses.fields(cls)


@dataclass(frozen=True)
class Options:
    """Base of every options object: frozen, validated on creation, built from keywords."""

    error: ClassVar[type[Exception]] = OptionError  # what a bad value raises (a subclass of ValueError)

    def __post_init__(self) -> None:
        for f in option_fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            problem = check(f.name, getattr(self, f.name))
            if problem:
                raise self.error(f"{f.name} {problem}{_flag_words(f)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in option_fields(cls))

    @classmethod
    def build(cls: type[T], options: T | None = None, **values: Any) -> T:
        """``options`` (default: all defaults) with ``values`` replacing its fields; an unknown keyword is a
        ``TypeError`` naming the options this class has."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; it has: {', '.join(cls.names())}"
            )
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **values) if values else base

    def as_dict(self) -> dict[str, Any]:
        """Every field and its value (for study.json, provenance and Dask tasks)."""
        return {f.name: getattr(self, f.name) for f in option_fields(self)}

    def replace(self: T, **values: Any) -> T:
        return type(self).build(self, **values)


def split_options(values: Mapping[str, Any], *classes: type[Options]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Share keyword ``values`` out among ``classes`` by field name: ``([per class], rest)``."""
    out: list[dict[str, Any]] = []
    rest = dict(values)
    for cls in classes:
        names = set(cls.names())
        out.append({k: rest.pop(k) for k in list(rest) if k in names})
    return out, rest


def resolved_types(cls: type[Options]) -> dict[str, Any]:
    """The fields' annotations as types (the module's ``from __future__ import annotations`` makes strings)."""
    return typing.get_type_hints(cls)


def _flag_words(f: dataclasses.Field) -> str:
    if not f.metadata.get("cli", True):
        return ""
    flags = f.metadata.get("flags") or ()
    flag = next((x for x in flags if x.startswith("--")), None) or "--" + f.name.replace("_", "-")
    return f" ({flag.split('/')[0]} on the command line)"


def all_names(classes: Iterable[type[Options]]) -> list[str]:
    """Every field name of ``classes``, in order."""
    return [n for cls in classes for n in cls.names()]


def accepted_names(fn: Callable[..., Any]) -> set[str]:
    """Every keyword ``fn`` accepts: its own parameters and the fields of the options classes it takes
    (a parameter annotated ``SomeOptions | None``, whose fields may also be given as keywords)."""
    import inspect

    names: set[str] = set()
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        hint = _annotation(fn, p.annotation)
        classes = [t for t in (hint, *typing.get_args(hint)) if _is_options_class(t)]
        if classes:
            names.update(n for cls in classes for n in cls.names())
        else:
            names.add(name)
    return names


def _annotation(fn: Callable[..., Any], annotation: Any) -> Any:
    """A parameter's annotation evaluated in ``fn``'s module (None when it names what only type checkers see)."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, getattr(fn, "__globals__", {}))  # our own source's annotations, not user input
    except (NameError, TypeError, SyntaxError):
        return None


def _is_options_class(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, Options)
