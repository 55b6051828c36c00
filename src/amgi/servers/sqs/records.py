"""SQS messages <-> AMGI messages: body encoding, headers as attributes, bindings.

Shared by the SQS server and the Lambda adapter (:mod:`amgi.serverless.sqs`), so a
message looks the same to an app on either side.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from amgi.servers.kit import (
    ATTEMPT_HEADER,
    BadBinding,
    attempt_from_headers,
    dead_letter_headers,
    split_dead_letter_headers,
    text_value,
    whole_number,
)
from amgi.transport import HeaderList, Message, StoredDeadLetter

logger = logging.getLogger("amgi.servers.sqs")

SQSClient = Any
"""The aiobotocore SQS client (untyped: the library ships no stubs)."""

__all__ = [
    "BODY_ENCODING_ATTRIBUTE",
    "MAX_ATTRIBUTES",
    "PACKED_HEADERS_ATTRIBUTE",
    "decode_body",
    "decode_content",
    "encode_body",
    "headers_from_attributes",
    "headers_to_attributes",
    "message_bindings",
    "pack_headers",
    "send_attribute_types",
    "send_parameters",
    "unpack_headers",
]


BODY_ENCODING_ATTRIBUTE: Final = "amgi-body-encoding"


PACKED_HEADERS_ATTRIBUTE: Final = "amgi-headers"


MAX_ATTRIBUTES: Final = 10


_NOT_SQS_TEXT: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


_ATTRIBUTE_NAME: Final = re.compile(r"[A-Za-z0-9_\-.]{1,256}")


_SEND_ID: Final = re.compile(r"[!-~]{1,128}")
"""A message group or deduplication id: 1-128 ASCII letters, digits or punctuation."""


_DATA_TYPE: Final = re.compile(r"(?=.{1,256}$)(?:String|Number|Binary)(?:\.[A-Za-z0-9_\-.]+)?")
"""An attribute data type: ``String``, ``Number`` or ``Binary``, with an optional
``.label`` (``Number.float``)."""


_MAX_DELAY: Final = 900


def send_parameters(sqs: Mapping[str, Any], *, fifo: bool) -> dict[str, Any]:
    """The ``SendMessage`` parameters the ``sqs`` bindings of a send set, checked.

    Raises :class:`~amgi.servers.kit.BadBinding` for a value SQS would refuse or this
    server would have to round or coerce: a delay that is not a whole number of seconds
    from 0 to 900 (or any delay on a FIFO queue, which SQS delays as a whole), an id
    that is not 1-128 ASCII letters, digits or punctuation.
    """
    out: dict[str, Any] = {}
    delay = sqs.get("delay_seconds")
    if delay is not None:
        whole_number("sqs", "delay_seconds", delay, 0, _MAX_DELAY)
        if fifo and delay:
            raise BadBinding(
                "sqs.delay_seconds cannot be set per message on a FIFO queue "
                "(SQS delays a FIFO queue as a whole: its DelaySeconds attribute)"
            )
        if not fifo:
            out["DelaySeconds"] = delay
    for key, parameter in (
        ("message_group_id", "MessageGroupId"),
        ("message_deduplication_id", "MessageDeduplicationId"),
    ):
        value = sqs.get(key)
        if value is not None:
            rule = "1 to 128 ASCII letters, digits or punctuation"
            out[parameter] = text_value("sqs", key, value, pattern=_SEND_ID, rule=rule)
    return out


def send_attribute_types(sqs: Mapping[str, Any]) -> dict[str, str]:
    """The ``attribute_types`` binding of a send (header name -> SQS data type), checked
    (:class:`~amgi.servers.kit.BadBinding`)."""
    types = sqs.get("attribute_types")
    if types is None:
        return {}
    if not isinstance(types, Mapping):
        raise BadBinding(
            "sqs.attribute_types must be a dict of header name -> SQS data type, "
            f"not {type(types).__name__}"
        )
    for name, data_type in types.items():
        if type(name) is not str:
            raise BadBinding(f"sqs.attribute_types names must be str, not {name!r:.60}")
        text_value(
            "sqs",
            f"attribute_types[{name!r:.60}]",
            data_type,
            pattern=_DATA_TYPE,
            rule="String, Number or Binary, optionally with a .label (Number.int)",
        )
    return dict(types)


def encode_body(payload: bytes | None) -> tuple[str, str | None]:
    """The SQS body for ``payload`` and the body encoding to mark it with (None: text)."""
    if payload is None:
        return "-", "none"
    if not payload:
        return "-", "empty"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _NOT_SQS_TEXT.search(text):
        return text, None
    return base64.b64encode(payload).decode("ascii"), "base64"


def decode_body(body: str, encoding: str | None) -> bytes | None:
    """The payload of an SQS body written by :func:`encode_body` (or by anyone else)."""
    if encoding is None:
        return body.encode("utf-8")
    if encoding == "base64":
        return base64.b64decode(body)
    if encoding == "empty":
        return b""
    if encoding == "none":
        return None
    raise ValueError(f"unknown {BODY_ENCODING_ATTRIBUTE} {encoding!r}")


def headers_from_attributes(
    attributes: Iterable[tuple[str, str, bytes]], problems: list[str] | None = None
) -> tuple[HeaderList, str | None, dict[str, str]]:
    """Split ``(name, data type, value)`` message attributes into the app's view.

    Returns the headers, the body encoding (see :func:`decode_body`) and the data type of
    each header (``String``, ``Number``, ``Binary``, possibly with a custom suffix). An
    ``amgi-headers`` attribute that is not packed headers raises ``ValueError``, unless
    ``problems`` is given: then it is kept as an ordinary header and the reason appended.
    """
    headers: HeaderList = []
    types: dict[str, str] = {}
    encoding: str | None = None
    packed: HeaderList | None = None
    for name, data_type, value in attributes:
        if name == BODY_ENCODING_ATTRIBUTE:
            encoding = value.decode("utf-8", "replace")
            continue
        if name == PACKED_HEADERS_ATTRIBUTE:
            try:
                packed = unpack_headers(value)
                continue
            except ValueError as exc:
                if problems is None:
                    raise
                problems.append(f"{name} is not packed headers ({exc})")
        headers.append((name.encode("utf-8"), value))
        types[name] = data_type
    if packed is not None:
        headers = packed + headers
    return headers, encoding, types


def decode_content(
    body: str, attributes: Iterable[tuple[str, str, bytes]]
) -> tuple[HeaderList, bytes | None, dict[str, str], str | None]:
    """The headers, payload and header data types of a received message, and why a part
    of it did not decode (``None`` when all did).

    A part this mapping cannot decode (an unknown or broken ``amgi-body-encoding``, an
    ``amgi-headers`` attribute that is not packed headers: another producer's, or
    damaged) is not ours to judge: it comes back as it arrived, the body as its text and
    the attribute as an ordinary header of its name. The SQS server delivers that; the
    Lambda adapter fails the record without delivering it.
    """
    attributes = list(attributes)
    problems: list[str] = []
    headers, encoding, types = headers_from_attributes(attributes, problems)
    try:
        payload = decode_body(body, encoding)
    except ValueError as exc:  # binascii.Error included
        problems.append(f"the body does not decode ({exc})")
        payload = body.encode("utf-8")
        for name, data_type, value in attributes:
            if name == BODY_ENCODING_ATTRIBUTE:
                headers.append((name.encode("utf-8"), value))
                types[name] = data_type
    return headers, payload, types, "; ".join(problems) or None


def pack_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Headers as one byte string: for each, 4-byte big-endian lengths and the bytes."""
    out = bytearray()
    for name, value in headers:
        out += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def unpack_headers(data: bytes) -> HeaderList:
    """The headers :func:`pack_headers` packed; ``ValueError`` if ``data`` is not that."""
    headers: HeaderList = []
    view = memoryview(data)
    i = 0
    while i < len(view):
        pair = []
        for _ in range(2):
            if i + 4 > len(view):
                raise ValueError("truncated packed headers")
            size = int.from_bytes(view[i : i + 4], "big")
            i += 4
            if i + size > len(view):
                raise ValueError("truncated packed headers")
            pair.append(bytes(view[i : i + size]))
            i += size
        headers.append((pair[0], pair[1]))
    return headers


