"""The sans-IO AMP connection: bytes in, events out; calls and answers in, bytes out.

Nothing here touches a socket, a clock or an event loop. The asyncio layer (or
any other) feeds received bytes to :meth:`Connection.receive_data`, acts on the
events it returns, and writes :meth:`Connection.data_to_send` to the peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._box import (
    DEFAULT_MAX_BOX_SIZE,
    DEFAULT_MAX_KEYS_PER_BOX,
    Box,
    BoxParser,
    encode_box,
    encode_planned,
)
from ._command import Command, StartTLS
from ._errors import (
    UNHANDLED_ERROR_CODE,
    UNKNOWN_ERROR_CODE,
    ArgumentError,
    TooLong,
    UnhandledCommand,
    UnknownRemoteError,
)

__all__ = [
    "AnswerDropped",
    "AnswerReceived",
    "CallReceived",
    "CallRejected",
    "Connection",
    "ErrorReceived",
    "Event",
    "ProtocolViolation",
]

COMMAND = b"_command"
ASK = b"_ask"
ANSWER = b"_answer"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"

# How many tags of abandoned (cancelled or timed-out) calls are remembered, so a
# late answer to one of them is recognised and dropped quietly.
ABANDONED_LIMIT = 65_536


@dataclass(slots=True)
class CallReceived:
    """The peer called ``command``; answer with ``send_answer``/``send_error`` if ``tag``."""

    tag: bytes | None
    command: type[Command]
    arguments: dict[str, Any]


@dataclass(slots=True)
class AnswerReceived:
    """The peer answered our call ``tag`` successfully."""

    tag: bytes
    command: type[Command]
    response: dict[str, Any]


@dataclass(slots=True)
class ErrorReceived:
    """Our call ``tag`` failed; ``error`` is the exception to raise in the caller."""

    tag: bytes
    command: type[Command]
    error: BaseException


@dataclass(slots=True)
class CallRejected:
    """A call could not be dispatched; an error answer is already queued (if it had a tag)."""

    tag: bytes | None
    name: bytes
    code: bytes
    description: str


@dataclass(slots=True)
class AnswerDropped:
    """A late answer or error, for a call abandoned (cancelled or timed out); ignored."""

    tag: bytes


@dataclass(slots=True)
class ProtocolViolation:
    """The byte stream is unusable; close the connection. No further events follow."""

    reason: str


Event = (
    CallReceived | AnswerReceived | ErrorReceived | CallRejected | AnswerDropped | ProtocolViolation
)


class Connection:
    """State of one AMP connection, symmetric: both sides call and answer.

    ``commands`` maps command names to the classes this side answers;
    ``max_box_size`` and ``max_keys_per_box`` bound each received box (see
    :class:`BoxParser`).
    """

    def __init__(
        self,
        commands: Mapping[bytes, type[Command]] | None = None,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys_per_box: int = DEFAULT_MAX_KEYS_PER_BOX,
    ) -> None:
        self.commands: dict[bytes, type[Command]] = dict(commands or {})
        self._parser = BoxParser(max_box_size, max_keys_per_box)
        self._counter = 0
        self._pending: dict[bytes, type[Command]] = {}
        self._abandoned: dict[bytes, None] = {}
        self._outbox: list[bytes] = []
        self.failed = False

    # ------------------------------------------------------------------ output

    def next_tag(self) -> bytes:
        """Allocate the next ``_ask`` tag: lowercase hex counter, from ``1``."""
        self._counter += 1
        return b"%x" % self._counter

    def send_call(self, command: type[Command], values: Mapping[str, Any]) -> bytes | None:
        """Queue a call; return its tag (``None`` when the command needs no answer).

        Raises :class:`ArgumentError` or :class:`TooLong` (nothing queued) on bad values.
        As in Twisted, a call without answer still consumes a tag number, and so
        does a call whose box cannot be framed (a value over 65,535 bytes or a key
        over 255): Twisted takes the tag before framing the box, but after encoding
        each argument (so a bad argument value consumes none).
        """
        counter = self._counter + 1
        tag = b"%x" % counter if command.requires_answer else None
        data = None
        plan = command.call_plan
        if plan is not None and len(values) == len(command.argument_specs):
            try:
                data = encode_planned(plan, values, (command.name, tag or b""))
            except Exception:
                data = None
        if data is None:
            box = command.encode_arguments(values)
            box[COMMAND] = command.name
            if tag is not None:
                box[ASK] = tag
            try:
                data = encode_box(box)
            except TooLong:
                self._counter = counter
                raise
        self._counter = counter
        if tag is not None:
            self._pending[tag] = command
        self._outbox.append(data)
        return tag

    def send_answer(self, tag: bytes, command: type[Command], values: Mapping[str, Any]) -> None:
        """Queue the answer to call ``tag``; raises (nothing queued) if ``values`` are invalid."""
        plan = command.answer_plan
        if plan is not None and len(values) == len(command.response_specs):
            try:
                self._outbox.append(encode_planned(plan, values, (tag,)))
                return
            except Exception:
                pass
        box = command.encode_response(values)
        box[ANSWER] = tag
        self._outbox.append(encode_box(box))

    def send_error(self, tag: bytes, code: bytes, description: str) -> None:
        """Queue an error answer to call ``tag``."""
        desc = description.encode("utf-8", "replace")[:0xFFFF]
        self._outbox.append(encode_box({ERROR: tag, ERROR_CODE: code, ERROR_DESCRIPTION: desc}))

    def send_box(self, box: Box) -> None:
        """Queue an arbitrary box (for extensions; no bookkeeping)."""
        self._outbox.append(encode_box(box))

    def data_to_send(self) -> bytes:
        """Return (and forget) all bytes queued for the peer."""
        out = self._outbox
        if not out:
            return b""
        self._outbox = []
        return out[0] if len(out) == 1 else b"".join(out)

    # --------------------------------------------------------------- bookkeeping

    @property
    def pending_tags(self) -> list[bytes]:
        """Tags of calls still waiting for an answer."""
        return list(self._pending)

    def abandon(self, tag: bytes) -> None:
        """Forget a pending call (cancelled or timed out); its late answer is dropped."""
        if self._pending.pop(tag, None) is not None:
            abandoned = self._abandoned
            abandoned[tag] = None
            if len(abandoned) > ABANDONED_LIMIT:
                del abandoned[next(iter(abandoned))]

    def connection_lost(self) -> list[bytes]:
        """Mark the connection dead; return the tags of calls that will never be answered."""
        tags = list(self._pending)
        self._pending.clear()
        self.failed = True
        return tags

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse received bytes and return the resulting events, in order."""
        if self.failed:
            return []
        parser = self._parser
        boxes = parser.feed(data)
        events: list[Event] = []
        last = len(boxes) - 1
        for index, box in enumerate(boxes):
            event = self._box_received(box)
            events.append(event)
            if type(event) is ProtocolViolation:
                self.failed = True
                return events
            if getattr(event, "command", None) is StartTLS and (
                index != last or parser.buffered or parser.error is not None
            ):
                self.failed = True
                events.append(ProtocolViolation("data received after StartTLS"))
                return events
        if parser.error is not None:
            self.failed = True
            events.append(ProtocolViolation(str(parser.error)))
        return events

    def _box_received(self, box: Box) -> Event:
        tag = box.get(ANSWER)
        if tag is not None:
            command = self._pending.pop(tag, None)
            if command is None:
                return self._unexpected(tag, "answer")
            try:
                return AnswerReceived(tag, command, command.decode_response(box))
            except ArgumentError as exc:
                return ErrorReceived(tag, command, ArgumentError(f"invalid answer: {exc}"))
        tag = box.get(ERROR)
        if tag is not None:
            command = self._pending.pop(tag, None)
            if command is None:
                return self._unexpected(tag, "error")
            code = box.get(ERROR_CODE, UNKNOWN_ERROR_CODE)
            description = box.get(ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            return ErrorReceived(tag, command, self._remote_error(command, code, description))
        name = box.get(COMMAND)
        if name is None:
            return ProtocolViolation("box without _command, _answer or _error")
        ask = box.get(ASK)
        command = self.commands.get(name)
        if command is None:
            return self._reject(ask, name, UNHANDLED_ERROR_CODE, f"Unhandled Command: {name!r}")
        try:
            arguments = command.decode_arguments(box)
        except ArgumentError as exc:
            return self._reject(ask, name, UNKNOWN_ERROR_CODE, f"Invalid arguments: {exc}")
        return CallReceived(ask, command, arguments)

    def _unexpected(self, tag: bytes, kind: str) -> AnswerDropped | ProtocolViolation:
        # A late answer to an abandoned call is expected; any other tag was never
        # asked or is answered twice, which Twisted treats as fatal too.
        if self._abandoned.pop(tag, False) is None:
            return AnswerDropped(tag)
        return ProtocolViolation(f"{kind} for tag {tag[:40]!r}, which no call waits for")

    def _reject(
        self, ask: bytes | None, name: bytes, code: bytes, description: str
    ) -> CallRejected:
        if ask is not None:
            self.send_error(ask, code, description)
        return CallRejected(ask, name, code, description)

    @staticmethod
    def _remote_error(command: type[Command], code: bytes, description: str) -> BaseException:
        exc_type = command.error_types.get(code)
        if exc_type is not None:
            try:
                return exc_type(description)
            except Exception:
                pass
        if code == UNHANDLED_ERROR_CODE:
            return UnhandledCommand(code, description)
        return UnknownRemoteError(code, description)
