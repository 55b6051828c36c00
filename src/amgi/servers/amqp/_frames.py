"""Content headers the client cannot read, read anyway (private; imports pamqp).

RabbitMQ passes on a content header (the basic properties and headers table) that pamqp,
under aiormq, fails to decode: a table field name that is not UTF-8 (at any depth), a
timestamp after the year 9999 (a header's or the ``timestamp`` property's), a short
string property (``content-type``, ``message-id`` ...) that is not UTF-8. The client then
failed the frame and dropped the whole connection, and the broker delivered the message
again on the next one: it blocked its queue (and every delivery in flight went back with
it) until someone removed it by hand.

On the server's own connections (:func:`lenient`, a context variable the connection's
reader task inherits) such a header is read again here, losslessly: an odd name stays
``bytes`` (AMGI header names are bytes), an odd short string too, a timestamp out of
range is its number. Other connections of the process, and every header pamqp reads,
are untouched. :class:`CopyProperties` writes those values back as they came, so a retry
or dead-letter copy keeps them.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

from pamqp import constants, decode, exceptions
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic, Connection
from pamqp.header import ContentHeader

logger = logging.getLogger("amgi.servers.amqp")


class Closed:
    """What the broker said closing a connection made in :func:`lenient`: the client
    reports a ``connection.close`` answering its ``connection.open`` (a virtual host
    refused, its connection limit reached) as an unexpected frame, the reply lost."""

    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply = ""


_LENIENT: contextvars.ContextVar[Closed | None] = contextvars.ContextVar(
    "amgi_amqp_lenient", default=None
)


@contextlib.contextmanager
def lenient() -> Iterator[Closed]:
    """Connections made inside read the content headers pamqp cannot (their tasks copy
    this context when the connection starts them); what the broker says as it closes
    one is kept in the :class:`Closed` yielded (the tasks share that object)."""
    closed = Closed()
    token = _LENIENT.set(closed)
    try:
        yield closed
    finally:
        _LENIENT.reset(token)


def ours() -> bool:
    """Whether this runs for one of the server's connections (made in :func:`lenient`:
    its tasks and their callbacks)."""
    return _LENIENT.get() is not None


class _Odd:
    """What a lenient read found that pamqp could not read (for the warning)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def note(self, what: str) -> None:
        if len(self.found) < 5:
            self.found.append(what)


def _short_str(data: bytes, at: int, odd: _Odd, what: str) -> tuple[str | bytes, int]:
    length = data[at]
    raw = data[at + 1 : at + 1 + length]
    if len(raw) != length:
        raise ValueError("short string truncated")
    try:
        return raw.decode(), at + 1 + length
    except UnicodeDecodeError:
        odd.note(f"{what} {raw!r:.80} is not UTF-8")
        return raw, at + 1 + length


def _timestamp(data: bytes, at: int, odd: _Odd, what: str) -> tuple[datetime.datetime | int, int]:
    (value,) = struct.unpack_from(">Q", data, at)
    seconds = value / 1000 if value > 0xFFFFFFFF else value  # as pamqp reads it
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC), at + 8
    except (ArithmeticError, OSError, ValueError):
        odd.note(f"{what} {value} is out of range")
        return value, at + 8


def _table(data: bytes, at: int, odd: _Odd) -> tuple[dict[Any, Any], int]:
    (length,) = struct.unpack_from(">I", data, at)
    end = at + 4 + length
    if end > len(data):
        raise ValueError("field table truncated")
    at += 4
    table: dict[Any, Any] = {}
    while at < end:
        key, at = _short_str(data, at, odd, "the header name")
        table[key], at = _value(data, at, odd, f"header {key!r:.80}")
    if at != end:
        raise ValueError("field table overruns its length")
    return table, end


def _array(data: bytes, at: int, odd: _Odd, what: str) -> tuple[list[Any], int]:
    (length,) = struct.unpack_from(">I", data, at)
    end = at + 4 + length
    if end > len(data):
        raise ValueError("field array truncated")
    at += 4
    items: list[Any] = []
    while at < end:
        item, at = _value(data, at, odd, what)
        items.append(item)
    if at != end:
        raise ValueError("field array overruns its length")
    return items, end