def headers_to_attributes(
    headers: Iterable[tuple[bytes, bytes]],
    types: Mapping[str, str] | None = None,
    body_encoding: str | None = None,
) -> dict[str, dict[str, Any]]:
    """SQS ``MessageAttributes`` for ``headers`` (and the body encoding, if any).

    Each header becomes one attribute: String when its value is SQS text, otherwise
    Binary; ``types`` may name another data type per header (e.g. ``{"count": "Number"}``).
    Headers SQS cannot carry that way (a repeated or invalid name, an empty value, more
    than ten) travel together in the :data:`PACKED_HEADERS_ATTRIBUTE` attribute instead,
    unchanged.
    """
    pairs = list(headers)
    attributes = _native_attributes(pairs, types or {})
    if attributes is None or len(attributes) + (body_encoding is not None) > MAX_ATTRIBUTES:
        attributes = {
            PACKED_HEADERS_ATTRIBUTE: {"DataType": "Binary", "BinaryValue": pack_headers(pairs)}
        }
    if body_encoding is not None:
        attributes[BODY_ENCODING_ATTRIBUTE] = {"DataType": "String", "StringValue": body_encoding}
    return attributes


def _native_attributes(
    headers: list[tuple[bytes, bytes]], types: Mapping[str, str]
) -> dict[str, dict[str, Any]] | None:
    """One attribute per header, or None when SQS attributes cannot carry them as they are."""
    attributes: dict[str, dict[str, Any]] = {}
    for raw_name, value in headers:
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if (
            name in attributes
            or not _ATTRIBUTE_NAME.fullmatch(name)
            or name.startswith((".", "amgi-headers", "amgi-body"))
            or name.lower().startswith(("aws.", "amazon."))  # reserved in any casing
            or name.endswith(".")
            or ".." in name
            or not value  # SQS refuses an empty attribute value
        ):
            return None
        data_type = types.get(name)
        text: str | None
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        is_text = text is not None and not _NOT_SQS_TEXT.search(text)
        if data_type is None:
            data_type = "String" if is_text else "Binary"
        if data_type.startswith("Binary"):
            attributes[name] = {"DataType": data_type, "BinaryValue": value}
        elif is_text:
            attributes[name] = {"DataType": data_type, "StringValue": text}
        else:
            raise ValueError(f"header {name!r} of type {data_type} is not valid SQS text")
    return attributes


