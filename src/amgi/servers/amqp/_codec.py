"""AMQP header tables and basic properties <-> AMGI headers and bindings (private)."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from amgi.servers.kit import (
    ATTEMPT_HEADER,
    PACKED_HEADER,
    PACKED_HEADER_BYTES,
    pack_header,
    unpack_header,
)
from amgi.transport import HeaderList, Message

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage
    from pamqp.commands import Basic

logger = logging.getLogger("amgi.servers.amqp")


_ATTEMPT_KEY = ATTEMPT_HEADER.decode()


_DELIVERY_COUNT_KEY = "x-delivery-count"


_ORDER_KEY = "amgi-header-order"


ORIGIN_KEYS = ("amgi-original-exchange", "amgi-original-routing-key")
"""The exchange and routing key a message first came by, in the table of its copies
(retries, dead letters, replays), which reach the queue through the default exchange:
its bindings name them again, so the copy routes in the application as the message did."""


_MAX_KEY = 128
"""The longest table key, in bytes (AMQP 0-9-1's field names; pamqp cuts longer ones)."""


_BROKER_KEYS = frozenset(
    {
        _ATTEMPT_KEY,
        _DELIVERY_COUNT_KEY,
        _ORDER_KEY,
        *ORIGIN_KEYS,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


_ROUTES = frozenset({"CC", "BCC"})
"""Headers RabbitMQ reads as more routing keys (sender-selected distribution): it routes
copies to the queues they name, removes ``BCC``, and closes the channel over a value
that is not an array."""


def _header_value(value: Any) -> Iterable[bytes]:
    """The AMGI header values of one AMQP table value (an array repeats the name)."""
    if isinstance(value, str):
        yield value.encode()
    elif isinstance(value, bytes | bytearray):
        yield bytes(value)
    elif isinstance(value, list):
        for item in value:
            yield from _header_value(item)
    else:
        yield str(value).encode()


def _table_value(value: bytes) -> str | bytearray:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return bytearray(value)


def headers_to_table(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """AMGI headers as an AMQP headers table; a repeated name becomes an array.

    RabbitMQ hands tables out sorted by name, so when the names are not in that order
    the original order travels in an ``amgi-header-order`` array.
    """
    table: dict[str, Any] = {}
    names: list[str] = []
    for name, value in headers:
        item: str | bytearray
        key: str | None
        try:
            key = name.decode()
        except UnicodeDecodeError:
            key = None
        if key is None or len(name) > _MAX_KEY or key == PACKED_HEADER or key in _ROUTES:
            # A table key is UTF-8 of at most 128 bytes; the packed name itself is packed
            # so that an application's header of that name arrives as it was sent, and
            # so are the names RabbitMQ routes by.
            key, item = PACKED_HEADER, pack_header(name, value)
        else:
            item = _table_value(value)
        if key not in _BROKER_KEYS:
            names.append(key)
        if key in table:
            previous = table[key]
            if isinstance(previous, list):
                previous.append(item)
            else:
                table[key] = [previous, item]
        else:
            table[key] = item
    if any(a > b for a, b in itertools.pairwise(names)):
        table[_ORDER_KEY] = names
    return table


def table_to_headers(
    table: dict[Any, Any] | None, *, delivery_count: bool = True
) -> tuple[int, HeaderList]:
    """Split an AMQP headers table into ``(attempt, AMGI headers)``; a name that is not
    UTF-8 (read by :mod:`._frames`) is a ``bytes`` key and stays as it came. With
    ``delivery_count`` false, ``x-delivery-count`` adds nothing to the attempt (it is no
    count of the broker's there)."""
    if not table:
        return 1, []
    headers: HeaderList = []
    attempt = 1
    for key, value in table.items():
        if key in _BROKER_KEYS:
            if key == _ATTEMPT_KEY:
                attempt += _attempt_value(value) - 1
            elif key == _DELIVERY_COUNT_KEY and delivery_count and isinstance(value, int):
                attempt += value
            continue
        name = key if isinstance(key, bytes) else key.encode()
        headers.extend((name, v) for v in _header_value(value))
    order = table.get(_ORDER_KEY)
    if isinstance(order, list):
        headers = _reorder(headers, order)
    if PACKED_HEADER in table:
        headers = [
            (unpack_header(v) or (n, v)) if n == PACKED_HEADER_BYTES else (n, v) for n, v in headers
        ]
    return attempt, headers


def _reorder(headers: HeaderList, order: list[Any]) -> HeaderList:
    """``headers`` in the name order of ``order`` (unknown or extra names go last)."""
    by_name: dict[bytes, deque[bytes]] = {}
    for name, value in headers:
        by_name.setdefault(name, deque()).append(value)
    out: HeaderList = []
    for item in order:
        if isinstance(item, str):
            name = item.encode()
        elif isinstance(item, bytes | bytearray):
            name = bytes(item)
        else:  # not a name (another publisher's array): bytes(-1) raised, bytes(10**9) ...
            continue
        values = by_name.get(name)
        if values:
            out.append((name, values.popleft()))
    out.extend((name, v) for name, values in by_name.items() for v in values)
    return out


def _attempt_value(value: Any) -> int:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    try:
        return max(1, int(value))
    except (TypeError, ValueError, OverflowError):  # (OverflowError: an infinite float)
        return 1


_MAX_TTL_MS = 315_360_000_000
"""The longest per-message TTL RabbitMQ takes (ten years, in ms)."""

_MAX_TIMESTAMP = 2**32 - 1
"""The latest ``timestamp`` property that reads back as sent (pamqp takes a larger value
for milliseconds)."""

_DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queue: a ``reply-to`` the publisher must consume."""

_OCTETS = frozenset({"priority", "delivery_mode"})
"""Properties that are one octet on the wire (the rest of ``_PROPERTY_BINDINGS`` are
short strings, at most 255 bytes)."""

_PROPERTY_BINDINGS = (
    ("content_type", "contentType"),
    ("content_encoding", "contentEncoding"),
    ("correlation_id", "correlationId"),
    ("reply_to", "replyTo"),
    ("message_id", "messageId"),
    ("message_type", "messageType"),
    ("user_id", "userId"),
    ("app_id", "appId"),
    ("priority", "priority"),
    ("delivery_mode", "deliveryMode"),
)


def delivery_bindings(delivered: DeliveredMessage) -> dict[str, Any]:
    """The ``amqp`` bindings of a delivery: routing data and basic properties."""
    delivery = delivered.delivery
    props = delivered.header.properties
    exchange, routing_key = origin(delivered) or (
        getattr(delivery, "exchange", ""),
        getattr(delivery, "routing_key", ""),
    )
    out: dict[str, Any] = {
        "exchange": exchange,
        "routingKey": routing_key,
        "redelivered": bool(getattr(delivery, "redelivered", False)),
    }
    for attr, key in _PROPERTY_BINDINGS:
        value = getattr(props, attr)
        if value is not None:
            out[key] = value  # bytes when not UTF-8 (another client's)
    if props.expiration is not None:
        out["expiration"] = (
            int(props.expiration) if props.expiration.isdigit() else props.expiration
        )
    if props.timestamp is not None:
        stamp: datetime.datetime | int = props.timestamp  # int: after the year 9999
        out["timestamp"] = stamp if isinstance(stamp, int) else int(stamp.timestamp())
    return out


def origin(delivered: DeliveredMessage) -> tuple[str, str] | None:
    """The exchange and routing key ``delivered`` is a copy of a message sent by
    (:data:`ORIGIN_KEYS`), or ``None``."""
    table = delivered.header.properties.headers or {}
    exchange, routing_key = (table.get(key) for key in ORIGIN_KEYS)
    if isinstance(exchange, str) and isinstance(routing_key, str):
        return exchange, routing_key
    return None


def publish_properties(
    headers: Iterable[tuple[bytes, bytes]], binding: dict[str, Any]
) -> Basic.Properties:
    """Basic properties of an outgoing message from AMGI headers and ``amqp`` bindings."""
    from pamqp.commands import Basic

    kwargs: dict[str, Any] = {"delivery_mode": 2}
    for attr, key in _PROPERTY_BINDINGS:
        value = binding.get(key)
        if value is None:
            continue
        if attr in _OCTETS:
            if type(value) is not int or not 0 <= value <= 255:
                raise ValueError(f"{key} must be an int from 0 to 255, not {value!r:.60}")
        elif type(value) is not str:
            raise ValueError(f"{key} must be a str, not {type(value).__name__}")
        elif len(value.encode()) > 255:
            raise ValueError(f"{key} must be at most 255 bytes (UTF-8), not {len(value.encode())}")
        kwargs[attr] = value
    if kwargs.get("reply_to") == _DIRECT_REPLY_TO:
        # The broker closes the channel (at times the connection) over it.
        raise ValueError(
            f"replyTo {_DIRECT_REPLY_TO!r} (direct reply-to) needs a consumer of it on the "
            "publishing channel, which this server does not have"
        )
    expiration = binding.get("expiration")
    if expiration is not None:
        # The broker closes the channel over any other TTL: check it here instead.
        text = str(expiration) if type(expiration) in (int, str) else ""
        if not (text.isascii() and text.isdigit() and int(text) <= _MAX_TTL_MS):
            raise ValueError(
                f"expiration must be a TTL in whole ms, 0 to {_MAX_TTL_MS} (ten years), "
                f"not {expiration!r:.60}"
            )
        kwargs["expiration"] = text
    timestamp = binding.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, datetime.datetime):
            if type(timestamp) not in (int, float):
                raise ValueError(
                    f"timestamp must be seconds since the epoch, not {timestamp!r:.60}"
                )
            try:
                timestamp = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
            except (OverflowError, OSError, ValueError):
                raise ValueError(f"timestamp {timestamp!r} is out of range") from None
        if timestamp.utcoffset() is None:
            timestamp = timestamp.replace(tzinfo=datetime.UTC)  # as the client reads it
        seconds = int(timestamp.timestamp())
        if not 0 <= seconds <= _MAX_TIMESTAMP:
            # The client cannot write one before 1970 (a bare struct.error), and reads one
            # after 2106 back as milliseconds.
            raise ValueError(
                f"timestamp {seconds} is out of range (0 to {_MAX_TIMESTAMP} seconds since "
                "the epoch: 1970 to 2106)"
            )
        kwargs["timestamp"] = timestamp
    table = headers_to_table(headers)
    if table:
        kwargs["headers"] = table
    return Basic.Properties(**kwargs)


def broker_counted(delivered: DeliveredMessage, counts: bool) -> bool:
    """Whether the ``x-delivery-count`` of ``delivered`` is the broker's: its queue may
    count deliveries (``counts``: a quorum queue, or one of unknown type) and this is a
    redelivery (a quorum queue counts from 0, and flags every later delivery). Else a
    publisher wrote it (a message forwarded with its headers from a quorum queue)."""
    return counts and bool(getattr(delivered.delivery, "redelivered", False))


def _message(delivered: DeliveredMessage, counts: bool = True) -> Message:
    """The message of ``delivered``; ``counts``: whether its queue may count deliveries."""
    props = delivered.header.properties
    try:
        attempt, headers = table_to_headers(
            props.headers, delivery_count=broker_counted(delivered, counts)
        )
    except Exception as exc:  # a table no AMGI server wrote: the message comes all the same
        logger.warning("the headers of a delivery could not be read (%s): it comes without", exc)
        attempt, headers = 1, []
    return Message(
        stable_id(props.message_id, headers, delivered.body),
        headers,
        delivered.body,
        {"amqp": delivery_bindings(delivered)},
        attempt,
        delivered,
    )


def stable_id(message_id: str | bytes | None, headers: HeaderList, body: bytes) -> str:
    """The id of a delivery that stays the same when the broker delivers it again.

    A hash of the ``message-id`` property (when the publisher set one), the headers and
    the body: delivery tags change on every delivery, and publishers may leave
    ``message-id`` unset or reuse it. Identical messages get the same id; a batch tells
    them apart (:func:`unique_ids`).
    """
    digest = hashlib.blake2b(body, digest_size=12)
    for name, value in headers:
        digest.update(b"\0%d:%b=%d:%b" % (len(name), name, len(value), value))
    if message_id:
        if isinstance(message_id, str):
            message_id = message_id.encode("utf-8", "replace")
        digest.update(b"\0id=" + message_id)
    return digest.hexdigest()


def unique_ids(messages: list[Message]) -> list[Message]:
    """Suffix ``#2``, ``#3`` ... to ids repeated within one batch (identical messages)."""
    seen: dict[str, int] = {}
    for m in messages:
        n = seen.get(m.id, 0) + 1
        seen[m.id] = n
        if n > 1:
            m.id = f"{m.id}#{n}"
    return messages
