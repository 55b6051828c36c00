"""AMP (Twisted's Asynchronous Messaging Protocol) for asyncio.

A sans-IO core (:class:`Connection`: bytes in, events out) under a thin asyncio
layer (:class:`AMP`, an :class:`asyncio.Protocol` that both calls and answers).
Byte-compatible with ``twisted.protocols.amp``.
"""

from ._arguments import (
    AmpList,
    Argument,
    BigBytes,
    Boolean,
    DateTime,
    Decimal,
    Float,
    Integer,
    ListOf,
    String,
    Unicode,
)
from ._asyncio import AMP, connect, serve
from ._box import (
    DEFAULT_MAX_BOX_SIZE,
    DEFAULT_MAX_KEYS_PER_BOX,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    Box,
    BoxParser,
    encode_box,
    parse_boxes,
)
from ._command import Command, StartTLS
from ._connection import (
    AnswerDropped,
    AnswerReceived,
    CallReceived,
    CallRejected,
    Connection,
    ErrorReceived,
    Event,
    ProtocolViolation,
)
from ._errors import (
    TLS_ERROR_CODE,
    UNHANDLED_ERROR_CODE,
    UNKNOWN_ERROR_CODE,
    AmpError,
    ArgumentError,
    ConnectionLost,
    ProtocolError,
    RemoteAmpError,
    TLSNotAvailable,
    TooLong,
    UnhandledCommand,
    UnknownRemoteError,
)

__all__ = [
    "AMP",
    "DEFAULT_MAX_BOX_SIZE",
    "DEFAULT_MAX_KEYS_PER_BOX",
    "MAX_KEY_LENGTH",
    "MAX_VALUE_LENGTH",
    "TLS_ERROR_CODE",
    "UNHANDLED_ERROR_CODE",
    "UNKNOWN_ERROR_CODE",
    "AmpError",
    "AmpList",
    "AnswerDropped",
    "AnswerReceived",
    "Argument",
    "ArgumentError",
    "BigBytes",
    "Boolean",
    "Box",
    "BoxParser",
    "CallReceived",
    "CallRejected",
    "Command",
    "Connection",
    "ConnectionLost",
    "DateTime",
    "Decimal",
    "ErrorReceived",
    "Event",
    "Float",
    "Integer",
    "ListOf",
    "ProtocolError",
    "ProtocolViolation",
    "RemoteAmpError",
    "StartTLS",
    "String",
    "TLSNotAvailable",
    "TooLong",
    "UnhandledCommand",
    "Unicode",
    "UnknownRemoteError",
    "connect",
    "encode_box",
    "parse_boxes",
    "serve",
]
