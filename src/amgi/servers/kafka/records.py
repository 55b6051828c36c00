"""How one Kafka record maps onto an AMGI :class:`~amgi.transport.Message`.

Pure functions, no client library: shared by the Kafka server and the Lambda Kafka adapter.

===================  ==========================================================
Kafka record         AMGI
===================  ==========================================================
topic, partition,    ``Message.id`` as ``topic/partition/offset`` (the topic the record
offset               was read from: a retry topic's own for a retry copy), the same on
                     every redelivery; the offset is ``Message.token``
value                ``payload`` (``None`` for a tombstone)
headers              ``headers`` as ``(bytes, bytes)`` pairs, minus ``amgi-attempt``
                     (and on a retry topic the retry copy's own, below); ``amgi-b64``
                     unpacked
key                  ``bindings["kafka"]["key"]`` (bytes or ``None``)
partition, offset    ``bindings["kafka"]["partition"]``, ``["offset"]``
timestamp            ``bindings["kafka"]["timestamp"]`` (ms since the epoch)
``amgi-attempt``     ``Message.attempt`` (1 when absent)
===================  ==========================================================

``amgi-original-address``, ``amgi-retry-due`` and ``amgi-retry-group`` are the server's only
on the records of a retry topic (:func:`retry_messages_from_records`); on any other topic
they are headers like the rest. The server's retry copies and dead letters carry an
application's own header of such a name (or ``amgi-attempt``, ``amgi-dead-letter-reason``)
packed (:func:`record_headers` with ``reserved``), so it arrives back as it was sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from amgi.servers.kit import (
    ATTEMPT_HEADER,
    DEAD_LETTER_REASON_HEADER,
    ORIGINAL_ADDRESS_HEADER,
    PACKED_HEADER,
    PACKED_HEADER_BYTES,
    pack_header,
    split_dead_letter_headers,
    unpack_header,
)
from amgi.transport import HeaderList, Message

__all__ = [
    "RETRY_DUE_HEADER",
    "RETRY_GROUP_HEADER",
    "SERVER_HEADERS",
    "ClientRecord",
    "InternalHeaders",
    "message_from_record",
    "messages_from_records",
    "record_headers",
    "retry_messages_from_records",
    "split_dead_letter",
    "split_internal_headers",
]

RETRY_DUE_HEADER = b"amgi-retry-due"
"""On a record of a retry topic: when (ms since the epoch) it may be delivered again."""

RETRY_GROUP_HEADER = b"amgi-retry-group"
"""On a record of a retry topic: the consumer group that made it. Every group of a topic
shares its retry topic; each group takes only its own copies."""

SERVER_HEADERS = frozenset(
    {
        ATTEMPT_HEADER,
        ORIGINAL_ADDRESS_HEADER,
        RETRY_DUE_HEADER,
        RETRY_GROUP_HEADER,
        DEAD_LETTER_REASON_HEADER,
    }
)
"""The names the server gives a meaning to on its retry copies and dead letters: an
application's own header of such a name travels packed on them."""

RawHeaders = Iterable[tuple[str | bytes, bytes | None]] | None


class InternalHeaders:
    """AMGI's own headers found on a record, split off what the application sees."""

    __slots__ = ("attempt", "due_ms", "group", "headers", "original_address")

    def __init__(
        self,
        headers: HeaderList,
        attempt: int,
        original_address: str | None,
        due_ms: int | None,
        group: bytes | None = None,
    ) -> None:
        self.headers = headers
        self.attempt = attempt
        self.original_address = original_address
        self.due_ms = due_ms
        self.group = group


def _as_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    return value


def split_internal_headers(raw: RawHeaders, *, retry: bool = True) -> InternalHeaders:
    """Normalise ``raw`` headers to bytes and split off the attempt/retry headers, and
    unpack packed ones. ``retry=False`` (a record of a topic that is no retry topic):
    only the attempt is the server's; a header named like a retry header is the
    application's."""
    headers: HeaderList = []
    attempt = 1
    original: str | None = None
    due: int | None = None
    group: bytes | None = None
    if raw:
        for name, value in raw:
            n = _as_bytes(name)
            v = _as_bytes(value)
            if n == ATTEMPT_HEADER:
                try:
                    attempt = max(1, int(v))
                except ValueError:
                    attempt = 1
            elif not retry and n in _RETRY:
                headers.append((n, v))
            elif n == ORIGINAL_ADDRESS_HEADER:
                original = v.decode("utf-8", "replace")
            elif n == RETRY_DUE_HEADER:
                try:
                    due = int(v)
                except ValueError:
                    due = None
            elif n == RETRY_GROUP_HEADER:
                group = v
            elif n == PACKED_HEADER_BYTES and (unpacked := unpack_header(v)) is not None:
                headers.append(unpacked)
            else:
                headers.append((n, v))
    return InternalHeaders(headers, attempt, original, due, group)


_RETRY = frozenset({ORIGINAL_ADDRESS_HEADER, RETRY_DUE_HEADER, RETRY_GROUP_HEADER})
_INTERNAL = frozenset({ATTEMPT_HEADER, PACKED_HEADER_BYTES})
"""The names a record of a topic that is no retry topic gives a meaning to."""
_PAIRS: dict[str | bytes, tuple[bytes, bytes]] = {}
"""Per header name seen before (``_INTERNAL`` names never): the last ``(name, value)`` pair
made for it. Tuples are immutable, so records whose header repeats the value (a content
type, say) share one pair instead of allocating one each; a new value makes a new pair."""