def _value(data: bytes, at: int, odd: _Odd, what: str) -> tuple[Any, int]:
    tag = data[at : at + 1]
    at += 1
    if tag == b"F":
        return _table(data, at, odd)
    if tag == b"A":
        return _array(data, at, odd, what)
    if tag == b"T":
        return _timestamp(data, at, odd, f"the timestamp of {what}")
    read: Callable[[bytes], tuple[int, Any]] | None = decode.TABLE_MAPPING.get(tag)
    if read is None:
        raise ValueError(f"unknown field type {tag!r}")
    used, value = read(data[at:])  # fixed sizes, or strings pamqp keeps as bytes
    if at + used > len(data):
        raise ValueError("field value truncated")
    return value, at + used


def _content_header(payload: bytes, odd: _Odd) -> ContentHeader:
    """The content header of ``payload`` (a header frame's), read leniently."""
    _class_id, weight, body_size = struct.unpack_from(">HHQ", payload)
    at, flags, word = 12, 0, 0
    while True:
        (part,) = struct.unpack_from(">H", payload, at)
        at += 2
        flags |= part << (16 * word)
        word += 1
        if not part & 1:
            break
    properties = Basic.Properties()
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        kind = getattr(Basic.Properties, "_" + name)
        value: Any
        if kind == "shortstr":
            value, at = _short_str(payload, at, odd, f"the {name.replace('_', '-')} property")
        elif kind == "table":
            value, at = _table(payload, at, odd)
        elif kind == "timestamp":
            value, at = _timestamp(payload, at, odd, "the timestamp property")
        elif kind == "octet":
            value, at = payload[at], at + 1
        else:  # pragma: no cover - Basic has no other property types
            raise ValueError(f"property {name} of type {kind}")
        setattr(properties, name, value)
    return ContentHeader(weight, body_size, properties)


_strict = pamqp_frame.unmarshal


def _unmarshal(data_in: bytes) -> tuple[int, int, pamqp_frame.FrameTypes]:
    """pamqp's ``frame.unmarshal``; on the server's connections, a content header it
    cannot read is read by :func:`_content_header` instead (else its error stands)."""
    try:
        read = _strict(data_in)
    except (exceptions.UnmarshalingException, ArithmeticError):
        data = data_in
        if not ours() or data[:1] != bytes([constants.FRAME_HEADER]):
            raise
        channel, size = struct.unpack_from(">HI", data, 1)
        odd = _Odd()
        header: ContentHeader | None = None
        with contextlib.suppress(ValueError, struct.error, IndexError):
            header = _content_header(data[7 : 7 + size], odd)
        if header is None:
            raise  # pamqp's error stands: the client drops the connection as before
        logger.warning(
            "amqp: a delivery on channel %d has a content header the client cannot read "
            "(%s); read as bytes instead",
            channel,
            "; ".join(odd.found) or "unknown cause",
        )
        return constants.FRAME_HEADER_SIZE + size + 1, channel, header
    frame = read[2]
    if isinstance(frame, Connection.Close):
        closed = _LENIENT.get()
        if closed is not None:
            closed.reply = str(frame.reply_text or "")
    return read


def install() -> None:
    """Put :func:`_unmarshal` in place of pamqp's (once; aiormq looks it up per frame)."""
    if pamqp_frame.unmarshal is not _unmarshal:
        pamqp_frame.unmarshal = _unmarshal


class CopyProperties(Basic.Properties):
    """Basic properties of a copy (retry, dead letter, replay) that writes a value read
    by :func:`_content_header` back as it came: a short string kept as ``bytes``, a
    timestamp kept as its number (pamqp refuses both)."""

    def encode_property(self, name: str, value: Any) -> bytes:
        kind = self.amqp_type(name)
        if kind == "shortstr" and isinstance(value, bytes):
            return struct.pack(">B", len(value)) + value
        if kind == "timestamp" and type(value) is int:
            return struct.pack(">Q", value)
        return super().encode_property(name, value)
