"""Requests to messages: CloudEvents 1.0 (binary, structured, batched) and Pub/Sub push.

Pure functions, no I/O. The structured, batched and Pub/Sub parsers return
``(address_or_None, headers, payload, bindings, attempt)`` tuples (binary mode, whose
payload is the body as it is, returns the address and headers); they raise
:class:`BadRequest` (answered 400) with a one-line reason.

Header rules (byte-exact, the same in every mode):

* every CloudEvents context attribute ``x`` is the header ``ce-x`` (lower case, as the
  HTTP binding names it), its value the attribute's text in UTF-8: binary mode takes the
  ``ce-`` header value as received, percent-decoded when it holds a ``%``; structured
  and batched mode take the JSON string, or ``true``/``false``/the decimal digits for
  boolean and integer extension values; a JSON ``null`` attribute is left out;
* ``datacontenttype`` is the header ``content-type`` (binary mode: the request's
  Content-Type), so the app reads it under one name in every mode;
* headers keep the order of the request (binary) or of the JSON object (structured).
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from amgi.transport import Bindings, HeaderList

__all__ = [
    "BINARY_NAMES",
    "BINARY_SUSPECT",
    "BadRequest",
    "Parsed",
    "binary_event",
    "load_json",
    "media_type",
    "pubsub_envelope",
    "structured_batch",
    "structured_event",
]

Parsed = tuple[str | None, HeaderList, bytes | None, Bindings, int]
"""``(address, headers, payload, bindings, attempt)``; address None: not from the event."""

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"

_REQUIRED = ("specversion", "id", "source", "type")
_CE = b"ce-"
_CONTENT_TYPE = b"content-type"
_PERCENT = ord("%")
"""``_PERCENT in value`` searches bytes for ``%`` (CPython tries a bytes needle as an int
first, and that failure costs more than the search)."""
_ATTRIBUTE_NAME = re.compile("[a-z0-9]+").fullmatch
"""A CloudEvents attribute name: lower-case ASCII letters and digits (spec 1.0, 3.1.1)."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]").search
"""The control characters a CloudEvents String must not hold (spec 1.0, 3.2)."""
_CONTROL_BYTE = re.compile(b"[\x00-\x1f\x7f]").search
_NON_ASCII = re.compile(b"[\x80-\xff]").search
_ATTRIBUTE_NAME_BYTES = re.compile(b"[a-z0-9]+").fullmatch
"""The same, as bytes (matched from position 3 of a ``ce-`` header name)."""
BINARY_SUSPECT = re.compile(b"[%\x00-\x1f\x7f-\xff]").search
"""What sends a binary event's header values to :func:`binary_event`'s checks: a
percent-encoding to decode, a control character to refuse, or a non-ASCII byte (of
UTF-8 text to check for C1 controls, or of no UTF-8 at all)."""
BINARY_NAMES = re.compile(b"(?:(?:ce-[a-z0-9]+|content-type) )*").fullmatch
"""Names of a binary event's headers, each followed by a space, that name attributes."""
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]").search
"""A JSON escape of a UTF-16 surrogate: of a pair (read as one character) or lone."""
_SURROGATE = re.compile("[\ud800-\udfff]").search


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_decode_json = json.JSONDecoder(parse_constant=_no_constant).decode
"""Strict JSON (``NaN`` and ``Infinity`` refused, as RFC 8259 has them not)."""


class BadRequest(ValueError):
    """The request is not a valid event of the mode it claims (HTTP 400)."""


def media_type(content_type: bytes) -> str:
    """``b"Application/JSON; charset=utf-8"`` -> ``"application/json"``."""
    return content_type.split(b";", 1)[0].strip().decode("latin-1").lower()


def _decode_header(value: bytes) -> bytes:
    return unquote_to_bytes(value) if _PERCENT in value else value


def string_problem(value: bytes) -> str | None:
    """Why ``value`` is no CloudEvents String (spec 1.0, 3.2), or None: it holds a
    control character (C0, DEL or C1), or it is not UTF-8."""
    if _CONTROL_BYTE(value):
        return "holds a control character"
    if _NON_ASCII(value):  # rare: only then can it hold C1 controls or be no UTF-8
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return "is not UTF-8"
        if _CONTROL(text):
            return "holds a control character"
    return None


def _check_text(name: bytes, value: bytes) -> None:
    """Refuse a decoded binary-mode header value that is no CloudEvents String (as
    structured mode refuses); a tab comes as it is, the rest percent-encoded."""
    problem = string_problem(value)
    if problem:
        raise BadRequest(f"binary event: {name.decode('latin-1')} {problem}")


