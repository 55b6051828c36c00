"""Naming a TLS failure: the server's certificate was not trusted."""

from __future__ import annotations

import ssl

__all__ = ["untrusted_certificate"]


def untrusted_certificate(error: object) -> str | None:
    """Why the server's certificate was refused (``"self-signed certificate"``, ...) when
    ``error`` or an exception it was raised from failed certificate verification; else
    None."""
    cause = error if isinstance(error, BaseException) else None
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message)
        cause = cause.__cause__ or cause.__context__
    return None
