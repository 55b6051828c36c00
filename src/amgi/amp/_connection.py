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
    ProtocolSwitched,
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
    "Switched",
]

COMMAND = b"_command"
ASK = b"_ask"
ANSWER = b"_answer"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"

# Received descriptors held at most until an argument claims them.
DEFAULT_MAX_UNCLAIMED_FDS = 256

# How many tags of abandoned (cancelled or timed-out) calls are remembered, so a
# late answer to one of them is recognised and dropped quietly.
ABANDONED_LIMIT = 65_536

# Bytes of an unknown command's name quoted back in the error (and in the log): a
# long name must not make the refusal larger than the call.
_SHOWN_NAME = 64


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


@dataclass(slots=True)
class Switched:
    """Our protocol switch was accepted: the connection now carries another protocol,
    whose first bytes are ``data``. No further events follow."""

    data: bytes


Event = (
    CallReceived
    | AnswerReceived
    | ErrorReceived
    | CallRejected
    | AnswerDropped
    | ProtocolViolation
    | Switched
)


class Connection:
    """State of one AMP connection, symmetric: both sides call and answer.

    ``commands`` maps command names to the classes this side answers;
    ``max_box_size`` and ``max_keys_per_box`` bound each received box (see
    :class:`BoxParser`); ``max_unclaimed_fds`` bounds the received descriptors held
    until an argument claims them.
    """

    def __init__(
        self,
        commands: Mapping[bytes, type[Command]] | None = None,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys_per_box: int = DEFAULT_MAX_KEYS_PER_BOX,
        max_unclaimed_fds: int = DEFAULT_MAX_UNCLAIMED_FDS,
    ) -> None:
        self.commands: dict[bytes, type[Command]] = {}
        self.max_unclaimed_fds = max_unclaimed_fds
        self._switch_commands = False  # some command we answer switches protocols
        self._parser = BoxParser(max_box_size, max_keys_per_box)
        self._switch_tag: bytes | None = None  # our pending protocol switch call
        self._held: list[bytes] | None = None  # input held while we answer a switch
        self.switched = False
        self._locked = False  # our switch is pending or done: no AMP boxes out
        self._special = False  # the last box received needs a second look
        for command in (commands or {}).values():
            self.add_command(command)
        # File descriptors (Descriptor arguments): queued to send beside the next
        # bytes, and received ones by ordinal until an argument claims them.
        self._fds_out: list[int] = []
        self.fds_waiting = False  # fds_to_send() has descriptors
        self._fds_sent = 0
        self._fds_in: dict[int, int] = {}
        self._fds_received = 0
        self._counter = 0
        self._pending: dict[bytes, type[Command]] = {}
        self._abandoned: dict[bytes, None] = {}
        self._outbox: list[bytes] = []
        self.bytes_to_send = 0  # the length of what data_to_send() would return
        self.failed = False

    def add_command(self, command: type[Command]) -> None:
        """Answer ``command`` (by its name) on this connection."""
        self.commands[command.name] = command
        if command.switches_protocol:
            self._switch_commands = True
            self._parser.stop = self._stops_parsing

    # ------------------------------------------------------------------ output

    def send_call(self, command: type[Command], values: Mapping[str, Any]) -> bytes | None:
        """Queue a call; return its tag (``None`` when the command needs no answer).

        Raises :class:`ArgumentError` or :class:`TooLong` (nothing queued) on bad values.
        As in Twisted, a call without answer still consumes a tag number, and so
        does a call whose box cannot be framed (a value over 65,535 bytes or a key
        over 255): Twisted takes the tag before framing the box, but after encoding
        each argument (so a bad argument value consumes none). Raises
        :class:`ProtocolSwitched` once a protocol switch is pending or done.
        """
        if self._locked:
            raise ProtocolSwitched("this connection is switching protocols: no AMP calls")
        counter = self._counter + 1
        tag = b"%x" % counter if command.requires_answer else None
        fds: list[int] = []
        if not command.plain and command.argument_descriptors:
            values, fds = self._ordinals(command.argument_descriptors, values)
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
            if command.switches_protocol:
                self._switch_tag = tag
                self._locked = True
                self._parser.stop = self._stops_parsing
        if fds:
            self._queue_fds(fds)
        self._outbox.append(data)
        self.bytes_to_send += len(data)
        return tag

    def send_answer(self, tag: bytes, command: type[Command], values: Mapping[str, Any]) -> None:
        """Queue the answer to call ``tag``; raises (nothing queued) if ``values`` are invalid.

        While our protocol switch is pending, answers are dropped (as Twisted does).
        """
        if self._locked:
            return
        fds: list[int] = []
        if not command.plain and command.response_descriptors:
            values, fds = self._ordinals(command.response_descriptors, values)
        data = None
        plan = command.answer_plan
        if plan is not None and len(values) == len(command.response_specs):
            try:
                data = encode_planned(plan, values, (tag,))
            except Exception:
                data = None
        if data is None:
            box = command.encode_response(values)
            box[ANSWER] = tag
            data = encode_box(box)
        if fds:
            self._queue_fds(fds)
        self._outbox.append(data)
        self.bytes_to_send += len(data)

    def send_error(self, tag: bytes, code: bytes, description: str) -> None:
        """Queue an error answer to call ``tag`` (dropped while our switch is pending)."""
        if self._locked:
            return
        desc = description.encode("utf-8", "replace")[:0xFFFF]
        data = encode_box({ERROR: tag, ERROR_CODE: code, ERROR_DESCRIPTION: desc})
        self._outbox.append(data)
        self.bytes_to_send += len(data)

    # ---------------------------------------------------------- file descriptors

    def _ordinals(
        self, names: tuple[str, ...], values: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[int]]:
        """``values`` with each descriptor replaced by its ordinal (not yet committed)."""
        out = dict(values)
        fds: list[int] = []
        for name in names:
            fd = out.get(name)
            if fd is None:
                continue
            if type(fd) is not int or fd < 0:
                raise ArgumentError(f"{name!r} must be a file descriptor (an int >= 0)")
            out[name] = self._fds_sent + len(fds)
            fds.append(fd)
        return out, fds

    def _queue_fds(self, fds: list[int]) -> None:
        self._fds_out.extend(fds)
        self._fds_sent += len(fds)
        self.fds_waiting = True

    def fds_to_send(self) -> list[int]:
        """Return (and forget) the descriptors to send beside the next bytes.

        Send them before or with the bytes of :meth:`data_to_send` (``SCM_RIGHTS``);
        the caller keeps ownership of them.
        """
        fds, self._fds_out = self._fds_out, []
        self.fds_waiting = False
        return fds

    def receive_fds(self, fds: list[int]) -> list[Event]:
        """Descriptors received from the peer, in order; the connection owns them
        until an argument claims them (see :meth:`unclaimed_fds`).

        Returns ``[ProtocolViolation]`` once more than ``max_unclaimed_fds`` are held
        (close the connection and the descriptors), else ``[]``.
        """
        held = self._fds_in
        for fd in fds:
            held[self._fds_received] = fd
            self._fds_received += 1
        if len(held) <= self.max_unclaimed_fds or self.failed:
            return []
        self.failed = True
        return [
            ProtocolViolation(
                f"{len(held)} file descriptors received that no box claimed, over "
                f"max_unclaimed_fds ({self.max_unclaimed_fds})"
            )
        ]

    def unclaimed_fds(self) -> list[int]:
        """Return (and forget) received descriptors no argument claimed; close them."""
        fds = list(self._fds_in.values())
        self._fds_in.clear()
        return fds

    def _claim(self, names: tuple[str, ...], values: dict[str, Any]) -> None:
        claimed: list[tuple[int, int]] = []
        for name in names:
            ordinal = values.get(name)
            if ordinal is None:
                continue
            fd = self._fds_in.pop(ordinal, None)
            if fd is None:
                # Those claimed before stay unclaimed: closed with the rest, not leaked.
                self._fds_in.update(claimed)
                raise ArgumentError(f"no file descriptor #{ordinal} received for {name!r}")
            claimed.append((ordinal, fd))
            values[name] = fd

    def switch_accepted(self) -> bytes:
        """We answered a switch call: return the input held since, for the new protocol."""
        held = b"".join(self._held or [])
        self._held = None
        self.switched = self.failed = self._locked = True
        return held

    def switch_refused(self) -> list[Event]:
        """We answered a switch call with an error: parse the held input as AMP again."""
        held = b"".join(self._held or [])
        self._held = None
        return self.receive_data(held)

    @property
    def switch_pending(self) -> bool:
        """A switch call was received and not answered yet (input is held meanwhile)."""
        return self._held is not None

    def data_to_send(self) -> bytes:
        """Return (and forget) all bytes queued for the peer."""
        out = self._outbox
        if not out:
            return b""
        self._outbox = []
        self.bytes_to_send = 0
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
        if self._held is not None:
            self._held.append(data)
            return []
        parser = self._parser
        events: list[Event] = []
        # With a stop hook, parsing may halt after a switch box: then go on with the
        # rest, unless that box ended AMP input.
        may_stop = parser.stop is not None
        boxes = parser.feed(data)
        while not self._events_of(boxes, events) and may_stop and boxes:
            boxes = parser.feed(b"")
        return events

    def _events_of(self, boxes: list[Box], events: list[Event]) -> bool:
        """Append the events of ``boxes``; True when no more input must be parsed."""
        box_received = self._box_received
        append = events.append
        for box in boxes:
            event = box_received(box)
            append(event)
            if self._special:
                self._special = False
                if self._second_look(event, box is not boxes[-1], events):
                    return True
            elif type(event) is ProtocolViolation:
                self.failed = True
                return True
        parser = self._parser
        if parser.error is not None:
            self.failed = True
            events.append(ProtocolViolation(str(parser.error)))
            return True
        return False

    def _second_look(self, event: Event, more_boxes: bool, events: list[Event]) -> bool:
        """StartTLS and protocol-switch boxes; True when AMP input ends here."""
        parser = self._parser
        kind = type(event)
        command: type[Command] = event.command  # type: ignore[union-attr]
        if command is StartTLS:
            # After a StartTLS call or answer the next bytes are TLS (an error answer
            # leaves the connection as it was, and so does a call without _ask: no
            # answer is sent, so TLS never starts, as in Twisted).
            tls_follows = kind is not ErrorReceived and not (
                kind is CallReceived and event.tag is None  # type: ignore[union-attr]
            )
            if tls_follows and (more_boxes or parser.buffered or parser.error is not None):
                self.failed = True
                events.append(ProtocolViolation("data received after StartTLS"))
                return True
            return False
        tag: bytes | None = event.tag  # type: ignore[union-attr]
        if kind is CallReceived:
            if tag is not None:
                self._held = [parser.take_unparsed()]
                return True
        elif tag == self._switch_tag:
            self._switch_tag = None
            if kind is AnswerReceived:
                self.switched = self.failed = True
                events.append(Switched(parser.take_unparsed()))
                return True
            self._locked = False
            if not self._switch_commands:
                parser.stop = None
        return False

    def _stops_parsing(self, box: Box) -> bool:
        tag = self._switch_tag
        if tag is not None and (box.get(ANSWER) == tag or box.get(ERROR) == tag):
            return True
        name = box.get(COMMAND)
        if name is None or ASK not in box:
            return False
        command = self.commands.get(name)
        return command is not None and command.switches_protocol

    def _box_received(self, box: Box) -> Event:
        tag = box.get(ANSWER)
        if tag is not None:
            command = self._pending.pop(tag, None)
            if command is None:
                return self._unexpected(tag, "answer")
            if not command.plain:
                self._special = command.special
            try:
                response = command.decode_response(box)
                if not command.plain and command.response_descriptors:
                    self._claim(command.response_descriptors, response)
                return AnswerReceived(tag, command, response)
            except ArgumentError as exc:
                return ErrorReceived(tag, command, ArgumentError(f"invalid answer: {exc}"))
        tag = box.get(ERROR)
        if tag is not None:
            command = self._pending.pop(tag, None)
            if command is None:
                return self._unexpected(tag, "error")
            if not command.plain:
                self._special = command.special
            code = box.get(ERROR_CODE, UNKNOWN_ERROR_CODE)
            description = box.get(ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            return ErrorReceived(tag, command, self._remote_error(command, code, description))
        name = box.get(COMMAND)
        if name is None:
            return ProtocolViolation("box without _command, _answer or _error")
        ask = box.get(ASK)
        command = self.commands.get(name)
        if command is None:
            shown = repr(name[:_SHOWN_NAME]) + ("..." if len(name) > _SHOWN_NAME else "")
            return self._reject(ask, name, UNHANDLED_ERROR_CODE, f"Unhandled Command: {shown}")
        try:
            arguments = command.decode_arguments(box)
            if not command.plain and command.argument_descriptors:
                self._claim(command.argument_descriptors, arguments)
        except ArgumentError as exc:
            return self._reject(ask, name, UNKNOWN_ERROR_CODE, f"Invalid arguments: {exc}")
        if not command.plain:
            self._special = command.special
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