def message_bindings(
    message_id: str, system: Mapping[str, str], types: Mapping[str, str]
) -> dict[str, Any]:
    """The ``sqs`` bindings of a received message (``system`` and ``types`` are kept, not
    copied: pass mappings the message may own)."""
    binding: dict[str, Any] = {
        "message_id": message_id,
        "attributes": system,
        "attribute_types": types,
    }
    for key, attribute in _SYSTEM_BINDINGS:
        if attribute in system:
            binding[key] = system[attribute]
    return binding


_SYSTEM_BINDINGS: Final = (
    ("message_group_id", "MessageGroupId"),
    ("message_deduplication_id", "MessageDeduplicationId"),
    ("sequence_number", "SequenceNumber"),
)


def _api_attributes(raw: Mapping[str, Any]) -> list[tuple[str, str, bytes]]:
    """``(name, data type, value)`` of the MessageAttributes of an SQS API message."""
    out = []
    for name, attribute in raw.items():
        data_type = attribute.get("DataType", "String")
        if "BinaryValue" in attribute:
            value = bytes(attribute["BinaryValue"])
        else:
            value = str(attribute.get("StringValue", "")).encode("utf-8")
        out.append((name, data_type, value))
    return out


def _message(raw: Mapping[str, Any]) -> Message:
    system = raw.get("Attributes") or {}
    headers, payload, types, problem = decode_content(
        raw["Body"], _api_attributes(raw.get("MessageAttributes") or {})
    )
    if problem is not None:
        logger.warning("message %s: %s; delivering it as it arrived", raw["MessageId"], problem)
    # A dead letter carries its last attempt: the later of that and SQS's receive count.
    attempt, headers = attempt_from_headers(headers)
    received = max(1, int(system.get("ApproximateReceiveCount", "1")))
    return Message(
        id=raw["MessageId"],
        headers=headers,
        payload=payload,
        bindings={"sqs": message_bindings(raw["MessageId"], system, types)},
        attempt=max(attempt, received),
        token=raw["ReceiptHandle"],
    )


