"""Options dataclasses <-> command-line flags: ``bootstrap_servers`` is ``--bootstrap-servers``.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (``--x``/``--no-x``), those
with ``| None``, ``Literal[...]`` of strings (choices) and ``list[str]`` (a repeatable
flag that also takes comma-separated values).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from amgi.errors import ConfigurationError

__all__ = ["add_flags", "build", "flag_name", "to_argv"]


def flag_name(field_name: str) -> str:
    """``group_id`` -> ``--group-id``."""
    return "--" + field_name.replace("_", "-")


def _resolve(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(annotation: Any) -> tuple[Any, bool]:
    """The type of a field without ``| None``, and whether None was allowed."""
    origin = get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _split_list(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type[Any],
    *,
    dest_prefix: str = "",
    flag_prefix: str = "",
) -> None:
    """Add one flag per field of dataclass ``cls`` to ``parser``.

    ``flag_prefix`` goes before each flag's name: ``kafka-`` makes ``--kafka-group-id``.
    """
    hints = _resolve(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _base(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else None
        )
        dest = dest_prefix + f.name
        names = [flag_name(flag_prefix + f.name)]
        if kind is bool:
            parser.add_argument(
                *names,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {'on' if default else 'off'})",
            )
        elif get_origin(kind) is list:
            parser.add_argument(
                *names,
                dest=dest,
                action="append",
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"{help_text} (repeatable or comma-separated)",
            )
        elif get_origin(kind) is Literal:
            choices = [str(c) for c in get_args(kind)]
            parser.add_argument(
                *names,
                dest=dest,
                choices=choices,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
        elif kind in (str, int, float):
            shown = "*****" if f.metadata.get("secret") and default else default
            parser.add_argument(
                *names,
                dest=dest,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{help_text} (default: {shown})" if default is not None else help_text,
            )
        else:  # pragma: no cover - a programming error in a server's options
            raise TypeError(f"unsupported option type {kind!r} for {cls.__name__}.{f.name}")
        del optional


def build(cls: type[Any], values: Mapping[str, Any], *, dest_prefix: str = "") -> Any:
    """Construct dataclass ``cls`` from parsed flag values (fields not given keep defaults)."""
    hints = _resolve(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = dest_prefix + f.name
        if key not in values:
            continue
        value = values[key]
        kind, _ = _base(hints[f.name])
        if get_origin(kind) is list:
            value = _split_list(value) if isinstance(value, list) else value
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None


def to_argv(cls: type[Any], values: Mapping[str, Any]) -> list[str]:
    """Flags that reproduce ``values`` (field name -> value) for dataclass ``cls``."""
    hints = _resolve(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    argv: list[str] = []
    for name, value in values.items():
        if name not in known:
            raise ConfigurationError(f"{cls.__name__} has no option {name!r}")
        kind, _ = _base(hints[name])
        flag = flag_name(name)
        if value is None:
            continue
        if kind is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif get_origin(kind) is list:
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv
