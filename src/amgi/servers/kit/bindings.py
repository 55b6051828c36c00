"""The binding keys of every protocol: one table, named after AsyncAPI's message bindings.

Bindings carry what a protocol knows about a message beyond headers and payload
(``scope["bindings"]`` on receive, ``bindings`` of a ``message.send``). Where AsyncAPI
names a property (MQTT's ``correlationData``, AMQP's ``contentEncoding``) the key is that
name; properties AsyncAPI does not name keep the broker's own spelling (SQS). A server
emits and reads only keys listed here, ``amgi send --binding`` accepts only these, and
docs/spec.md shows this table (:func:`markdown_table`); a test holds all three to it.

Adding a protocol: add its keys to :data:`BINDINGS` (direction ``"in"`` for keys only
received, ``"out"`` for keys only read on a send, ``"both"`` otherwise).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BINDINGS",
    "BadBinding",
    "BindingKey",
    "UnknownBinding",
    "binding_key",
    "markdown_table",
    "parse",
    "text_value",
    "unknown_keys",
    "whole_number",
]

Direction = Literal["in", "out", "both"]


@dataclass(frozen=True, slots=True)
class BindingKey:
    """One key of one protocol's bindings."""

    name: str
    type: str
    """The value's type in words (``int``, ``bytes``, ``str`` ...)."""
    direction: Direction
    """``in``: set on received messages; ``out``: read on a send; ``both``."""
    doc: str

    @property
    def is_bytes(self) -> bool:
        """True when the value is bytes (a text given on the command line is encoded UTF-8)."""
        return self.type == "bytes"


def _keys(*keys: BindingKey) -> dict[str, BindingKey]:
    return {k.name: k for k in keys}


BINDINGS: dict[str, dict[str, BindingKey]] = {
    "amgi": _keys(
        BindingKey("attempt", "int", "in", "this delivery's number, starting at 1"),
    ),
    "kafka": _keys(
        BindingKey("key", "bytes", "both", "the record key (None when absent)"),
        BindingKey("partition", "int", "both", "the partition it came from / goes to"),
        BindingKey("offset", "int", "in", "the record's offset in its partition"),
        BindingKey("timestamp", "int", "in", "the record timestamp, ms since the epoch"),
    ),
    "amqp": _keys(
        BindingKey("exchange", "str", "both", "exchange it was published to / to publish to"),
        BindingKey("routingKey", "str", "both", "routing key (default on send: the address)"),
        BindingKey("redelivered", "bool", "in", "the broker's redelivered flag"),
        BindingKey("mandatory", "bool", "out", "refuse an unroutable send (default true)"),
        BindingKey("contentType", "str", "both", "content-type property"),
        BindingKey("contentEncoding", "str", "both", "content-encoding property"),
        BindingKey("correlationId", "str", "both", "correlation-id property"),
        BindingKey("replyTo", "str", "both", "reply-to property"),
        BindingKey("messageId", "str", "both", "message-id property"),
        BindingKey("messageType", "str", "both", "type property"),
        BindingKey("userId", "str", "both", "user-id property"),
        BindingKey("appId", "str", "both", "app-id property"),
        BindingKey("priority", "int", "both", "priority property, 0-255"),
        BindingKey("deliveryMode", "int", "both", "1 transient, 2 persistent"),
        BindingKey("expiration", "int or str", "both", "per-message TTL, ms"),
        BindingKey("timestamp", "int", "both", "timestamp property, seconds since the epoch"),
    ),
    "mqtt": _keys(
        BindingKey("qos", "int", "both", "quality of service, 0, 1 or 2"),
        BindingKey("retain", "bool", "both", "the retain flag"),
        BindingKey("topic", "str", "in", "the topic it was published to"),
        BindingKey("messageExpiryInterval", "int", "both", "MQTT 5 expiry, seconds"),
        BindingKey("contentType", "str", "both", "MQTT 5 content type"),
        BindingKey("correlationData", "bytes", "both", "MQTT 5 correlation data"),
        BindingKey("responseTopic", "str", "both", "MQTT 5 response topic"),
        BindingKey("payloadFormatIndicator", "int", "both", "MQTT 5: 0 bytes, 1 UTF-8 text"),
    ),
    "sqs": _keys(
        BindingKey("message_id", "str", "in", "the MessageId SQS assigned"),
        BindingKey("attributes", "dict", "in", "the message's system attributes"),
        BindingKey("attribute_types", "dict", "both", "header name -> SQS data type"),
        BindingKey("message_group_id", "str", "both", "FIFO message group"),
        BindingKey("message_deduplication_id", "str", "both", "FIFO deduplication id"),
        BindingKey("sequence_number", "str", "in", "FIFO sequence number"),
        BindingKey("delay_seconds", "int", "out", "delivery delay, 0-900 seconds"),
    ),
    "googlepubsub": _keys(
        BindingKey("messageId", "str", "in", "the Pub/Sub message id (HTTP push)"),
        BindingKey("publishTime", "str", "in", "when Pub/Sub took the message, RFC 3339"),
        BindingKey("orderingKey", "str", "in", "the message's ordering key, when it has one"),
        BindingKey("subscription", "str", "in", "the pushing subscription's full name"),
    ),
    "redis": _keys(
        BindingKey("stream", "str", "in", "the stream the entry came from (streams mode)"),
        BindingKey("id", "str", "in", "the stream entry id, the same on every redelivery"),
        BindingKey("channel", "str", "in", "the channel it came from (Pub/Sub mode)"),
        BindingKey("maxlen", "int", "out", "trim the stream to about this many entries"),
    ),
    "nats": _keys(
        BindingKey("subject", "str", "in", "the subject it was published to"),
        BindingKey("stream", "str", "in", "the JetStream stream holding it"),
        BindingKey("sequence", "int", "in", "its stream sequence, the same on redelivery"),
        BindingKey("msgId", "str", "both", "Nats-Msg-Id, for JetStream de-duplication"),
    ),
}
"""Protocol -> key -> :class:`BindingKey`."""