def _dead_letter_attributes(
    m: Message, source: str, reason: str, body_encoding: str | None
) -> dict[str, dict[str, Any]]:
    """The original headers (with their data types), the reason and the source queue."""
    types = m.bindings.get("sqs", {}).get("attribute_types", {})
    headers = dead_letter_headers(m.headers, attempt=m.attempt, address=source, reason=reason)
    return headers_to_attributes(headers, types, body_encoding)


def stored_dead_letter(raw: Mapping[str, Any], address: str) -> StoredDeadLetter:
    """What ``amgi dead-letters list`` shows of a message received from the dead-letter
    queue of ``address``: the app's headers, the reason, the last attempt (0: unknown,
    when SQS's own redrive policy moved it) and when it was sent there.

    Its ``address`` is the queue it came from: the one SQS's redrive policy moved it from
    (``DeadLetterQueueSourceArn``), else AMGI's original address, else ``address``.
    """
    # Another producer's amgi-headers that is not packed headers: shown as it arrived.
    headers, encoding, _ = headers_from_attributes(
        _api_attributes(raw.get("MessageAttributes") or {}), problems=[]
    )
    counted = any(name == ATTEMPT_HEADER for name, _ in headers)
    attempt, headers = attempt_from_headers(headers)
    headers, reason, original = split_dead_letter_headers(headers)
    try:
        payload = decode_body(raw["Body"], encoding)
    except ValueError:
        payload = raw["Body"].encode("utf-8")
    system = raw.get("Attributes") or {}
    source = system.get("DeadLetterQueueSourceArn")
    sent = system.get("SentTimestamp")
    return StoredDeadLetter(
        id=raw["MessageId"],
        address=source.rsplit(":", 1)[-1] if source else original or address,
        headers=headers,
        payload=payload,
        bindings={},
        attempts=attempt if counted else 0,
        reason=reason,
        dead_at=int(sent) / 1000 if sent else None,
    )


def replay_attributes(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``MessageAttributes`` that send a dead letter back as a first attempt: its
    headers with their data types and its body encoding, less AMGI's attempt, reason and
    original address (wherever they travel, one by one or packed).

    Attributes that do not decode (another producer's ``amgi-headers`` that is not packed
    headers, moved by the queue's own redrive policy) are sent back as they arrived.
    """
    attributes = _api_attributes(raw.get("MessageAttributes") or {})
    try:
        headers, encoding, types = headers_from_attributes(attributes)
    except ValueError:
        return {
            name: {"DataType": data_type, "BinaryValue": value}
            if data_type.startswith("Binary")
            else {"DataType": data_type, "StringValue": value.decode("utf-8")}
            for name, data_type, value in attributes
        }
    _, headers = attempt_from_headers(headers)
    headers, _, _ = split_dead_letter_headers(headers)
    return headers_to_attributes(headers, types, encoding)
