"""Who may push: an optional bearer token and an optional HMAC signature of the body.

Both compare in constant time (:func:`hmac.compare_digest`). A request without the
credential a check needs is answered 401, one with a wrong credential 403; neither
reaches the application, and no credential (expected or received) is ever logged or put
in an answer.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["Refused", "RequestCheck"]


class Refused(Exception):
    """The request failed a check: ``status`` is 401 or 403 (400 for a credential header
    given twice), ``reason`` has no secret."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestCheck:
    """The checks configured for a server, applied to one request's headers and body.

    ``token``: the request must carry ``Authorization: Bearer <token>`` (the scheme in
    any case, RFC 6750).
    ``hmac_secret``: header ``hmac_header`` must hold the hex HMAC-``algorithm`` of the
    body under the secret, optionally prefixed ``<algorithm>=`` (as GitHub sends it).
    """

    __slots__ = ("_algorithm", "_bearer", "_header", "_prefix", "_secret", "enabled")

    def __init__(
        self,
        token: str | None,
        hmac_secret: str | None,
        hmac_header: str,
        algorithm: str,
    ) -> None:
        self._bearer = token.encode("utf-8") if token else None
        self._secret = hmac_secret.encode("utf-8") if hmac_secret else None
        self._header = hmac_header.lower().encode("latin-1")
        self._algorithm = algorithm
        self._prefix = algorithm.encode() + b"="
        hashlib.new(algorithm)  # raises ValueError for an unknown algorithm
        self.enabled = self._bearer is not None or self._secret is not None

    def headers(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """Check the bearer token; return the signature header's value (or None)."""
        bearer = self._bearer
        signature: bytes | None = None
        authorization: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                if authorization is not None:  # which one would be checked is a guess
                    raise Refused(400, "header authorization given twice")
                authorization = value
            elif name == self._header:
                if signature is not None:
                    raise Refused(400, f"header {name.decode('latin-1')} given twice")
                signature = value
        if bearer is not None:
            if authorization is None or authorization[:7].lower() != b"bearer ":
                raise Refused(401, "missing bearer token")
            if not hmac.compare_digest(authorization[7:].strip(), bearer):
                raise Refused(403, "wrong bearer token")
        if self._secret is not None and signature is None:
            raise Refused(401, f"missing signature header {self._header.decode('latin-1')}")
        return signature

    def body(self, signature: bytes | None, body: bytes) -> None:
        """Check the body's signature (when an HMAC secret is configured)."""
        if self._secret is None:
            return
        assert signature is not None
        prefix = self._prefix
        if signature[: len(prefix)].lower() == prefix:  # sha256=, or SHA256=
            signature = signature[len(prefix) :]
        expected = hmac.new(self._secret, body, self._algorithm).hexdigest().encode()
        if not hmac.compare_digest(signature.strip().lower(), expected):
            raise Refused(403, "body signature does not match")
