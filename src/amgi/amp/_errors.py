"""Exceptions raised by the AMP library."""

from __future__ import annotations

__all__ = [
    "AmpError",
    "ArgumentError",
    "ConnectionLost",
    "ProtocolError",
    "ProtocolSwitched",
    "RemoteAmpError",
    "TLSNotAvailable",
    "TooLong",
    "UnhandledCommand",
    "UnknownRemoteError",
]

UNKNOWN_ERROR_CODE = b"UNKNOWN"
UNHANDLED_ERROR_CODE = b"UNHANDLED"
TLS_ERROR_CODE = b"TLS_ERROR"


class AmpError(Exception):
    """Base class of every exception this library raises."""


class ProtocolError(AmpError):
    """The peer broke the wire protocol; the connection cannot continue."""


class ProtocolSwitched(AmpError):
    """No AMP traffic: the connection switched protocols, or a switch is pending."""


class TooLong(AmpError, ValueError):
    """A key (over 255 bytes) or a value (over 65,535 bytes) cannot be encoded."""


class ArgumentError(AmpError, ValueError):
    """Arguments or a response did not match the command's declaration."""


class ConnectionLost(AmpError, ConnectionError):
    """The connection closed before the call was answered."""


class RemoteAmpError(AmpError):
    """The peer answered with an error code the command did not declare."""

    def __init__(self, code: bytes, description: str) -> None:
        super().__init__(f"{code.decode('ascii', 'replace')}: {description}")
        self.code = code
        self.description = description


class UnknownRemoteError(RemoteAmpError):
    """The peer failed with an undeclared error (code ``UNKNOWN`` or another code)."""


class UnhandledCommand(RemoteAmpError):
    """The peer has no responder for the command (code ``UNHANDLED``)."""


class TLSNotAvailable(AmpError):
    """The peer cannot start TLS (code ``TLS_ERROR``)."""
