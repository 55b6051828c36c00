"""Options dataclasses <-> command-line flags: ``bootstrap_servers`` is ``--bootstrap-servers``.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (``--x``/``--no-x``), those
with ``| None``, ``Literal[...]`` of strings (choices) and ``list[str]`` (a repeatable
flag that also takes comma-separated values; with ``"whole": True`` in the field's
metadata each flag is one item, commas included, e.g. a ``NAME=VALUE`` setting whose
value may hold a comma).

Declaring an option, its bounds and its checks::

    @dataclass(slots=True)
    class MyOptions:
        batch_size: int = option(100, "most messages per batch", ge=1)
        linger: float = option(0.0, "seconds to wait for a full batch", ge=0)
        mode: Literal["fast", "safe"] = option("safe", "delivery mode")
        password: str | None = option(None, "broker password", secret=True)

        def check_together(self) -> None:  # optional: rules that involve several fields
            if self.password and not self.user:
                raise invalid(self, "password", "needs --user")

:func:`check` enforces, for every field: its type, a ``Literal``'s choices, the bounds
``ge``/``gt``/``le``/``lt`` from the field's metadata, and that a float is finite (nan
and inf are refused everywhere); then it calls ``check_together()`` if the class has
one. Every problem is one :class:`~amgi.errors.ConfigurationError` line in one style,
``--batch-size must be at least 1 (got batch_size=0)``, naming the flag and the field.
:func:`build` (the command line) checks what it builds; the runtime checks a transport's
options before lifespan startup; a class whose construction must fail on bad values
calls ``check(self)`` from ``__post_init__`` (as :class:`amgi.runtime.RuntimeConfig`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from amgi.errors import ConfigurationError
from amgi.secrets import masked

__all__ = [
    "AppendWhole",
    "add_flags",
    "bounds_text",
    "build",
    "check",
    "flag_name",
    "invalid",
    "option",
    "option_table",
    "to_argv",
]


def flag_name(field_name: str) -> str:
    """``group_id`` -> ``--group-id``."""
    return "--" + field_name.replace("_", "-")


def _resolve(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_BOUNDS = ("ge", "gt", "le", "lt")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field for an option: default (or ``factory``), help text, bounds.

    ``ge``/``gt``/``le``/``lt`` bound a number (>=, >, <=, <); ``secret=True`` keeps the
    value out of help texts, errors and the class's repr (:func:`amgi.secrets.masked`).
    The result is an ordinary ``dataclasses.field`` whose metadata holds the rest, so
    ``field(default=1, repr=False, metadata={"help": "…", "secret": True})`` is the same
    declaration as ``option(1, "…", secret=True)``.
    """
    metadata: dict[str, Any] = {"help": help}
    for name, bound in zip(_BOUNDS, (ge, gt, le, lt), strict=True):
        if bound is not None:
            metadata[name] = bound
    if secret:
        metadata["secret"] = True
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, repr=not secret, metadata=metadata)
    return dataclasses.field(default=default, repr=not secret, metadata=metadata)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounds_text(metadata: Mapping[str, Any]) -> str:
    """The bounds of a field in words: ``at least 1``, ``1 to 65535``, ``above 0``."""
    ge, gt, le, lt = (metadata.get(name) for name in _BOUNDS)
    if ge is not None and le is not None:
        return f"{_shown(ge)} to {_shown(le)}"
    parts = []
    if ge is not None:
        parts.append(f"at least {_shown(ge)}")
    if gt is not None:
        parts.append(f"above {_shown(gt)}")
    if le is not None:
        parts.append(f"at most {_shown(le)}")
    if lt is not None:
        parts.append(f"below {_shown(lt)}")
    return " and ".join(parts)


def option_table(cls: type[Any]) -> str:
    """A Markdown table of the options of dataclass ``cls``: flag, default, meaning.

    The meaning is the field's help text and its bounds; docs/servers pages start
    from this and may explain more (a test keeps flags and defaults in step).
    """
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING and f.default is not None:
            default = f"`{f.default}`"
            if isinstance(f.default, bool):
                default = "on" if f.default else "off"
        else:
            default = "(none)"
        meaning = f.metadata.get("help", "")
        bounds = bounds_text(f.metadata)
        if bounds:
            meaning += f" ({bounds})"
        rows.append(f"| `{flag_name(f.name)}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def invalid(options: Any, name: str, problem: str) -> ConfigurationError:
    """The one error style for a bad option: ``--flag PROBLEM (got field=value)``.

    ``options`` is the dataclass instance (its value of ``name`` is shown unless the
    field is secret); raise the result.
    """
    secret = any(f.name == name and f.metadata.get("secret") for f in dataclasses.fields(options))
    value = masked(getattr(options, name, None)) if secret else repr(getattr(options, name, None))
    return ConfigurationError(f"{flag_name(name)} {problem} (got {name}={value})")


def _type_problem(kind: Any, value: Any) -> str | None:
    """Why ``value`` is not a ``kind`` (None when it is)."""
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if type(value) is int else "must be an integer"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if value in choices:
            return None
        return "must be one of " + ", ".join(str(c) for c in choices)
    if get_origin(kind) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return None
        return "must be a list of strings"
    return None  # pragma: no cover - add_flags refuses other types


def _bound_problem(metadata: Mapping[str, Any], value: Any) -> str | None:
    ge, gt, le, lt = (metadata.get(name) for name in _BOUNDS)
    if (
        (ge is not None and value < ge)
        or (gt is not None and value <= gt)
        or (le is not None and value > le)
        or (lt is not None and value >= lt)
    ):
        return "must be " + bounds_text(metadata)
    return None


def check(options: Any) -> None:
    """Raise :class:`ConfigurationError` (one line, naming the flag) if ``options`` is bad.

    Checks every field's type, choices, bounds and finiteness, then the class's own
    ``check_together()`` (rules that involve several fields), if it has one.
    """
    hints = _resolve(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        kind, optional = _base(hints[f.name])
        if value is None:
            if optional:
                continue
            raise invalid(options, f.name, "must be given")
        problem = _type_problem(kind, value) or (
            _bound_problem(f.metadata, value) if kind in (int, float) else None
        )
        if problem:
            raise invalid(options, f.name, problem)
    together = getattr(options, "check_together", None)
    if together is not None:
        together()


def _base(annotation: Any) -> tuple[Any, bool]:
    """The type of a field without ``| None``, and whether None was allowed."""
    origin = get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


class AppendWhole(argparse._AppendAction):
    """A repeatable flag of a ``"whole"`` list option: each flag is one item, kept whole."""


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
        elif get_origin(kind) is list and f.metadata.get("whole"):
            parser.add_argument(
                *names,
                dest=dest,
                action=AppendWhole,
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"{help_text} (repeatable; commas are part of the value)",
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
            bounds = bounds_text(f.metadata)
            if bounds:
                help_text = f"{help_text}, {bounds}"
            shown = masked(default) if f.metadata.get("secret") and default else default
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
        if get_origin(kind) is list and isinstance(value, list) and not f.metadata.get("whole"):
            value = _split_list(value)
        kwargs[f.name] = value
    try:
        built = cls(**kwargs)
    except ConfigurationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None
    check(built)
    return built


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
