"""The operations HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``.

A deliberately small HTTP/1.1 responder on the server's own event loop (one request per
connection, then close), so that an answer to ``/healthz`` proves the loop is running.
The socket is bound before the event loop starts, so that a port in use is reported
before the application's lifespan startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from amgi.errors import ConfigurationError

__all__ = ["OpsListener", "Readiness", "bind"]

logger = logging.getLogger("amgi.ops")

Readiness = Callable[[], str | None]
"""Returns ``None`` when ready, otherwise why not (e.g. ``"draining"``)."""

_MAX_REQUEST = 8192
_REQUEST_TIMEOUT = 5.0
_MAX_CONNECTIONS = 32
"""Connections served at once; more are dropped as they come, so that clients that connect
and send nothing cannot use up the process's file descriptors (its broker connections and
files need them)."""
_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a port in use is a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"--metrics-host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"--metrics-port {port}: the port is already in use on {host}"
            ) from None
        raise ConfigurationError(
            f"--metrics-port {port}: cannot listen on {host}: {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


class OpsListener:
    """Serves the probes (and ``/metrics`` when ``exposition`` is given) on ``sock``."""

    def __init__(
        self,
        sock: socket.socket,
        readiness: Readiness,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self._sock = sock
        self._readiness = readiness
        self._exposition = exposition
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[Any] | None] = {}
        """The connections being served, with the task serving each."""
        self._warned = False

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    async def start(self) -> None:
        """Start answering on the bound socket."""
        self._server = await asyncio.start_server(self._handle, sock=self._sock, limit=_MAX_REQUEST)

    async def close(self) -> None:
        """Stop listening and drop the connections in progress (a scrape or probe of a
        process that stops has no use)."""
        if self._server is not None:
            self._server.close()
            for writer in self._clients:
                writer.transport.abort()
            serving = [task for task in self._clients.values() if task is not None]
            if serving:  # each ends on its next step, once it sees its connection lost
                await asyncio.wait(serving, timeout=_REQUEST_TIMEOUT)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        else:
            self._sock.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= _MAX_CONNECTIONS:
            writer.transport.abort()
            if not self._warned:
                self._warned = True
                logger.warning(
                    "the metrics listener drops connections beyond %d at once", _MAX_CONNECTIONS
                )
            return
        self._clients[writer] = asyncio.current_task()
        try:
            await self._serve(reader, writer)
        finally:
            del self._clients[writer]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = False
        try:
            answer = await self._answer(reader)
            if answer is not None:
                writer.write(answer)
            # A client that does not read its answer is dropped, not waited for: it would
            # hold the connection and its copy of the answer for ever.
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                writer.close()
                await writer.wait_closed()
            answered = True
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            logger.exception("the metrics listener failed to answer a request")
        finally:
            if not answered:
                writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        """The response to the request ``reader`` brings; ``None`` for no request."""
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return self._reply(431, "request header too large\n")
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return self._reply(405, "only GET\n")
        status, body, kind = self._route(target)
        return self._reply(status, body, kind, head_only=method == b"HEAD")

    def _route(self, target: bytes) -> tuple[int, str | bytes, str]:
        plain = "text/plain; charset=utf-8"
        if target == b"/healthz":
            return 200, "ok\n", plain
        if target == b"/readyz":
            why = self._readiness()
            return (200, "ready\n", plain) if why is None else (503, f"not ready: {why}\n", plain)
        if target == b"/metrics" and self._exposition is not None:
            return 200, self._exposition(), _PROMETHEUS_TEXT
        return 404, "not found\n", plain

    @staticmethod
    def _reply(
        status: int,
        body: str | bytes,
        kind: str = "text/plain; charset=utf-8",
        *,
        head_only: bool = False,
    ) -> bytes:
        data = body.encode() if isinstance(body, str) else body
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable",
        }[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        )
        return head if head_only else head + data
