"""TLS for the servers: contexts built from the options' certificate files, and naming a
TLS failure.

A file that does not load is one :class:`ConfigurationError` naming the option and the
file (``ssl`` names neither: ``[SSL] PEM lib``), raised before anything connects.
"""

from __future__ import annotations

import ssl

from amgi.errors import ConfigurationError

__all__ = ["Named", "client_context", "server_context", "untrusted_certificate"]

Named = tuple[str, "str | None"]
"""An option and the file it names (``None`` or ``""`` when it is not given), e.g.
``("--ca-file", "ca.pem")``."""


def client_context(
    server: str, ca: Named, cert: Named, key: Named, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client's context: the server's certificate verified against ``ca`` (else the
    system's CAs), with a client certificate when ``cert`` is given."""
    try:
        context = ssl.create_default_context(cafile=ca[1] or None)
    except OSError as exc:  # ssl.SSLError included
        raise _unloadable(server, ca, exc) from None
    if cert[1]:
        _load_chain(context, server, cert, key)
    if not check_hostname:
        context.check_hostname = False
    return context


def server_context(server: str, cert: Named, key: Named, ca: Named) -> ssl.SSLContext:
    """A listener's context: its certificate, and client certificates signed by ``ca``
    required when it is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, server, cert, key)
    if ca[1]:
        try:
            context.load_verify_locations(ca[1])
        except OSError as exc:
            raise _unloadable(server, ca, exc) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_chain(context: ssl.SSLContext, server: str, cert: Named, key: Named) -> None:
    try:
        context.load_cert_chain(cert[1] or "", key[1] or None)
    except OSError as exc:
        with_key = f" with {key[0]} {key[1]!r}" if key[1] else ""
        raise _unloadable(server, cert, exc, with_key) from None


def _unloadable(server: str, named: Named, exc: OSError, extra: str = "") -> ConfigurationError:
    if isinstance(exc, ssl.SSLError):
        why = f"not a PEM certificate (and key) that matches ({exc.reason or exc})"
    else:
        why = exc.strerror or str(exc)
    return ConfigurationError(f"{server}: cannot load {named[0]} {named[1]!r}{extra}: {why}")


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
