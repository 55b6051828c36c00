"""The injectable publisher: send any number of messages to any address from a handler."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from amgi.app._address import fill_template
from amgi.app._codec import encode_any
from amgi.app._params import Outgoing
from amgi.types import AMGISendCallable

__all__ = ["Publisher", "encode_headers"]


def encode_headers(
    headers: Mapping[str, str | bytes] | None, content_type: str
) -> list[tuple[bytes, bytes]]:
    """AMGI header pairs: ``content-type`` first, then ``headers`` (str values UTF-8 encoded).

    A ``content-type`` in ``headers`` (any case) replaces the one of the encoder.
    """
    pairs = [(b"content-type", content_type.encode())]
    if headers:
        for name, value in headers.items():
            if not isinstance(name, str):
                raise TypeError(f"header name {name!r}: must be str, not {type(name).__name__}")
            key = name.encode()
            encoded = value if isinstance(value, bytes) else _text(name, value).encode()
            if len(key) == 12 and key.lower() == b"content-type":
                pairs[0] = (key, encoded)
            else:
                pairs.append((key, encoded))
    return pairs


def _text(name: str, value: object) -> str:
    """``value`` of the header ``name``, or TypeError naming it (not the bare
    AttributeError of ``5 .encode()``, which says neither which header nor why)."""
    if not isinstance(value, str):
        raise TypeError(
            f"header {name!r}: its value must be str or bytes, not {type(value).__name__}"
        )
    return value


class Publisher:
    """Publishes messages from inside a handler (annotate a parameter with ``Publisher``).

    ``await publisher.publish("audit", Event(...), headers={"k": "v"})``: the payload is
    serialized from its type (pydantic models, dataclasses, TypedDicts, primitives as
    JSON; ``bytes`` and ``str`` as they are) and the call returns once the server has
    handed it to the broker (a failure raises the server's ``OSError``).

    The address may hold ``{name}`` parameters, filled from ``params``, else from the
    consumed address (``publish("audit.{region}", ...)`` handling ``orders.eu`` sends to
    ``audit.eu``); a missing or invalid value raises ValueError.
    """

    __slots__ = ("_consumed", "_send")

    def __init__(self, send: AMGISendCallable, consumed: Mapping[str, str] | None = None) -> None:
        self._send = send
        self._consumed: Mapping[str, str] = consumed or {}

    async def publish(
        self,
        address: str,
        payload: Any,
        *,
        headers: Mapping[str, str | bytes] | None = None,
        bindings: Mapping[str, Mapping[str, Any]] | None = None,
        params: Mapping[str, str | int | Enum] | None = None,
    ) -> None:
        """Serialize ``payload`` and send it to ``address`` (its ``{name}`` filled in)."""
        if isinstance(payload, Outgoing):
            headers = {**(payload.headers or {}), **(headers or {})}
            bindings = {**(payload.bindings or {}), **(bindings or {})}
            params = {**(payload.params or {}), **(params or {})}
            payload = payload.payload
        target = fill_template(address, self._consumed, params)
        data, content_type = encode_any(payload)
        await self._send(
            {
                "type": "message.send",
                "address": target,
                "headers": encode_headers(headers, content_type),
                "payload": data,
                "bindings": {k: dict(v) for k, v in (bindings or {}).items()},
            }
        )
