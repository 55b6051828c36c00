"""Send routing: ``message.send`` to another server than the one that delivered.

A :class:`Router` holds ``(pattern, transport)`` routes. The first pattern (shell-style,
:func:`fnmatch.fnmatchcase`: ``invoices.*``, ``audit/?``, ``*``) that matches a send's
address picks the transport; an address no pattern matches goes where it went before
(the server that delivered the message, or a Lambda adapter's publisher). The router
owns its transports: the runtime (or adapter) connects them at startup through
:meth:`Router.connect` and closes them at shutdown through :meth:`Router.close`.
Several routes may share one transport; each is connected once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase

from amgi.errors import ConfigurationError
from amgi.transport import Transport

__all__ = ["Router", "parse_route"]

logger = logging.getLogger("amgi.runtime")

_CACHE_LIMIT = 4096


def parse_route(text: str) -> tuple[str, str]:
    """``"invoices.*=kafka"`` -> ``("invoices.*", "kafka")`` (the CLI's ``--send-to``)."""
    pattern, sep, server = text.rpartition("=")
    if not sep or not pattern or not server:
        raise ConfigurationError(f"--send-to takes PATTERN=SERVER, got {text!r}")
    return pattern, server.strip()


class Router:
    """Picks the transport a ``message.send`` goes to, by address pattern."""

    def __init__(self, routes: Iterable[tuple[str, Transport]]) -> None:
        self.routes = list(routes)
        self.transports: list[Transport] = []
        for _, transport in self.routes:
            if all(transport is not t for t in self.transports):
                self.transports.append(transport)
        self._cache: dict[str, Transport | None] = {}
        self._connected: list[Transport] = []

    def target(self, address: str) -> Transport | None:
        """The transport of the first route matching ``address`` (None: no route)."""
        cache = self._cache
        try:
            return cache[address]
        except KeyError:
            pass
        found = next((t for p, t in self.routes if fnmatchcase(address, p)), None)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[address] = found
        return found

    async def connect(self) -> None:
        """Connect every route's transport (once); on failure close those connected."""
        for transport in self.transports:
            if any(transport is t for t in self._connected):
                continue
            try:
                await transport.connect()
            except BaseException:
                with contextlib.suppress(Exception):
                    await transport.close()
                await self.close()
                raise
            self._connected.append(transport)
            logger.info("sending to %s for %s", transport.name, self.describe(transport))

    def describe(self, transport: Transport) -> str:
        """The patterns routed to ``transport``, for logs."""
        return ", ".join(repr(p) for p, t in self.routes if t is transport)

    async def close(self) -> None:
        """Close the transports connected by :meth:`connect`."""
        connected, self._connected = self._connected, []
        for transport in reversed(connected):
            try:
                await transport.close()
            except Exception:
                logger.exception("closing the %s send route failed", transport.name)
