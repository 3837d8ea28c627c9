"""Typer options generated from the library's options objects, so that each option is declared once.

A command declares a parameter annotated with an options class (``options: ExtractOptions``);
:func:`with_options` replaces it, in the signature Typer reads, with one Typer option per field (its
help, flags and default from :func:`embedcache.options.option`), and rebuilds the object from the parsed
values before the command's body runs. Parameters the command declares itself win over a field of the
same name (a per-command default, such as ``seeds``), and ``defaults`` overrides a field's default for
one command.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from embedcache.options import Options, option_fields, resolved_types
from embedcache_cli.common import fail

__all__ = ["with_options", "typer_parameter"]


def typer_parameter(f: dataclasses.Field, annotation: Any, default: Any = dataclasses.MISSING) -> inspect.Parameter:
    """The keyword parameter Typer reads for options field ``f``."""
    meta = f.metadata
    value = f.default if default is dataclasses.MISSING else default
    if value is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    flags = list(meta.get("flags") or ())
    if not flags:
        flags = ["--" + f.name.replace("_", "-")]
    cli_type = _cli_type(annotation)
    if value is not None and cli_type is list[str]:  # tuples become repeatable options
        value = list(value)
    info = typer.Option(*flags, help=_help(meta.get("help") or "", flags) or None)
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=Annotated[cli_type, info]
    )


def _help(text: str, flags: list[str]) -> str:
    """A field's help, with what a registry generates: ``--probes`` lists every registered probe name and family
    (:data:`probes.heads.registry.PROBES`), as the studies' own ``--probes`` does."""
    if "--probes" in flags:
        from probes.heads.registry import PROBES

        listing = PROBES.help_text()
        if listing not in text:
            text = f"{text}: {listing}" if text else listing
    return text


def _cli_type(annotation: Any) -> Any:
    """What Typer parses for a field's type: ``X | None`` -> ``Optional[X]``; a union of several types (a name or
    an object, a count or a list) -> ``str`` (the command line gives text); tuples of str -> a repeatable list."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return str
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        one = str if len(inner) > 1 else _cli_type(inner[0])
        return typing.Optional[one] if type(None) in args else one  # Typer reads Optional
    if origin is tuple:
        return list[str]
    return annotation


def with_options(
    defaults: Mapping[str, Any] | None = None, hide: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: each parameter of the command annotated with an :class:`Options` subclass becomes that class's
    fields as Typer options (``defaults`` overrides a field's default here; ``hide`` leaves fields out)."""
    overrides = dict(defaults or {})

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = {n for n, p in sig.parameters.items() if not _is_options(hints.get(n))}
        groups: dict[str, type[Options]] = {}
        params: list[inspect.Parameter] = []
        taken: dict[str, str] = {}  # field name -> the options parameter it belongs to
        for name, p in sig.parameters.items():
            cls = hints.get(name)
            if not _is_options(cls):
                params.append(p.replace(annotation=hints.get(name, p.annotation)))
                continue
            cls = _options_class(cls)
            assert cls is not None
            groups[name] = cls
            types = resolved_types(cls)
            for f in option_fields(cls):
                if f.name in own or f.name in taken or f.name in hide or not f.metadata.get("cli", True):
                    continue
                taken[f.name] = name
                params.append(typer_parameter(f, types[f.name], overrides.get(f.name, dataclasses.MISSING)))
        # keyword-only after positional-or-keyword: Typer does not care about the kind, inspect does
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]

        @functools.wraps(fn)
        def wrapper(**values: Any) -> Any:
            kwargs = {n: values.pop(n) for n in list(values) if n in own}
            for name, cls in groups.items():
                mine = {k: _from_cli(v) for k, v in values.items() if taken.get(k) == name}
                try:
                    kwargs[name] = cls.build(**{**{k: v for k, v in overrides.items() if k in cls.names()}, **mine})
                except Exception as e:  # noqa: BLE001  a bad value is one clear line, as every error
                    fail(e)
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.options_groups = groups  # type: ignore[attr-defined]  read by the CLI/API parity test
        return wrapper

    return deco


def _is_options(t: Any) -> bool:
    return _options_class(t) is not None


def _options_class(t: Any) -> type[Options] | None:
    """``t`` itself, or the options class inside ``X | None``."""
    for c in (t, *typing.get_args(t)):
        if isinstance(c, type) and issubclass(c, Options):
            return c
    return None


def _from_cli(value: Any) -> Any:
    """A Typer value as the options field takes it (a repeatable option's list -> a tuple; none -> None)."""
    if isinstance(value, list):
        return tuple(value) if value else None
    return value