def binary_event(
    kept: HeaderList, attributes: dict[bytes, bytes], want: bytes
) -> tuple[str | None, HeaderList]:
    """The address and headers of a binary-mode event (its payload is the body).

    ``kept`` holds the request's ``ce-`` headers and its Content-Type, in order, and
    ``attributes`` the same as a dict; ``want`` names the address header.
    """
    for i, (name, value) in enumerate(kept):
        if name != _CONTENT_TYPE and not _ATTRIBUTE_NAME_BYTES(name, 3):
            shown = name.decode("latin-1")
            raise BadRequest(
                f"binary event: header {shown} names no attribute (ce- and lower-case "
                "letters a-z and digits)"
            )
        if _PERCENT in value and name != _CONTENT_TYPE:  # rare: percent-encoded
            value = unquote_to_bytes(value)
            kept[i] = (name, value)
        _check_text(name, value)
    attributes = dict(kept)
    if len(attributes) != len(kept):
        twice = sorted({n for n, _ in kept if sum(1 for m, _ in kept if m == n) > 1})
        shown = ", ".join(n.decode("latin-1") for n in twice)
        raise BadRequest(f"binary event: header(s) {shown} given more than once")
    get = attributes.get
    if get(b"ce-specversion") != b"1.0" or not (
        get(b"ce-id") and get(b"ce-source") and get(b"ce-type")
    ):
        version = get(b"ce-specversion", b"")
        if version != b"1.0":
            shown = version.decode("latin-1")
            raise BadRequest(f"binary event: ce-specversion {shown!r} is not 1.0")
        missing = [f"ce-{a}" for a in _REQUIRED[1:] if not get(f"ce-{a}".encode())]
        raise BadRequest(f"binary event: missing or empty header(s) {', '.join(missing)}")
    address = get(want)
    if address is None:
        return None, kept
    try:
        return address.decode("utf-8"), kept
    except UnicodeDecodeError:
        raise BadRequest(f"binary event: {want.decode()} is not UTF-8") from None


def _attribute_value(name: str, value: Any) -> bytes:
    kind = type(value)
    if kind is str:
        if _CONTROL(value):
            raise BadRequest(f"structured event: attribute {name!r} holds a control character")
        return value.encode("utf-8")  # type: ignore[no-any-return]
    if kind is bool:
        return b"true" if value else b"false"
    if kind is int:
        return str(value).encode()
    raise BadRequest(f"structured event: attribute {name!r} is not a string, boolean or integer")


def _is_json_type(content_type: str | None) -> bool:
    if content_type is None:
        return True
    base = content_type.split(";", 1)[0].strip().lower()
    return base == JSON or base.endswith("+json") or base == "text/json"


def _from_object(event: Any, address_from: str, where: str) -> Parsed:
    if type(event) is not dict:
        raise BadRequest(f"{where} is not a JSON object")
    for name in _REQUIRED:
        value = event.get(name)
        if type(value) is not str or not value:
            raise BadRequest(f"{where}: attribute {name!r} is missing or not a non-empty string")
    if event["specversion"] != "1.0":
        raise BadRequest(f"{where}: specversion {event['specversion']!r} is not 1.0")
    headers: HeaderList = []
    payload: bytes | None = None
    content_type: str | None = None
    data: Any = None
    has_data = False
    for name, value in event.items():
        if name == "data":
            data, has_data = value, True
        elif name == "data_base64":
            if type(value) is not str:
                raise BadRequest(f"{where}: data_base64 is not a string")
            try:
                payload = binascii.a2b_base64(value, strict_mode=True)
            except binascii.Error:
                raise BadRequest(f"{where}: data_base64 is not valid base64") from None
        elif not _ATTRIBUTE_NAME(name):
            raise BadRequest(
                f"{where}: attribute name {name!r} is not lower-case letters a-z and digits"
            )
        elif value is None:
            continue
        elif name == "datacontenttype":
            if type(value) is not str:
                raise BadRequest(f"{where}: datacontenttype is not a string")
            content_type = value
            headers.append((_CONTENT_TYPE, _attribute_value(name, value)))
        else:
            headers.append((b"ce-" + name.encode("utf-8"), _attribute_value(name, value)))
    if has_data:
        if payload is not None:
            raise BadRequest(f"{where} has both data and data_base64")
        if type(data) is str and not _is_json_type(content_type):
            payload = data.encode("utf-8")
        elif data is not None:
            payload = _compact(data, where)
    address = event[address_from] if address_from in ("type", "source") else None
    return address, headers, payload, {}, 1


