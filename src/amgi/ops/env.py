"""Options from environment variables: ``--group-id`` may also come from ``AMGI_GROUP_ID``.

:func:`apply_environment` turns the variables into flags placed right after the
subcommand, for options the command line does not give, so the command line wins and
argparse checks an environment value exactly as it checks a flag. A list option takes
comma-separated values, except one whose items may hold commas (Kafka's ``--config``):
that one takes one item per line; an on/off option takes 1/0, true/false, yes/no or on/off.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterator, Mapping, Sequence

from amgi.errors import ConfigurationError
from amgi.options import AppendWhole

__all__ = ["ENV_PREFIX", "annotate_help", "apply_environment", "env_name", "unread_variables"]

ENV_PREFIX = "AMGI_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
_NOT_OPTIONS = frozenset({"AMGI_SERVING_FD", "AMGI_SUPERVISOR_PID", "AMGI_WORKER_INDEX"})
"""Variables that are no option: ``amgi run --workers`` sets them for its workers."""
_NOT_OPTIONS_PREFIX = "AMGI_TEST_"
"""Variables of the apps in ``amgi.testing`` (what they record, how long they wait)."""


def env_name(flag: str) -> str:
    """``--group-id`` -> ``AMGI_GROUP_ID``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _flag(action: argparse.Action) -> str | None:
    if isinstance(action, _SKIP):
        return None
    longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
    return longs[0] if longs else None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choices: dict[str, argparse.ArgumentParser] = action.choices
            return choices
    return {}


def annotate_help(parser: argparse.ArgumentParser) -> None:
    """Add ``[env: AMGI_X]`` to the help of every option of every subcommand."""
    for sub in _subparsers(parser).values():
        for action in sub._actions:
            flag = _flag(action)
            if flag is not None and action.help != argparse.SUPPRESS:
                action.help = f"{action.help or ''} [env: {env_name(flag)}]".lstrip()
        annotate_help(sub)


def _given(action: argparse.Action, argv: Sequence[str], parser: argparse.ArgumentParser) -> bool:
    """Whether ``argv`` gives ``action``'s flag: whole, with ``=VALUE``, or shortened as
    argparse takes it (``--head`` for ``--header``)."""
    for token in argv:
        name = token.partition("=")[0]
        if name in action.option_strings:
            return True
        if name.startswith("--") and parser.allow_abbrev and _shortens(parser, name) is action:
            return True
    return False


def _shortens(parser: argparse.ArgumentParser, prefix: str) -> argparse.Action | None:
    """The action whose flag ``prefix`` stands for: the one flag of ``parser`` it begins
    (more than one is an error argparse reports)."""
    matches = [a for o, a in parser._option_string_actions.items() if o.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _not_on_off(name: str, value: str) -> ConfigurationError:
    return ConfigurationError(f"environment variable {name}={value!r}: expected 1/0 or true/false")


def _tokens(action: argparse.Action, flag: str, name: str, value: str) -> list[str]:
    if isinstance(action, argparse.BooleanOptionalAction):
        word = value.strip().lower()
        if word in _TRUE:
            return [flag]
        if word in _FALSE:
            return ["--no-" + flag[2:]]
        raise _not_on_off(name, value)
    if isinstance(action, AppendWhole):
        return [flag + "=" + line for line in value.splitlines() if line.strip()]
    if action.nargs == 0:
        word = value.strip().lower()
        if word in _TRUE:
            return [flag]
        if word in _FALSE:
            return []
        raise _not_on_off(name, value)
    converted: object = value
    if callable(action.type):
        try:
            converted = action.type(value)
        except argparse.ArgumentTypeError as exc:  # a check of the option's own: its words
            raise ConfigurationError(f"environment variable {name}={value!r}: {exc}") from None
        except (TypeError, ValueError):
            kind = getattr(action.type, "__name__", "value")
            raise ConfigurationError(
                f"environment variable {name}={value!r}: not a valid {kind}"
            ) from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigurationError(f"environment variable {name}={value!r}: must be one of {choices}")
    return [flag + "=" + value]


def apply_environment(
    parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]
) -> list[str]:
    """``argv`` with a flag added for each ``AMGI_*`` variable whose option it lacks."""
    out = list(argv)
    position = 0
    current = parser
    while True:
        subs = _subparsers(current)
        if not subs:
            break
        for i in range(position, len(out)):
            if out[i] in subs:
                position = i + 1
                current = subs[out[i]]
                break
        else:
            return out
        added: list[str] = []
        for action in current._actions:
            flag = _flag(action)
            if flag is None:
                continue
            name = env_name(flag)
            value = environ.get(name)
            if value is None or _given(action, out, current):
                continue
            added += _tokens(action, flag, name, value)
        out[position:position] = added
        position += len(added)
    return out


def _names(parser: argparse.ArgumentParser) -> Iterator[str]:
    """The variable name of every option of ``parser`` and of its subcommands."""
    for action in parser._actions:
        flag = _flag(action)
        if flag is not None:
            yield env_name(flag)
    for sub in _subparsers(parser).values():
        yield from _names(sub)


def unread_variables(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """A line for each ``AMGI_*`` variable that no option of ``parser`` (this server's
    ``amgi`` command, every subcommand) reads: a misspelt name, or another server's option,
    would otherwise be ignored without a word."""
    known = set(_names(parser))
    lines = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in _NOT_OPTIONS:
            continue
        if name.startswith(_NOT_OPTIONS_PREFIX):
            continue
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        lines.append(name + (f" (did you mean {guess[0]}?)" if guess else ""))
    return lines
