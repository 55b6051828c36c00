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
from collections.abc import Callable, Sequence
from typing import Any

from amgi.errors import ConfigurationError

__all__ = ["OpsListener", "Readiness", "bind", "url"]

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
_PORT_DRAWS = 5
"""Free ports tried for ``--metrics-port 0`` on a host of several addresses."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets on ``host:port``, one for each address ``host`` resolves to
    (``localhost``: ``::1`` and ``127.0.0.1``), all on one port; a port in use is a
    one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"--metrics-host {host!r}: {exc.strerror}") from None
    addresses = list(
        dict.fromkeys((family, kind, proto, addr) for family, kind, proto, _, addr in infos)
    )
    for _ in range(_PORT_DRAWS - 1 if port == 0 else 0):
        try:
            return _bind_all(addresses)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise _cannot_listen(host, port, exc) from None
            # The free port drawn for the first address is taken on another: draw again.
    try:
        return _bind_all(addresses)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None


def _cannot_listen(host: str, port: int, exc: OSError) -> ConfigurationError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigurationError(f"--metrics-port {port}: the port is already in use on {host}")
    return ConfigurationError(f"--metrics-port {port}: cannot listen on {host}: {exc.strerror}")


_Address = tuple[socket.AddressFamily, socket.SocketKind, int, Any]


def _bind_all(addresses: Sequence[_Address]) -> list[socket.socket]:
    """A listening socket on each of ``addresses``, on the port the first one got.

    An address this host cannot have (``::1`` where IPv6 is off, as in many containers
    whose ``localhost`` still names it) is left out while another one binds."""
    socks: list[socket.socket] = []
    unavailable: OSError | None = None
    try:
        for family, kind, proto, address in addresses:
            if socks:  # one port for them all, the one a port 0 drew first
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            try:
                socks.append(_listen(family, kind, proto, address, alone=len(addresses) == 1))
            except OSError as exc:
                if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                unavailable = unavailable or exc
        if not socks:
            assert unavailable is not None
            raise unavailable
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listen(
    family: socket.AddressFamily, kind: socket.SocketKind, proto: int, address: Any, *, alone: bool
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not alone:
            # "::" would take the IPv4 port too, which the IPv4 address binds itself.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers, up to the empty line that ends them: lines may end
    in a bare LF (HTTP/1.1 lets a server take it, and some probes send it)."""
    head = b""
    while True:
        line = await reader.readuntil(b"\n")
        head += line
        if line in (b"\n", b"\r\n"):
            return head
        if len(head) > _MAX_REQUEST:  # each line is bounded by the reader; all of them here
            raise asyncio.LimitOverrunError("request header too large", len(head))


class OpsListener:
    """Serves the probes (and ``/metrics`` when ``exposition`` is given) on ``socks``
    (from :func:`bind`)."""

    def __init__(
        self,
        socks: list[socket.socket],
        readiness: Readiness,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self._socks = socks
        self._readiness = readiness
        self._exposition = exposition
        self._servers: list[asyncio.Server] | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task[Any] | None] = {}
        """The connections being served, with the task serving each."""
        self._warned = False

    @property
    def port(self) -> int:
        port: int = self._socks[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Start answering on the bound sockets."""
        self._servers = []
        for sock in self._socks:
            server = await asyncio.start_server(self._handle, sock=sock, limit=_MAX_REQUEST)
            self._servers.append(server)

    async def close(self) -> None:
        """Stop listening and drop the connections in progress (a scrape or probe of a
        process that stops has no use)."""
        servers, self._servers = self._servers, None
        if servers is None:
            for sock in self._socks:
                sock.close()
            return
        for server in servers:
            server.close()
        for writer in self._clients:
            writer.transport.abort()
        serving = [task for task in self._clients.values() if task is not None]
        if serving:  # each ends on its next step, once it sees its connection lost
            await asyncio.wait(serving, timeout=_REQUEST_TIMEOUT)
        for server in servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for sock in self._socks:  # one start_server never took, if it failed half-way
            sock.close()

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
                head = await _read_head(reader)
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