def load_json(body: bytes, what: str) -> Any:
    """``body`` as strict JSON (UTF-8, -16 or -32 as :func:`json.loads` reads it);
    :class:`BadRequest` naming ``what`` when it is not, nests too deeply to read, or
    holds a string that is not Unicode text: a lone surrogate escape (``"\\ud800"``,
    which no UTF-8 encodes; as bytes, the strict decoding refuses it)."""
    try:
        text = body.decode(json.detect_encoding(body))
        document = _decode_json(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what}: body is not JSON ({exc})") from None
    except RecursionError:
        raise BadRequest(f"{what}: body is not JSON (nested too deeply)") from None
    if _SURROGATE_ESCAPE(text) and _holds_lone_surrogate(document):
        raise BadRequest(f"{what}: body is not Unicode text (a lone surrogate \\ud800-\\udfff)")
    return document


def _holds_lone_surrogate(document: Any) -> bool:
    """Whether a string of ``document``, or a key, holds a lone surrogate (iterative: the
    document may nest as deeply as the decoder reads)."""
    stack = [document]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if _SURROGATE(item):
                return True
        elif kind is dict:
            stack += item
            stack += item.values()
        elif kind is list:
            stack += item
    return False


def _compact(data: Any, where: str) -> bytes:
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise BadRequest(f"{where}: data holds a number out of range") from None
    except RecursionError:
        raise BadRequest(f"{where}: data is nested too deeply") from None
    return text.encode("utf-8")


def structured_event(body: bytes, address_from: str) -> Parsed:
    """A structured-mode event: one JSON object (``application/cloudevents+json``)."""
    return _from_object(load_json(body, "structured event"), address_from, "structured event")


def structured_batch(body: bytes, address_from: str) -> list[Parsed]:
    """A batched-mode request: a JSON array of structured events."""
    events = load_json(body, "event batch")
    if type(events) is not list:
        raise BadRequest("event batch: body is not a JSON array")
    return [_from_object(e, address_from, f"event batch[{i}]") for i, e in enumerate(events)]


def pubsub_envelope(body: bytes, address_from: str) -> Parsed:
    """A Google Pub/Sub push request (wrapped): ``{"message": {...}, "subscription": ...}``.

    Headers are the message attributes (name and value in UTF-8, in JSON order); the
    payload is ``message.data`` base64-decoded (``None`` when absent); bindings
    ``googlepubsub`` hold ``messageId``, ``publishTime``, ``subscription`` and
    ``orderingKey`` when given; ``deliveryAttempt`` (set when the subscription has a
    dead-letter policy) is the attempt. The address is the subscription's short name.
    """
    envelope = load_json(body, "Pub/Sub push")
    message = envelope.get("message") if type(envelope) is dict else None
    if type(message) is not dict:
        raise BadRequest("Pub/Sub push: body has no 'message' object")
    attributes = message.get("attributes")
    if attributes is None:
        attributes = {}
    elif type(attributes) is not dict:
        raise BadRequest("Pub/Sub push: message.attributes is not an object")
    headers: HeaderList = []
    for name, value in attributes.items():
        if type(value) is not str:
            raise BadRequest(f"Pub/Sub push: attribute {name!r} is not a string")
        headers.append((name.encode("utf-8"), value.encode("utf-8")))
    data = message.get("data")
    payload: bytes | None = None
    if data is not None:
        if type(data) is not str:
            raise BadRequest("Pub/Sub push: message.data is not a string")
        try:
            payload = binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            raise BadRequest("Pub/Sub push: message.data is not valid base64") from None
    subscription = envelope.get("subscription")
    if subscription is not None and type(subscription) is not str:
        raise BadRequest("Pub/Sub push: subscription is not a string")
    binding: dict[str, Any] = {}
    for key, alias in (
        ("messageId", "message_id"),
        ("publishTime", "publish_time"),
        ("orderingKey", "ordering_key"),
    ):
        value = message.get(key, message.get(alias))
        if value is not None:
            if type(value) is not str:
                raise BadRequest(f"Pub/Sub push: message.{key} is not a string")
            binding[key] = value
    if subscription is not None:
        binding["subscription"] = subscription
    attempt = envelope.get("deliveryAttempt", 1)
    if type(attempt) is not int or attempt < 1:
        attempt = 1
    address = None
    if address_from == "subscription":
        if not subscription:
            raise BadRequest("Pub/Sub push: no subscription to take the address from")
        address = subscription.rsplit("/", 1)[-1]
    return address, headers, payload, {"googlepubsub": binding}, attempt
