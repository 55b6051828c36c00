"""Payload decoding and encoding, built once per type at startup.

JSON is the default. A ``content-type`` header picks another decoder where the app
registered one (``App(decoders={...})``). A ``bytes`` or ``str`` payload (also optional,
or ``Annotated`` with constraints) is taken raw, whatever the content type; it is
published as ``application/octet-stream`` or ``text/plain``.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Union

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from amgi.app._errors import PayloadError, one_line

__all__ = [
    "JSON",
    "Decoder",
    "Encoder",
    "adapter_for",
    "content_type_of",
    "describe_validation_error",
    "encode_any",
    "make_decoder",
    "make_encoder",
    "raw_type",
    "strip_none",
]

JSON = "application/json"
_TEXT = "text/plain"
_OCTETS = "application/octet-stream"

Decoder = Callable[[Any, Any], Any]
"""``decode(payload, headers)`` -> value; raises ValidationError or PayloadError."""
Encoder = Callable[[Any], "tuple[bytes, str]"]
"""``encode(value)`` -> (payload, content type)."""


def adapter_for(annotation: Any) -> TypeAdapter[Any]:
    """A TypeAdapter for ``annotation`` (raises if pydantic cannot build a schema for it)."""
    return TypeAdapter(annotation)


def _allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return type(None) in typing.get_args(annotation)
    return annotation is None or annotation is type(None) or annotation is Any


def strip_none(annotation: Any) -> Any:
    """``T | None`` -> ``T``; anything else unchanged."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bare(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` wrappers and without ``| None``."""
    while True:
        while typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        stripped = strip_none(annotation)
        if stripped is annotation:
            return annotation
        annotation = stripped


def raw_type(annotation: Any) -> type[bytes] | type[str] | None:
    """``bytes`` or ``str`` when payloads of ``annotation`` travel raw (not as JSON)."""
    bare = _bare(annotation)
    if bare is bytes or bare is bytearray or bare is memoryview:
        return bytes
    if bare is str:
        return str
    return None


def content_type_of(annotation: Any) -> str:
    """The content type payloads of ``annotation`` are published with."""
    raw = raw_type(annotation)
    return JSON if raw is None else _OCTETS if raw is bytes else _TEXT


def make_decoder(annotation: Any, decoders: Mapping[str, Callable[[bytes], Any]]) -> Decoder:
    """The decoder of payloads into ``annotation``."""
    unwrapped = annotation
    while typing.get_origin(unwrapped) is Annotated:
        unwrapped = typing.get_args(unwrapped)[0]
    optional = _allows_none(unwrapped)
    bare = _bare(annotation)
    if bare is bytes or bare is str:
        return _raw_decoder(annotation, bare, optional)
    # The core validator itself: the same object a model's model_validate_json calls,
    # without the Python wrapper around it (about 0.3 us per message).
    validator = adapter_for(annotation).validator
    from_json: Callable[[Any], Any] = validator.validate_json
    from_python: Callable[[Any], Any] = validator.validate_python

    def other(payload: bytes | None, value: bytes) -> Any:
        content_type = value.split(b";", 1)[0].strip().lower().decode("latin-1")
        if payload is None:
            return none(payload)
        if content_type == JSON or content_type.endswith("+json"):
            return from_json(payload)
        decoder = decoders.get(content_type)
        if decoder is not None:
            try:
                decoded = decoder(payload)
            except Exception as exc:
                raise PayloadError(
                    f"content-type {content_type!r}: the decoder raised "
                    f"{type(exc).__name__}: {one_line(str(exc))}"
                ) from None
            return from_python(decoded)
        raise PayloadError(f"no decoder for content-type {content_type!r}")

    def none(payload: None) -> Any:
        if optional:
            return None
        raise PayloadError("the message has no payload")

    def decode(payload: bytes | None, headers: Any) -> Any:
        # A content-type header other than application/json picks another decoder.
        if headers:
            for name, value in headers:
                if (
                    value != b"application/json"
                    and len(name) == 12
                    and name.lower() == b"content-type"
                ):
                    return other(payload, value)
        if payload is None:
            return none(payload)
        return from_json(payload)

    return decode


def _raw_decoder(annotation: Any, raw: type, optional: bool) -> Decoder:
    take = _decode_bytes if raw is bytes else _decode_str
    if annotation is raw:
        return take
    # Optional, or Annotated with constraints: pydantic checks the raw value.
    check = adapter_for(annotation).validate_python

    def decode(payload: bytes | None, headers: Any) -> Any:
        if payload is None and optional:
            return None
        return check(take(payload, headers))

    return decode


def _decode_bytes(payload: bytes | None, headers: Any) -> bytes:
    return payload if payload is not None else b""


def _decode_str(payload: bytes | None, headers: Any) -> str:
    if payload is None:
        return ""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 text: {exc}") from None


def make_encoder(annotation: Any) -> Encoder:
    """The encoder of values of ``annotation`` (a payload to publish) into bytes."""
    raw = raw_type(annotation)
    if raw is bytes:
        return _encode_bytes
    if raw is str:
        return _encode_str
    adapter = adapter_for(annotation)
    adapter.json_schema()  # fails now, at startup, for a type that cannot be serialized

    def encode(value: Any) -> tuple[bytes, str]:
        try:
            return adapter.dump_json(value, warnings="error"), JSON
        except PydanticSerializationError:
            # Not an instance of the declared type (a dict for a model, say): what
            # validates into it is published; what does not raises ValidationError.
            return adapter.dump_json(adapter.validate_python(value), warnings="error"), JSON

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):

        def encode_model(value: Any) -> tuple[bytes, str]:
            if type(value) is annotation:
                return value.model_dump_json().encode(), JSON
            return encode(value)

        return encode_model
    return encode


def _encode_bytes(value: Any) -> tuple[bytes, str]:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise PayloadError(f"expected bytes to publish, got {type(value).__name__}")
    return bytes(value), _OCTETS


def _encode_str(value: Any) -> tuple[bytes, str]:
    if not isinstance(value, str):
        raise PayloadError(f"expected str to publish, got {type(value).__name__}")
    return value.encode(), _TEXT


_by_type: dict[type, Encoder] = {}


def encode_any(value: Any) -> tuple[bytes, str]:
    """Encode a value whose type is only known at run time (cached per type)."""
    kind = type(value)
    encoder = _by_type.get(kind)
    if encoder is None:
        encoder = make_encoder(kind)
        if len(_by_type) < 1024:
            _by_type[kind] = encoder
    return encoder(value)


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """One line naming each failing field path (``items.0.price: ...``)."""
    parts = []
    errors = exc.errors(include_url=False)
    for error in errors[:limit]:
        path = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{path}: {error['msg']}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)