class UnknownBinding(ValueError):
    """A binding key that is not in :data:`BINDINGS` for its protocol."""


def binding_key(protocol: str, key: str) -> BindingKey:
    """The table entry of ``protocol.key``; :class:`UnknownBinding` if there is none."""
    keys = BINDINGS.get(protocol)
    if keys is None:
        known = ", ".join(BINDINGS)
        raise UnknownBinding(f"unknown binding protocol {protocol!r} (known: {known})")
    try:
        return keys[key]
    except KeyError:
        raise UnknownBinding(
            f"{protocol} has no binding {key!r} (known: {', '.join(keys)})"
        ) from None


def parse(protocol: str, key: str, raw: str) -> Any:
    """The value of ``protocol.key`` written as text (``amgi send --binding``).

    A ``str`` or ``bytes`` key takes the text as it is (``messageId=123`` is the text
    ``"123"``), unless it is a JSON string (``'"a b"'``, unquoted) or ``null`` (no value);
    bytes are the text encoded UTF-8. Any other key takes JSON if the text parses, else
    the text. Raises :class:`UnknownBinding` for a key that is not in the table or one
    only ever received (``in``), :class:`BadBinding` for bytes that are no valid text.
    """
    entry = binding_key(protocol, key)
    if entry.direction == "in":
        raise UnknownBinding(f"{protocol}.{key} is set by the server on receive, not sent")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if entry.type in ("str", "bytes") and value is not None and not isinstance(value, str):
        value = raw
    if entry.is_bytes and isinstance(value, str):
        try:  # bytes the shell passed that are not UTF-8 stand for themselves
            value = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:  # a lone surrogate written as a JSON escape
            raise BadBinding(
                f"{protocol}.{key} is no valid text ({exc.reason} at character {exc.start})"
            ) from None
    return value


class BadBinding(ValueError):
    """A sent binding value its protocol cannot carry; the message names key and rule."""


def whole_number(protocol: str, key: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an int from ``low`` to ``high`` (not a bool, float or text).

    Raises :class:`BadBinding` otherwise: a server checks a sent binding before any of
    it reaches the client library, so a bad value fails that one send with one clear
    message instead of being rounded, coerced or refused half-way.
    """
    if type(value) is not int or not low <= value <= high:
        raise BadBinding(
            f"{protocol}.{key} must be a whole number from {low} to {high}, not {value!r:.60}"
        )
    return value


def text_value(protocol: str, key: str, value: Any, *, pattern: re.Pattern[str], rule: str) -> str:
    """``value`` if it is a str that ``pattern`` matches whole; else :class:`BadBinding`
    saying ``{protocol}.{key} must be {rule}``."""
    if type(value) is not str or not pattern.fullmatch(value):
        if not isinstance(value, str):
            shown = type(value).__name__
        elif len(value) > 60:
            shown = f"a text of {len(value)} characters"
        else:
            shown = repr(value)
        raise BadBinding(f"{protocol}.{key} must be {rule}, not {shown}")
    return value


def unknown_keys(bindings: Mapping[str, Mapping[str, Any]], *, sent: bool = False) -> list[str]:
    """``protocol.key`` names in ``bindings`` that the table does not list.

    With ``sent=True`` the bindings are those of a send, where receive-only keys are
    unknown too.
    """
    out = []
    for protocol, values in bindings.items():
        keys = BINDINGS.get(protocol, {})
        for key in values:
            entry = keys.get(key)
            if entry is None or (sent and entry.direction == "in"):
                out.append(f"{protocol}.{key}")
    return out


def markdown_table() -> str:
    """The table as Markdown, one row per protocol: ``in:``, ``out:`` and both-way keys."""
    rows = ["| binding | received and sent | received only | sent only |", "|---|---|---|---|"]
    for protocol, keys in BINDINGS.items():
        cells = []
        for direction in ("both", "in", "out"):
            names = [f"`{k.name}`" for k in keys.values() if k.direction == direction]
            cells.append(", ".join(names))
        rows.append(f"| `{protocol}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