def _learn_headers(headers: Iterable[tuple[str | bytes, bytes | None]]) -> tuple[HeaderList, int]:
    """Slow path of the mapping: new names, or ``_INTERNAL`` ones."""
    split = split_internal_headers(headers, retry=False)
    if len(_PAIRS) < 10_000:
        for name, _ in headers:
            n = _as_bytes(name)
            if n not in _INTERNAL and name not in _PAIRS:
                _PAIRS[name] = (n, b"")
    return split.headers, split.attempt


def _pairs(headers: RawHeaders) -> tuple[HeaderList, int]:
    """``headers`` as ``(bytes, bytes)`` pairs, and the attempt they carry."""
    hdrs: HeaderList = []
    if not headers:
        return hdrs, 1
    if type(headers) is not list and type(headers) is not tuple:
        headers = list(headers)
    pairs = _PAIRS
    try:  # fast path: every name seen before and none of them AMGI's own
        for name, v in headers:
            pair = pairs[name]
            if pair[1] != v:
                pair = pairs[name] = (pair[0], v or b"")
            hdrs.append(pair)
    except KeyError:
        return _learn_headers(headers)
    return hdrs, 1


def record_headers(
    headers: Iterable[tuple[str | bytes, bytes]], reserved: frozenset[bytes] = frozenset()
) -> list[tuple[str, bytes]]:
    """AMGI headers as Kafka record headers, whose names are UTF-8 text: a name that is
    not travels packed (:data:`~amgi.servers.kit.PACKED_HEADER`), not mangled, and so does
    a header named like the packed one, or one of ``reserved`` (bytes names)."""
    out: list[tuple[str, bytes]] = []
    for name, value in headers:
        text: str | None
        if isinstance(name, str):
            text = name
        else:
            try:
                text = name.decode()
            except UnicodeDecodeError:
                text = None
        raw = name.encode() if isinstance(name, str) else name
        if text is None or text == PACKED_HEADER or raw in reserved:
            out.append((PACKED_HEADER, pack_header(raw, value).encode()))
        else:
            out.append((text, value))
    return out


def message_from_record(
    topic: str,
    partition: int,
    offset: int,
    timestamp: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: RawHeaders,
) -> Message:
    """Build the :class:`Message` the application sees for one Kafka record.

    ``headers`` may carry ``str`` or ``bytes`` names and ``None`` values (as Kafka clients
    return them). ``topic`` is not part of the message: it is the scope address.
    """
    hdrs, attempt = _pairs(headers)
    return _message(topic, partition, offset, timestamp, key, value, hdrs, attempt)


def _message(
    topic: str,
    partition: int,
    offset: int,
    timestamp: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: HeaderList,
    attempt: int,
) -> Message:
    """The :class:`Message` of one record whose headers are already mapped."""
    bindings = {
        "kafka": {"key": key, "partition": partition, "offset": offset, "timestamp": timestamp}
    }
    return Message(f"{topic}/{partition}/{offset}", headers, value, bindings, attempt, offset)


def split_dead_letter(raw: RawHeaders) -> tuple[InternalHeaders, str]:
    """A dead letter's headers: the application's (unpacked), its attempt and original
    address, and the reason. The server's headers are taken before the packed ones are
    unpacked, so an application's own header of such a name stays the application's."""
    pairs = [(_as_bytes(n), _as_bytes(v)) for n, v in raw or ()]
    own, reason, address = split_dead_letter_headers(pairs)
    split = split_internal_headers(own, retry=False)
    split.original_address = address or None
    return split, reason


class ClientRecord(Protocol):
    """A consumed record as confluent-kafka hands it out."""

    def offset(self) -> int: ...
    def timestamp(self) -> tuple[int, int]: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...


def messages_from_records(
    topic: str, partition: int, records: Sequence[ClientRecord]
) -> list[Message]:
    """:func:`message_from_record` for a run of one partition's client records.

    The same mapping in one loop, for the consumer's hot path: no call per record
    (:func:`_pairs` inlined).
    """
    prefix = f"{topic}/{partition}/"
    pairs = _PAIRS
    out: list[Message] = []
    append = out.append
    for r in records:
        offset = r.offset()
        kind, ts = r.timestamp()
        raw = r.headers()
        attempt = 1
        hdrs: HeaderList = []
        if raw:
            try:
                for name, v in raw:  # a loop, not a comprehension: no call per record
                    pair = pairs[name]
                    if pair[1] != v:
                        pair = pairs[name] = (pair[0], v or b"")
                    hdrs.append(pair)
            except KeyError:
                hdrs, attempt = _learn_headers(raw)
        bindings = {
            "kafka": {
                "key": r.key(),
                "partition": partition,
                "offset": offset,
                "timestamp": ts if kind else None,
            }
        }
        append(Message(f"{prefix}{offset}", hdrs, r.value(), bindings, attempt, offset))
    return out


def retry_messages_from_records(
    topic: str, partition: int, records: Sequence[ClientRecord]
) -> list[Message]:
    """:func:`messages_from_records` for the records of a retry topic (the server's own
    copies), whose retry headers are the server's: split off, never the application's."""
    out: list[Message] = []
    for r in records:
        kind, ts = r.timestamp()
        split = split_internal_headers(r.headers())
        out.append(
            _message(
                topic,
                partition,
                r.offset(),
                ts if kind else None,
                r.key(),
                r.value(),
                split.headers,
                split.attempt,
            )
        )
    return out
