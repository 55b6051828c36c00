"""``amgi dead-letters list|replay ADDRESS``: look at dead letters and send them back.

Both go through the server's optional transport methods
(:meth:`amgi.transport.Transport.list_dead_letters` and
:meth:`~amgi.transport.Transport.replay_dead_letters`); a server without them answers
with one error line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from amgi.errors import ConfigurationError
from amgi.transport import StoredDeadLetter, Transport

__all__ = ["add_dead_letter_commands", "format_dead_letter", "run_dead_letters"]

_PREVIEW = 80


def add_dead_letter_commands(
    commands: Any,
    common: Callable[[argparse.ArgumentParser], None],
    note: str,
    epilog: str,
) -> None:
    """Add ``dead-letters list`` and ``dead-letters replay`` to the ``amgi`` subcommands."""
    group = commands.add_parser(
        "dead-letters",
        help="list or replay dead-lettered messages",
        description="Inspect the dead letters of an address, or send them back to it.",
    )
    actions = group.add_subparsers(dest="dead_letters_command", metavar="{list,replay}")
    actions.required = True
    for name, text, default in (
        ("list", "show the dead letters of ADDRESS (id, reason, attempts, headers, payload)", 20),
        ("replay", "send dead letters back to ADDRESS, each removed once its send is confirmed", 0),
    ):
        sub = actions.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}.{note}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=epilog,
        )
        sub.add_argument("address", metavar="ADDRESS", help="the address they were consumed from")
        sub.add_argument(
            "--limit",
            type=int,
            default=default,
            metavar="N",
            help=f"at most N dead letters, oldest first; 0: all (default: {default or 'all'})",
        )
        common(sub)


def _preview(payload: bytes | None) -> str:
    if payload is None:
        return "(none)"
    shown = repr(payload[:_PREVIEW])
    more = f" ... ({len(payload)} bytes)" if len(payload) > _PREVIEW else ""
    return shown + more


def _shown(text: str) -> str:
    """``text`` with backslashes and what a terminal would act on (line breaks, escape
    sequences, other control characters) written as escapes: one dead letter's header or
    reason cannot forge lines of the listing or drive the operator's terminal."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def _when(dead_at: float | None) -> str:
    """``dead_at`` as an ISO 8601 time; as seconds when no date holds it (a time the
    broker took from a client, such as a Redis entry id given to ``XADD``)."""
    if dead_at is None:
        return "unknown"
    try:
        return datetime.fromtimestamp(dead_at, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{dead_at} s since the epoch"


def format_dead_letter(d: StoredDeadLetter) -> str:
    """A few indented lines describing one dead letter (text escaped by :func:`_shown`)."""
    when = _when(d.dead_at)
    headers = ", ".join(
        f"{_shown(n.decode(errors='replace'))}={_shown(v.decode(errors='replace'))}"
        for n, v in d.headers
    )
    return (
        f"{_shown(d.id)}  attempts={d.attempts or 'unknown'}  dead-lettered={when}\n"
        f"    reason:  {_shown(d.reason)}\n"
        f"    headers: {headers or '(none)'}\n"
        f"    payload: {_preview(d.payload)}"
    )


async def run_dead_letters(transport: Transport, args: argparse.Namespace) -> int:
    """Carry out ``amgi dead-letters list|replay``; returns the exit code."""
    if args.limit < 0:
        raise ConfigurationError("--limit must not be negative")
    limit = args.limit or sys.maxsize
    method = "list_dead_letters" if args.dead_letters_command == "list" else "replay_dead_letters"
    if getattr(type(transport), method) is getattr(Transport, method):
        # The base class's answer, before connecting to anything.
        await getattr(transport, method)(args.address, limit)
    await transport.connect()
    try:
        if args.dead_letters_command == "list":
            found = await transport.list_dead_letters(args.address, limit)
            for d in found:
                print(format_dead_letter(d))
            print(f"{len(found)} dead letter(s) of {args.address!r} shown ({transport.name})")
            return 0
        try:
            moved = await transport.replay_dead_letters(args.address, limit)
        except asyncio.CancelledError:  # Ctrl-C: part of it may be done, say so
            print(
                f"amgi: replay interrupted: the dead letters it moved are back on "
                f"{args.address!r}, the rest are still dead letters (replay again to move "
                "them)",
                file=sys.stderr,
            )
            raise
        print(f"replayed {moved} dead letter(s) to {args.address!r} ({transport.name})")
        return 0
    finally:
        await transport.close()
