"""The headers a server adds when it retries or dead-letters a message by republishing.

One order and one encoding everywhere: the application's headers (without any earlier
``amgi-attempt``), then ``amgi-attempt``, then what the case adds (``amgi-original-address``
and ``amgi-dead-letter-reason`` for a dead letter). Text is UTF-8; a reason that cannot
be encoded (lone surrogates) is encoded with replacement characters rather than failing.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

__all__ = [
    "ATTEMPT_HEADER",
    "DEAD_LETTER_REASON_HEADER",
    "ORIGINAL_ADDRESS_HEADER",
    "PACKED_HEADER",
    "PACKED_HEADER_BYTES",
    "attempt_from_headers",
    "dead_letter_headers",
    "encode_text",
    "headers_with_attempt",
    "pack_header",
    "retry_headers",
    "split_dead_letter_headers",
    "unpack_header",
]

ATTEMPT_HEADER = b"amgi-attempt"
"""Header carrying the delivery attempt when a transport retries by republishing."""
DEAD_LETTER_REASON_HEADER = b"amgi-dead-letter-reason"
"""Header carrying the nack reason on a message republished to a dead-letter address."""
ORIGINAL_ADDRESS_HEADER = b"amgi-original-address"
"""Header carrying the address a retried or dead-lettered message was first consumed from."""

PACKED_HEADER = "amgi-b64"
"""Name of a header that carries another whose name (or value) the broker's headers cannot
hold as it is (not UTF-8, control characters, too long): its value is
:func:`pack_header` of that header. MQTT, AMQP and Kafka use it, and pack an application's
own header of this name too, so that it arrives as it was sent."""
PACKED_HEADER_BYTES = PACKED_HEADER.encode()
""":data:`PACKED_HEADER` as a header name."""

_Headers = list[tuple[bytes, bytes]]


def pack_header(name: bytes, value: bytes) -> str:
    """``base64(name).base64(value)``, the value of a :data:`PACKED_HEADER` header."""
    return f"{base64.b64encode(name).decode()}.{base64.b64encode(value).decode()}"


def unpack_header(packed: str | bytes) -> tuple[bytes, bytes] | None:
    """The header :func:`pack_header` packed, or None when ``packed`` is not one (a
    header of that name from another client stays as it is)."""
    if isinstance(packed, str):
        packed = packed.encode("ascii", "replace")
    name, dot, value = packed.partition(b".")
    if not dot:
        return None
    try:
        return base64.b64decode(name, validate=True), base64.b64decode(value, validate=True)
    except binascii.Error:
        return None


def encode_text(text: str) -> bytes:
    """``text`` as header bytes: UTF-8, never failing (unencodable characters become ``?``)."""
    return text.encode("utf-8", "replace")


def attempt_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int, _Headers]:
    """Split the attempt header off ``headers``: ``(attempt, other_headers)``.

    A message without the header (or with a malformed one) is on its first attempt.
    """
    attempt = 1
    rest: _Headers = []
    for name, value in headers:
        if name == ATTEMPT_HEADER:
            try:
                attempt = max(1, int(value))
            except ValueError:
                attempt = 1
        else:
            rest.append((name, value))
    return attempt, rest


def headers_with_attempt(headers: Iterable[tuple[bytes, bytes]], attempt: int) -> _Headers:
    """``headers`` without any attempt header, then ``amgi-attempt: attempt``."""
    out = [(n, v) for n, v in headers if n != ATTEMPT_HEADER]
    out.append((ATTEMPT_HEADER, str(attempt).encode()))
    return out


def retry_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    attempt: int,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> _Headers:
    """Headers of the copy that redelivers a nacked message as delivery ``attempt``.

    ``attempt`` is the number of the delivery the copy will be (the nacked one's + 1);
    ``extra`` are server-specific headers appended after it (Kafka's original address and
    due time).
    """
    out = headers_with_attempt(headers, attempt)
    out.extend(extra)
    return out


def dead_letter_headers(
    headers: Iterable[tuple[bytes, bytes]], *, attempt: int, address: str, reason: str
) -> _Headers:
    """Headers of a dead letter: the message's own, then attempt, address and reason.

    ``attempt`` is the last delivery's number, ``address`` the address the message was
    consumed from, ``reason`` the last nack reason.
    """
    out = [
        (n, v)
        for n, v in headers
        if n not in (ATTEMPT_HEADER, ORIGINAL_ADDRESS_HEADER, DEAD_LETTER_REASON_HEADER)
    ]
    out.append((ATTEMPT_HEADER, str(attempt).encode()))
    out.append((ORIGINAL_ADDRESS_HEADER, encode_text(address)))
    out.append((DEAD_LETTER_REASON_HEADER, encode_text(bounded_reason(reason))))
    return out


MOST_REASON = 1000
"""Characters of a nack reason a dead letter keeps: an exception's text may hold a whole
payload, and a broker's size limit (SQS: 256 KiB with the attributes) would refuse the
dead letter, which then comes back for ever."""


def bounded_reason(reason: str) -> str:
    """``reason`` cut to at most :data:`MOST_REASON` characters, saying how long it was
    (as :func:`dead_letter_headers` stores it; a reason that short is left as it is)."""
    if len(reason) <= MOST_REASON:
        return reason
    said = f"... (cut: {len(reason)} characters in all)"
    return reason[: MOST_REASON - len(said)] + said


def split_dead_letter_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[_Headers, str, str]:
    """Undo :func:`dead_letter_headers` on a stored dead letter (``amgi dead-letters``):
    ``(the message's own headers, reason, original address)``, text decoded leniently.

    The attempt header, when still there, is left for the server to read its own way.
    """
    rest: _Headers = []
    reason = address = ""
    for name, value in headers:
        if name == DEAD_LETTER_REASON_HEADER:
            reason = value.decode("utf-8", "replace")
        elif name == ORIGINAL_ADDRESS_HEADER:
            address = value.decode("utf-8", "replace")
        else:
            rest.append((name, value))
    return rest, reason, address
